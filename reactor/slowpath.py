"""Commands that touch guest memory mapped without an fd (the SeaBIOS case).

Theory of operation
-------------------
QEMU sends DMA_MAP without an fd for memory it cannot share: ROM and the shadowed
firmware window (0xc0000-0xfffff, re-mapped read-only just before SeaBIOS boots the
guest).  SeaBIOS keeps its PRP list there, so a worker walking that list hits
`NeedsMessageDma`, parks the command and hands it here.  The same happens to a read
whose payload lands in a message-write window (`nvme/msgwindow.py`: low memory, where
firmware runs code it loads): its bytes must reach the guest by DMA_WRITE so that
QEMU's TCG drops code it translated from the old contents.

The front-end runs the same `IoExecutor` against a `MessageDmaMemory`: a view of
fd-backed memory comes straight from the mapping; a read-only view of message-only
memory is served from bytes fetched with DMA_READ (the first attempt raises
`NeedFetch`, we `await session.dma_read(...)` and run the command again — the executor
validates and walks every list before it moves any data, so a retry has no side
effect); a writable view of message-only memory is a scratch buffer written back with
DMA_WRITE after the command ran.  The result goes back to the worker (`slow_done`),
which posts the CQE: the CQ stays single-writer.

Never blocking the request pipeline: each command is its own asyncio task; the
session's reader resolves DMA replies independently of the request queue.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from nvme.io import IoExecutor
from nvme.memory import DmaFault, GuestMemory, NeedsMessageDma
from nvme.msgwindow import MessageWriteWindows
from nvme.status import Status
from vfio_user.errors import ProtocolError

if TYPE_CHECKING:
    from reactor.nvmefn import NvmeFunction

log = logging.getLogger("vnvmed.slowpath")
MAX_FETCHES = 64


class NeedFetch(NeedsMessageDma):
    pass


class MessageDmaMemory:
    def __init__(self, base: GuestMemory) -> None:
        self.base = base
        self.fetched: dict[tuple[int, int], bytes] = {}
        self.writeback: list[tuple[int, bytearray]] = []

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        try:
            return self.base.view(addr, length, write)
        except NeedFetch:
            raise
        except NeedsMessageDma:
            pass
        if write:
            buf = bytearray(length)
            self.writeback.append((addr, buf))
            return memoryview(buf)
        for (a, n), data in self.fetched.items():
            if a <= addr and addr + length <= a + n:
                return memoryview(data)[addr - a:addr - a + length].toreadonly()
        raise NeedFetch(addr, length, "fetch with DMA_READ")


class SlowPath:
    def __init__(self, fn: "NvmeFunction") -> None:
        self.fn = fn
        self.session: Any = None
        self.tasks: set[asyncio.Task] = set()
        self.count = 0
        self.running: dict[int, int] = {}     # SQ id -> commands of it in progress here
        self.inflight: set[tuple[int, int]] = set()   # (sqid, cid) in progress here
        # slow_done messages for a worker that was dead when they were ready: sent once
        # its replacement has re-parked the commands (reactor/recovery.py)
        self.pending: dict[int, list[dict[str, Any]]] = {}

    def cids(self, sqid: int) -> set[int]:
        return {c for s, c in self.inflight if s == sqid}

    def flush_pending(self, wid: int) -> None:
        link = self.fn.links.get(wid)
        for msg in self.pending.pop(wid, []):
            if link is not None:
                link.send(msg)

    def set_session(self, session: Any) -> None:
        self.session = session

    def busy(self, sqid: int) -> bool:
        return self.running.get(sqid, 0) > 0

    def submit(self, wid: int, sqid: int, sqe: bytes) -> None:
        self.count += 1
        self.running[sqid] = self.running.get(sqid, 0) + 1
        self.inflight.add((sqid, int.from_bytes(sqe[2:4], "little")))
        t = asyncio.ensure_future(self._run(wid, sqid, sqe))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _run(self, wid: int, sqid: int, sqe: bytes) -> None:
        cid = int.from_bytes(sqe[2:4], "little")
        status: int = Status.DATA_TRANSFER_ERROR
        dw0 = 0
        try:
            status, dw0 = await self._execute(sqe)
        except (ProtocolError, ConnectionError, TimeoutError, OSError) as e:
            # The client refused or did not answer our DMA_READ/WRITE: a transfer error.
            log.warning("%s: slow-path command on SQ %d failed: %s", self.fn.name, sqid, e,
                        extra={"ratelimit": "slow-path failure"})
        except Exception:
            # Our bug, not the client's: say so in the log and in the status.
            log.exception("%s: slow-path command on SQ %d: internal error", self.fn.name, sqid)
            status = Status.INTERNAL_ERROR
        done = {"op": "slow_done", "sqid": sqid, "cid": cid, "status": int(status), "dw0": dw0}
        self.inflight.discard((sqid, cid))
        link = self.fn.links.get(wid)
        if link is not None and link.alive:
            link.send(done)
        else:
            self.pending.setdefault(wid, []).append(done)   # worker being replaced
        left = self.running[sqid] - 1
        if left:
            self.running[sqid] = left
        else:
            del self.running[sqid]
            # A Delete I/O SQ parked behind us goes now; its del_sq follows our
            # slow_done on the same ring, so the worker posts this command's CQE first.
            self.fn.ctrl.sq_quiet(sqid)

    async def _execute(self, sqe: bytes) -> tuple[int, int]:
        if self.session is None:
            return Status.DATA_TRANSFER_ERROR, 0
        mem = MessageDmaMemory(MessageWriteWindows(self.fn.mem, self.fn.write_windows))
        ex = IoExecutor(self.fn.namespaces, mem, self.fn.mdts_bytes)
        for _ in range(MAX_FETCHES):
            mem.writeback.clear()
            try:
                res = ex.execute(memoryview(sqe))   # no async namespaces here: never parks
                if res is None:
                    return Status.INTERNAL_ERROR, 0
                status, dw0 = res
            except NeedFetch as f:
                data = await self.session.dma_read(f.addr, f.length)
                mem.fetched[(f.addr, f.length)] = bytes(data)
                continue
            except DmaFault:
                return Status.DATA_TRANSFER_ERROR, 0
            if status == Status.SUCCESS:
                for addr, buf in mem.writeback:
                    await self.session.dma_write(addr, bytes(buf))
                    # Marked after the client answered (the bytes are in guest memory), as
                    # every writer marks (SEAMS S3); a page with no map (fd-less memory)
                    # is the client's to track, and mark() ignores it.
                    dirty = self.fn.mig.dirty
                    if dirty.active:
                        dirty.log.mark(addr, len(buf))
            return status, dw0
        return Status.DATA_TRANSFER_ERROR, 0
