"""The NVMe PCI function a front-end serves: vfio-user device + controller hooks.

This is where the pure pieces meet the processes: `pci.config` answers config space,
`nvme.controller.Controller` owns registers and the admin queue, and every I/O queue
lives in a worker (placement + worker links).  BAR layout (what QEMU maps well):

    BAR0  16 KiB, 64-bit: registers 0x0-0xfff (trapped: REGION_READ/WRITE, 4/8-byte),
          doorbells 0x1000-0x3fff (sparse-mmap area backed by a memfd, so guest
          doorbell writes land in shared memory that workers poll; writes that do
          arrive as REGION_WRITE are stored into the same page and wake the worker)
    BAR4  MSI-X table (QEMU emulates it; never mmapped)   BAR5  MSI-X PBA
    CONFIG 4 KiB extended config space
    9     migration region (v1): register page + data area, see reactor/migctl.py

Doorbell modes (ControllerSpec.doorbells): "mmap" as above; "trapped" offers BAR0 with
no MMAP flag and no sparse area, so every guest doorbell write reaches us as a
REGION_WRITE (QEMU may post them: NO_REPLY).  Each one is stored into the same page
and kicks the worker that owns the queue (or the admin poller), so workers and the
admin poller can sleep without polling: idle costs ~nothing and a wake-up is immediate.

Interrupt routing: MSI-X eventfds (per vector) win over INTx; the routing table is
pushed to workers whenever it changes, so a worker writes the eventfd of the CQ's
vector itself.  The admin CQ (vector 0) is signalled from here.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import dataclasses
import logging
import mmap
import os
from typing import Any, Iterable, Iterator

from nvme.config import ControllerConfig
from nvme.controller import Controller
from nvme.qpair import SQ_DELETE_DRAIN_S
from nvme.msgwindow import LOW_MEMORY, normalize
from nvme.namespace import Namespace
from nvme.qtable import QueueTable, table_bytes
from nvme.regs import RegisterAccessError
from nvme.state import CqState, ShadowDoorbells, SqState
from nvme.status import SCT
from pci.config import PciConfig
from reactor import adminpoll, devstate
from reactor.coordinator import Coordinator, Phase
from reactor.device import DeviceInfo, IrqInfo, RegionInfo
from reactor.guestmem import MappedGuestMemory
from reactor.irqroute import IrqRouter
from reactor.migctl import MigrationController
from reactor.placement import Placement
from reactor.recovery import RecoveryStats, recover
from reactor.slowpath import SlowPath
from reactor.workerlink import WorkerLink
from vfio_user.errors import ProtocolError
from vfio_user.wire import DeviceFlag, Irq, IrqInfoFlag, Region, RegionFlag

import errno

log = logging.getLogger("vnvmed.frontend")
# The guest can toggle CC.EN as fast as it likes: state lines are rate-limited (per line).
_RL_SHUT, _RL_EN, _RL_DIS = ({"ratelimit": k} for k in ("shutdown complete", "controller enabled",
                                                         "controller disabled"))

BAR0_SIZE = 0x4000
DB_OFFSET = 0x1000
NUM_REGIONS = 10          # BAR0-5, ROM, CONFIG, VGA, migration (v1, index 9)
NUM_IRQS = 5


def _ignore_result(fut: "asyncio.Future[dict]") -> None:
    if not fut.cancelled():
        fut.exception()        # retrieved: a replacement that died too is no news


class NvmeFunction:
    def __init__(self, name: str, cfg: ControllerConfig, namespaces: dict[int, Namespace],
                 mdts_bytes: int, quiesce_timeout: float = 2.0, doorbells: str = "mmap",
                 write_windows: Iterable[Iterable[int]] = LOW_MEMORY, bar_fd: int | None = None,
                 qt_fd: int | None = None) -> None:
        if str(doorbells) not in ("mmap", "trapped"):
            raise ValueError(f"doorbell mode {doorbells!r}: use 'mmap' or 'trapped'")
        self.name = name
        self.trapped = str(doorbells) == "trapped"
        self.write_windows = normalize(write_windows)   # read payloads there go by DMA_WRITE
        self.cfg = cfg
        self.mdts_bytes = mdts_bytes
        # A live upgrade hands the running BAR0 memfd over (the client has it mmapped).
        if bar_fd is None:
            bar_fd = os.memfd_create(f"vnvmed-{name}-bar0", os.MFD_CLOEXEC)
            os.ftruncate(bar_fd, BAR0_SIZE)
        self.bar_fd = bar_fd
        self.bar = mmap.mmap(self.bar_fd, BAR0_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.db_words = memoryview(self.bar)[DB_OFFSET:].cast("I")
        # The queue table (nvme.qtable, SEAMS S1): every queue's state, shared with the
        # workers that run the I/O queues (and with whatever process takes them over).
        self.nqueues = (BAR0_SIZE - DB_OFFSET) // 8
        # A front-end restarted after a crash takes the dead one's table (reactor/revive.py).
        fresh = qt_fd is None
        if qt_fd is None:
            qt_fd = os.memfd_create(f"vnvmed-{name}-queues", os.MFD_CLOEXEC)
            os.ftruncate(qt_fd, table_bytes(self.nqueues))
        self.qt_fd = qt_fd
        self.qt_map = mmap.mmap(self.qt_fd, table_bytes(self.nqueues), mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        self.qtable = QueueTable(self.qt_map, self.nqueues, init=fresh)
        self.pci = PciConfig(bar0_size=BAR0_SIZE, msix_vectors=cfg.msix_vectors)
        self.mem = MappedGuestMemory()
        self.namespaces = namespaces
        self.ctrl = Controller(cfg, namespaces, memoryview(self.bar)[DB_OFFSET:], self.mem, self,
                               qtable=self.qtable)
        self.ctrl.live_io = self._worker_io      # SMART (Get Log Page 02h) shows the workers' I/O
        self.links: dict[int, WorkerLink] = {}
        self.placement = Placement([])
        self.coord = Coordinator(self._request, self._send, self._quiesce_timeout, quiesce_timeout)
        self.session: Any = None
        # DMA regions as mapped by the client, with our own dup of each fd, so a worker
        # that joins later (restart) gets the same memory map.
        self.dma_regions: dict[tuple[int, int], tuple[int, int | None, bool, bool]] = {}
        self.irqs = IrqRouter(cfg.msix_vectors, lambda: self.pci.intx_disabled)
        self.shadow = ShadowDoorbells()
        self.coalescing: tuple[int, int, list[int]] | None = None
        self.admin_kick = asyncio.Event()
        self.slow = SlowPath(self)
        self.recovery = RecoveryStats()
        # wid -> {sqid: CIDs} a replacement worker died before adopting (reactor/recovery.py)
        self.recovery_carry: dict[int, dict[int, list[int]]] = {}
        self.fatal_reason: str | None = None
        self.fingerprints: dict[int, str] = {}     # nsid -> operator's backend fingerprint
        self._batch: list[tuple[int, Any]] | None = None   # worker_batch() in progress
        self.qlock = asyncio.Lock()
        self.mig = MigrationController(self)
        self.rescue: Any = None          # reactor/rescue.Rescue once the front-end records

    # ------------------------------------------------------------------ workers
    def add_worker(self, link: WorkerLink) -> None:
        self.links[link.wid] = link
        self.placement.set_workers(sorted(self.links))
        if self.coord.joined(link.wid):
            # We are quiesced (a DMA map, reset or hold in progress): the replacement
            # pauses before it gets any queue and is resumed with the others.
            link.request({"op": "quiesce"}).add_done_callback(_ignore_result)
        link.send({"op": "hello", "db_size": BAR0_SIZE, "nqueues": self.nqueues, "mdts": self.mdts_bytes,
                   "trapped": self.trapped,
                   "wwin": [list(w) for w in self.write_windows],
                   "ns": [self._ns_wire(ns) for ns in self.namespaces.values()]}, [self.bar_fd, self.qt_fd])
        for (iova, size), (offset, fd, r, w) in self.dma_regions.items():
            link.send(self._map_msg(iova, size, offset, fd, r, w), [fd] if fd is not None else None)
        self._push_routes_to(link)
        if self.shadow.enabled:
            link.send({"op": "shadow", "dbbuf": self.shadow.dbbuf, "eventidx": self.shadow.eventidx})
        if self.coalescing is not None:
            thr, t, ex = self.coalescing
            link.send({"op": "coalesce", "thr": thr, "time": t, "exempt": ex})
        recover(self, link)        # queues a previous process of this worker ran, if any
        self.admin_kick.set()      # the admin poller re-arms its watch (deep idle) on min(links)

    def worker_lost(self, wid: int) -> None:
        """A worker died.  Its queues stay placed on `wid`: the replacement the supervisor
        starts re-attaches them from shared state when it joins (reactor/recovery.py)."""
        self.links.pop(wid, None)
        self.placement.set_workers(sorted(self.links))
        self.admin_kick.set()      # it may have been watching our admin doorbells

    @staticmethod
    def _ns_wire(ns: Namespace) -> dict[str, Any]:
        i = ns.info
        return {"nsid": i.nsid, "block_size": i.block_size, "blocks": i.blocks,
                "read_only": i.read_only, "backend": i.backend}

    def _request(self, wid: int, msg: dict) -> "asyncio.Future[dict]":
        fut = self.links[wid].request(msg)
        if msg.get("op") == "quiesce":        # the migration's phase trace (reactor/migctl.py)
            fut.add_done_callback(functools.partial(self._quiesce_acked, wid))
        return fut

    def _quiesce_acked(self, wid: int, fut: "asyncio.Future[dict]") -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.mig.worker_acked(wid, "quiesce", fut.result())

    def _send(self, wid: int, msg: dict) -> None:
        link = self.links.get(wid)
        if link is not None:
            if self.mig.trace_resume and msg.get("op") == "resume":
                msg = dict(msg, trace=1)      # the worker reports its first poll
            link.send(msg)

    def _broadcast(self, msg: dict, fds: list[int] | None = None) -> None:
        for link in self.links.values():
            link.send(dict(msg), fds)

    def _sync(self, wid: int, msg: dict, timeout: float = 2.0) -> dict:
        if self._batch is not None:
            link = self.links.get(wid)
            if link is not None:
                self._batch.append((wid, link.request(msg)))
            return {}
        try:
            return self.links[wid].request_sync(msg, timeout=timeout)
        except (ConnectionError, KeyError):
            # The worker died (reactor/workerlink.py): nothing to wait for.  Its
            # replacement re-attaches every queue placed on it from the queue table
            # (reactor/recovery.py), so a queue created or deleted meanwhile is right.
            return {}
        except TimeoutError as e:       # alive but not answering: cannot be trusted
            self._fatal(f"worker {wid}: {e}")
            return {}

    @contextlib.contextmanager
    def worker_batch(self) -> Iterator[None]:
        """Queue messages to workers without waiting for each (a restore creates many
        queues on paused workers).  Nobody waits at the end either: a paused worker acts
        on its ring in order, so these messages are done before the RESUME that follows
        them; an error ack, should one come, makes the controller fatal (CSTS.CFS) -
        the destination's checks (rings mapped, records valid) come first, so that is
        our bug, reported as such."""
        self._batch = []
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            for wid, fut in batch:
                fut.add_done_callback(lambda f, w=wid: self._batch_ack(w, f))

    def _batch_ack(self, wid: int, fut: "asyncio.Future[dict]") -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        why = str(err) if err is not None else fut.result().get("error")
        if not why:
            self.mig.worker_acked(wid, "queue", fut.result())
        if why:
            log.error("%s: worker %d refused a restored queue: %s", self.name, wid, why)
            self._fatal(f"worker {wid}: {why}")

    def _quiesce_timeout(self, late: list[int]) -> None:
        self._fatal(f"workers {late} did not quiesce in time")

    def _fatal(self, reason: str) -> None:
        self.ctrl.fail(reason)   # CSTS.CFS; calls back fatal() below

    def on_worker_message(self, wid: int, msg: dict) -> None:
        op = msg.get("op")
        if op == "dberr":
            self.ctrl.doorbell_error(int(msg["info"]), int(msg["qid"]))
        elif op == "slow":
            self.slow.submit(wid, int(msg["sqid"]), bytes(msg["sqe"]))
        elif op == "fault":
            self._fatal(f"worker {wid}: {msg.get('reason')}")
        elif op == "ioerr":
            self._io_errors(msg)
        elif op == "admin_kick":        # the worker watching our admin doorbells saw a write
            self.admin_kick.set()
        elif op == "trace":             # first poll after a migration's resume (reactor/migctl.py)
            self.mig.worker_trace(wid, msg)
        else:
            log.error("%s: unexpected message %r from worker %d", self.name, op, wid)

    def _io_errors(self, msg: dict) -> None:
        """Failed I/O commands from a worker: Error Information log entries (log page
        01h; no AER, spec 5.14.1.1) and SMART Media and Data Integrity Errors."""
        media = 0
        for sqid, cid, status, lba, nsid in msg.get("errs") or ():
            self.ctrl.log_error(int(sqid), int(cid), int(status), lba=int(lba), nsid=int(nsid))
            if (int(status) >> 8) & 7 == SCT.MEDIA:
                media += 1
        if media:
            self.ctrl.add_io_stats(media_errors=media)
        if msg.get("dropped"):
            log.info("%s: %d more failed I/O commands not entered in the error log",
                     self.name, msg["dropped"], extra={"ratelimit": f"{self.name}:ioerr"})

    # ------------------------------------------------------------------ vfio-user device
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(flags=DeviceFlag.RESET | DeviceFlag.PCI, num_regions=NUM_REGIONS,
                          num_irqs=NUM_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        rw = RegionFlag.READ | RegionFlag.WRITE
        if index == Region.BAR0:
            if self.trapped:
                # No mmap area: the client must send every doorbell write to us.
                return RegionInfo(size=BAR0_SIZE, flags=rw)
            return RegionInfo(size=BAR0_SIZE, flags=rw | RegionFlag.MMAP,
                              sparse=((DB_OFFSET, BAR0_SIZE - DB_OFFSET),), fd=self.bar_fd)
        if index in (Region.BAR4, Region.BAR5):
            return RegionInfo(size=0x1000, flags=rw)
        if index == Region.CONFIG:
            return RegionInfo(size=0x1000, flags=rw)
        if index == Region.MIGRATION:
            return self.mig.region_info()
        if 0 <= index < NUM_REGIONS:
            return RegionInfo(size=0, flags=0)
        raise ProtocolError(errno.EINVAL, f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        counts = {Irq.INTX: 1, Irq.MSI: 0, Irq.MSIX: self.cfg.msix_vectors, Irq.ERR: 1, Irq.REQ: 1}
        if index not in counts:
            raise ProtocolError(errno.EINVAL, f"no irq index {index}")
        flags = IrqInfoFlag.EVENTFD
        if index == Irq.INTX:
            flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        return IrqInfo(count=counts[Irq(index)], flags=flags)

    def needs_quiesce(self, region: int, offset: int, data: bytes) -> bool:
        if region == Region.MIGRATION:
            return self.mig.region_needs_quiesce(offset, data)
        if region != Region.BAR0 or len(data) not in (4, 8):
            return False
        return self.ctrl.register_write_tears_down(offset, len(data), int.from_bytes(data, "little"))

    def feature_needs_quiesce(self, flags: int, data: bytes) -> bool:
        return self.mig.feature_needs_quiesce(flags, data)

    async def quiesce(self) -> None:
        # qlock pairs quiesce() with resume() so an operator's hold (migctl.hold) never
        # interleaves with a request's bracket.
        await self.qlock.acquire()
        try:
            if self.mig.held:
                return      # stopped for migration: already drained (reactor/migctl.py)
            await self.coord.quiesce(self.mig.quiesce_set(self.placement.busy_workers()))
        except BaseException:
            self.qlock.release()
            raise

    async def resume(self) -> None:
        try:
            if self.mig.held:
                return
            # After a late worker (coordinator FAULTED) only a reset that cleared CFS resumes.
            self.coord.resume(recovered=not self.ctrl.fatal)
            if self.mig.trace_resume:
                self.mig.trace_resume = False
                self.mig.trace.mark("resume sent")
            self.admin_kick.set()
        finally:
            if self.qlock.locked():
                self.qlock.release()

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        if region == Region.CONFIG:
            return self.pci.read(offset, count)
        if region == Region.BAR0:
            if offset < DB_OFFSET:
                if count not in (4, 8) or offset % 4 or offset + count > DB_OFFSET:
                    raise ProtocolError(errno.EINVAL, f"BAR0 register read of {count} bytes at {offset:#x}")
                # A bad access is the client's (EINVAL); anything else is our bug and
                # reaches the pipeline, which logs it and answers EIO.
                try:
                    return self.ctrl.read_register(offset, count).to_bytes(count, "little")
                except RegisterAccessError as e:
                    raise ProtocolError(errno.EINVAL, str(e)) from None
            # Doorbells are write-only (spec); reads return 0 rather than stale values.
            self._check_doorbell_access(offset, count)
            return bytes(count)
        if region in (Region.BAR4, Region.BAR5):
            if offset < 0 or count <= 0 or offset + count > 0x1000:
                raise ProtocolError(errno.EINVAL, "MSI-X BAR access out of range")
            return bytes(count)  # table is emulated by the client; nothing pending in PBA
        if region == Region.MIGRATION:
            return self.mig.region_read(offset, count)
        raise ProtocolError(errno.EINVAL, f"region {region} is not readable")

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        if region == Region.CONFIG:
            self.pci.write(offset, data)
            self._update_routes()
            return
        if region == Region.BAR0:
            n = len(data)
            if offset < DB_OFFSET:
                if n not in (4, 8) or offset % 4 or offset + n > DB_OFFSET:
                    raise ProtocolError(errno.EINVAL, f"BAR0 register write of {n} bytes at {offset:#x}")
                before = self.ctrl.csts
                try:
                    self.ctrl.write_register(offset, n, int.from_bytes(data, "little"))
                except RegisterAccessError as e:
                    raise ProtocolError(errno.EINVAL, str(e)) from None
                self._log_csts(before, self.ctrl.csts)
                self.admin_kick.set()
                return
            self._check_doorbell_access(offset, n)
            if n != 4:
                raise ProtocolError(errno.EINVAL, "doorbells take 4-byte writes only")
            # One aligned 32-bit store: workers read this word at any instant.
            idx = (offset - DB_OFFSET) // 4
            self.db_words[idx] = int.from_bytes(data, "little")
            qid = idx // 2
            if qid == 0:
                self.admin_kick.set()
            else:
                w = self.placement.worker_of_sq(qid) if idx % 2 == 0 else self.placement.worker_of_cq(qid)
                if w is not None and w in self.links:
                    self.links[w].chan.kick()
                elif self.trapped:
                    # No queue behind it (Write to Invalid Doorbell Register): the admin
                    # poller's doorbell scan reports it; in trapped mode nothing else wakes it.
                    self.admin_kick.set()
            return
        if region in (Region.BAR4, Region.BAR5):
            if offset < 0 or offset + len(data) > 0x1000:
                raise ProtocolError(errno.EINVAL, "MSI-X BAR access out of range")
            return
        if region == Region.MIGRATION:
            self.mig.region_write(offset, data)
            return
        raise ProtocolError(errno.EINVAL, f"region {region} is not writable")

    def _log_csts(self, before: int, after: int) -> None:
        """One line per controller state change, for operators (CSTS: RDY, CFS, SHST)."""
        if before == after:
            return
        if after & 0xC != before & 0xC and (after >> 2) & 3 == 2:
            log.info("%s: shutdown complete (CSTS.SHST=10b)", self.name, extra=_RL_SHUT)
        elif after & 1 and not before & 1:
            log.info("%s: controller enabled (CSTS.RDY=1)", self.name, extra=_RL_EN)
        elif before & 1 and not after & 1:
            log.info("%s: controller disabled", self.name, extra=_RL_DIS)

    @staticmethod
    def _check_doorbell_access(offset: int, count: int) -> None:
        if offset % 4 or offset < DB_OFFSET or offset + count > BAR0_SIZE or count <= 0:
            raise ProtocolError(errno.EINVAL, f"doorbell access of {count} bytes at {offset:#x}")

    # DMA: called by the pipeline while quiesced ------------------------------------
    def _map_msg(self, iova: int, size: int, offset: int, fd: int | None, r: bool, w: bool) -> dict:
        return {"op": "map", "iova": iova, "size": size, "off": offset, "r": r, "w": w}

    def dma_mapped(self, iova: int, size: int, offset: int, fd: int | None,
                   readable: bool, writable: bool) -> None:
        log.debug("%s: DMA map %#x+%#x offset %#x fd %s %s%s", self.name, iova, size, offset, fd,
                  "r" if readable else "-", "w" if writable else "-")
        self.dma_regions[(iova, size)] = (offset, os.dup(fd) if fd is not None else None,
                                          readable, writable)
        self._broadcast(self._map_msg(iova, size, offset, fd, readable, writable),
                        [fd] if fd is not None else None)
        self.mig.dirty.mapped(iova, size, fd, writable)
        self.mig.try_pending_restore()

    def dma_unmapped(self, iova: int, size: int) -> None:
        log.debug("%s: DMA unmap %#x+%#x", self.name, iova, size)
        entry = self.dma_regions.pop((iova, size), None)
        if entry is not None and entry[1] is not None:
            os.close(entry[1])
        self.mig.dirty.unmapped(iova, size)
        self._broadcast({"op": "unmap", "iova": iova, "size": size})

    # IRQs -----------------------------------------------------------------------------
    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        self.irqs.set_irqs(index, flags, start, count, fds, data)
        self._update_routes()

    def _update_routes(self) -> None:
        if not self.irqs.refresh():
            return
        # Synchronous: once SET_IRQS (or the config write) is answered, no worker may
        # still signal an eventfd the client just de-assigned (it polls its queues
        # before it reads its ring, so a plain message could lose that race).
        for wid, link in list(self.links.items()):
            try:
                self._push_routes_to(link, wait=True)
            except ConnectionError:
                pass            # died: its replacement gets the routes when it joins
            except TimeoutError as e:
                self._fatal(f"worker {wid}: interrupt routes not applied: {e}")

    def _push_routes_to(self, link: WorkerLink, wait: bool = False) -> None:
        msg, fds = self.irqs.message()
        if wait:
            link.request_sync(msg, fds or None)
        else:
            link.send(msg, fds or None)

    # ControllerHooks ------------------------------------------------------------------
    def irq(self, vector: int) -> None:
        self.irqs.fire(vector)

    def io_cq_created(self, cq: CqState) -> None:
        # "Fewest queues first" counts every controller's queues: ask each worker its load
        # (queue creation is rare; a worker that does not answer keeps its last figure).
        # A batch (restore) places with the figures it has: no round trip per queue.
        for wid, link in list(self.links.items()) if self._batch is None else ():
            try:
                self.placement.report(wid, int(link.request_sync({"op": "load"}, timeout=0.5)["queues"]))
            except (TimeoutError, ConnectionError, KeyError, TypeError, ValueError):
                pass
        w = self.placement.place_cq(cq.cqid)
        self.qtable.put_cq(cq)          # the worker runs the queue from its record
        self._sync(w, {"op": "add_cq", "cqid": cq.cqid})

    def io_sq_created(self, sq: SqState) -> None:
        w = self.placement.place_sq(sq.sqid, sq.cqid)
        self.qtable.put_sq(sq)
        self._sync(w, {"op": "add_sq", "sqid": sq.sqid})

    def io_sq_deleted(self, sqid: int) -> None:
        w = self.placement.remove_sq(sqid)
        if w is not None and w in self.links:
            # The worker may drain parked backend commands for SQ_DELETE_DRAIN_S first:
            # waiting only as long would make a slow drain look like a hung worker (CFS).
            self._sync(w, {"op": "del_sq", "sqid": sqid}, timeout=SQ_DELETE_DRAIN_S + 2.0)
        self.qtable.clear_sq(sqid)      # ours again (and gone)

    def sq_busy(self, sqid: int) -> bool:
        return self.slow.busy(sqid)

    def io_cq_deleted(self, cqid: int) -> None:
        w = self.placement.remove_cq(cqid)
        if w is not None and w in self.links:
            self._sync(w, {"op": "del_cq", "cqid": cqid})
        self.qtable.clear_cq(cqid)

    def shadow_doorbells_changed(self, shadow: ShadowDoorbells) -> None:
        self.shadow = shadow
        self._broadcast({"op": "shadow", "dbbuf": shadow.dbbuf, "eventidx": shadow.eventidx})

    def coalescing_changed(self, threshold: int, time_100us: int, exempt_vectors: set[int]) -> None:
        self.coalescing = (threshold, time_100us, sorted(exempt_vectors))
        self._broadcast({"op": "coalesce", "thr": threshold, "time": time_100us,
                         "exempt": sorted(exempt_vectors)})

    def fatal(self, reason: str) -> None:
        log.error("%s: controller fatal: %s", self.name, reason, extra={"ratelimit": "controller fatal"})
        self.fatal_reason = reason

    # lifecycle --------------------------------------------------------------------------
    def reset(self) -> None:
        self.mig.reset(resume=False)     # inside the pipeline's quiesce bracket
        self.ctrl.reset()
        self.pci.reset()
        self._update_routes()

    # Front-end crash recovery (reactor/rescue.py): the session's journal hooks.
    @property
    def journaling(self) -> bool:
        """The session hands requests over before they leave the socket (rescue.py)."""
        return self.rescue is not None and self.rescue.enabled

    def requests_peeked(self, raws: list[bytes], fds: list[int]) -> list[int]:
        """Whole messages still in the socket (`fds` on the last): journaled as not
        taken yet; their seqs."""
        assert self.rescue is not None
        return self.rescue.peeked(raws, fds)

    def requests_taken(self) -> None:
        """The messages last peeked left the socket (one recvmsg)."""
        if self.rescue is not None:
            self.rescue.taken()

    def request_read(self, frame: Any) -> None:
        """A request came off the socket: journaled before it is queued."""
        if self.rescue is not None:
            self.rescue.journal(frame)

    def request_done(self, seq: int, command: int, msg: Any, reply: bytes | None) -> None:
        """A vfio-user request was handled, its reply not sent yet (reactor/pipeline.py):
        the rescue package and the checkpoint must show its effect (and the reply) first."""
        if self.rescue is None:
            return
        doorbell = (getattr(msg, "region", None) == Region.BAR0
                    and getattr(msg, "offset", 0) >= DB_OFFSET)
        self.rescue.request_done(seq, command, doorbell, reply)

    def request_answered(self, seq: int) -> None:
        if self.rescue is not None:
            self.rescue.answered(seq)

    def client_connected(self, session: Any) -> None:
        self.session = session
        self.mem = session.memory
        self.ctrl.set_memory(self.mem)
        self.mig.dirty.memory_changed()
        self.slow.set_session(session)
        self.admin_kick.set()          # the admin poller sleeps without a timer while no guest

    def client_disconnected(self) -> None:
        # The next client is a new VM (or a restarted QEMU): it starts from power-on.
        # Queues are torn down before the memory they live in goes away.
        try:
            self.ctrl.reset()
        except Exception:
            log.exception("%s: reset on disconnect", self.name)
        self.mig.dirty.stop()
        self.mig.reset(resume=True)      # queues are gone: a held controller may run again
        self.pci.reset()
        self._broadcast({"op": "unmap", "all": True})
        if self.coord.phase is Phase.FAULTED:     # the reset above ended the fault
            self.coord.resume(recovered=True)
        self.irqs.clear()
        self._update_routes()
        self.session = None
        self.slow.set_session(None)
        old, self.mem = self.mem, MappedGuestMemory()
        self.ctrl.set_memory(self.mem)
        if self.rescue is not None:     # the supervisor lets go of the connection too
            try:
                self.rescue.send()
                self.rescue.checkpoint()
            except Exception:
                log.exception("%s: rescue package after a disconnect", self.name)
        # The session unmapped its regions while the admin queue still viewed its rings
        # (a client killed with the controller enabled), so those mappings could only be
        # parked (reactor/guestmem.py zombies); the reset above dropped the views: close
        # them now.  Left to the garbage collector, each session kept 1-5 DMA fds open
        # (found by the stress suite, issue 12; tests/integration/test_fd_settle.py).
        if old.collect():
            log.warning("%s: %d guest memory mappings still in use after the session ended",
                        self.name, len(old.zombies))

    # migration (reactor/migctl.py, reactor/devstate.py) ----------------------------------
    def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        return self.mig.device_feature(flags, data, argsz)

    def mig_data_read(self, size: int) -> bytes:
        return self.mig.mig_data_read(size)

    def mig_data_write(self, data: bytes) -> None:
        self.mig.mig_data_write(data)

    def dirty_pages(self, msg: Any, caps: Any) -> bytes:
        return self.mig.dirty_pages(msg, caps)

    def unmap_dirty_bitmap(self, iova: int, size: int, pgsize: int, bitmap_size: int) -> bytes:
        return self.mig.unmap_dirty_bitmap(iova, size, pgsize, bitmap_size)

    def save_state(self) -> bytes:
        """SEAMS S4: the controller as one snapshot blob (stopped: see reactor/devstate.py)."""
        return devstate.save_state(self)

    def load_state(self, data: bytes) -> None:
        """SEAMS S4: restore a snapshot blob (stopped; raises SnapshotError, see devstate)."""
        devstate.load_state(self, data)

    # management --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        regs = {"cc": self.ctrl.read_register(0x14, 4), "csts": self.ctrl.read_register(0x1C, 4)}
        return {"client_connected": self.session is not None,
                "enabled": bool(regs["cc"] & 1), "ready": bool(regs["csts"] & 1),
                "fatal": bool(regs["csts"] & 2) or self.fatal_reason is not None,
                "fatal_reason": self.fatal_reason, "csts": regs["csts"],
                "namespaces": [{"nsid": ns.info.nsid, "block_size": ns.info.block_size,
                                "blocks": ns.info.blocks, "size": ns.info.blocks * ns.info.block_size,
                                "kind": ns.info.backend.get("kind"), "read_only": ns.info.read_only}
                               for ns in self.namespaces.values()],
                "queues": {str(sq): w for sq, w in ((sq, self.placement.worker_of_sq(sq))
                                                    for sq in self.placement.sq_cq)},
                "slow_commands": self.slow.count, "quiesces": self.coord.count,
                "migration": self.mig.info()}

    def add_namespace(self, ns: Namespace) -> None:
        self._broadcast({"op": "ns_add", "ns": self._ns_wire(ns)})
        self.namespaces[ns.info.nsid] = ns
        self.ctrl.add_namespace(ns)

    def remove_namespace(self, nsid: int) -> None:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise ValueError(f"no namespace {nsid}")
        self.ctrl.remove_namespace(nsid)
        self.namespaces.pop(nsid, None)
        self._broadcast({"op": "ns_del", "nsid": nsid})
        ns.backend.close()

    def resize_namespace(self, ns: Namespace) -> None:
        """Replace namespace ns.nsid by `ns` (same NSID and block size, new capacity).

        Workers get the new record as `ns_add` (which replaces) and we wait for each
        ack, so once this returns no worker bounds I/O by the old size any more: the
        supervisor may then shrink a backing file without a worker reading past its
        end.  The host learns through a Namespace Attribute Changed AER and the
        Changed Namespace List log (controller.resize_namespace).
        """
        nsid = ns.info.nsid
        old = self.namespaces.get(nsid)
        if old is None:
            raise ValueError(f"no namespace {nsid}")
        if old.info.block_size != ns.info.block_size:
            raise ValueError(f"namespace {nsid}: block size {ns.info.block_size} differs from "
                             f"{old.info.block_size}; a resize keeps the LBA format")
        wire = self._ns_wire(ns)
        for wid, link in list(self.links.items()):
            try:
                link.request_sync({"op": "ns_add", "ns": dict(wire)})
            except ConnectionError:
                pass            # died: its replacement gets the namespaces when it joins
            except TimeoutError as e:
                # A worker that cannot take the new size cannot be trusted with the old one.
                self._fatal(f"worker {wid} did not take the resized namespace {nsid}: {e}")
        self.namespaces[nsid] = ns
        self.ctrl.namespaces[nsid] = ns
        self.ctrl.resize_namespace(nsid)
        old.backend.close()

    def _worker_io(self, timeout: float = 0.5) -> dict[str, int]:
        """The read/write command and byte counts of this controller's worker slots."""
        keys = ("read_commands", "write_commands", "bytes_read", "bytes_written")
        tot = dict.fromkeys(keys, 0)
        for wid, link in sorted(self.links.items()):
            try:
                st = link.request_sync({"op": "stats"}, timeout=timeout).get("stats") or {}
            except (TimeoutError, ConnectionError) as e:
                log.warning("%s: worker %d gave no I/O counters for SMART: %s", self.name, wid, e)
                continue
            for k in keys:
                tot[k] += int(st.get(k) or 0)
        return tot

    def stats(self, timeout: float = 1.0) -> dict[str, Any]:
        """Counters for `vnvmectl stats`: controller, per I/O queue, per worker slot.

        Blocks the front-end loop for at most `timeout` per worker (a management
        request, rare); a worker that does not answer is reported, not waited for.
        """
        s = self.ctrl.stats
        ctrl: dict[str, Any] = {"read_commands": s.read_commands, "write_commands": s.write_commands,
                                "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                                "media_errors": s.media_errors, "slow_commands": self.slow.count,
                                "quiesces": self.coord.count, "commands": 0, "doorbell_errors": 0,
                                "recovery": dataclasses.asdict(self.recovery)}
        queues: dict[str, dict[str, Any]] = {}
        workers: dict[str, Any] = {}
        for wid, link in sorted(self.links.items()):
            try:
                ack = link.request_sync({"op": "stats"}, timeout=timeout)
            except (TimeoutError, ConnectionError) as e:
                workers[str(wid)] = {"error": str(e)}
                continue
            st = ack.get("stats") or {}
            workers[str(wid)] = dict(st)
            ctrl["commands"] += int(st.get("commands") or 0)
            ctrl["doorbell_errors"] += int(st.get("dberr") or 0)
            # Counters a worker may add later (per-command bytes, errors, a log2 latency
            # histogram) are summed here as they appear; nothing to change on this side.
            for k in ("read_commands", "write_commands", "bytes_read", "bytes_written",
                      "media_errors", "io_errors"):
                if isinstance(st.get(k), int):
                    ctrl[k] = ctrl.get(k, 0) + st[k]
            hist = st.get("lat_log2_ns")
            if isinstance(hist, list):
                acc = ctrl.setdefault("lat_log2_ns", [])
                acc.extend([0] * (len(hist) - len(acc)))
                for i, n in enumerate(hist):
                    acc[i] += int(n)
        # Queue progress straight from the queue table (SEAMS S1): no worker round trip,
        # and a worker that does not answer still shows where its queues stand.
        for sqid in sorted(self.placement.sq_cq):
            sq = self.qtable.get_sq(sqid)
            if sq is None:
                continue
            cq = self.qtable.get_cq(sq.cqid)
            queues[str(sqid)] = {
                "worker": self.placement.worker_of_sq(sqid), "cqid": sq.cqid, "depth": sq.size,
                "sq_head": sq.head, "sq_tail": sq.tail,
                # entries the host has submitted that we have not fetched yet
                "pending": (sq.tail - sq.head) % sq.size if sq.size else 0,
                "cq_head": cq.head if cq else None, "cq_tail": cq.tail if cq else None,
                "broken": sq.broken}
        return {"controller": ctrl, "queues": queues, "workers": workers,
                "errors_logged": self.ctrl.errlog.count, "migration": self.mig.info()}

    # the admin poller (reactor/adminpoll.py) ----------------------------------------------
    async def admin_loop(self, **kw: float) -> None:
        await adminpoll.admin_loop(self, **kw)

    def close(self) -> None:
        self.mig.close()
        for link in self.links.values():
            try:
                link.send({"op": "bye"})
            except Exception:
                pass
        self.irqs.clear()
