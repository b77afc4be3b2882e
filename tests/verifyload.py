"""Verified random I/O from a user-space "guest", in a thread: the migration tests' load.

Theory of operation
-------------------
`VerifiedLoad` drives N I/O queue pairs of a `HostNvme` at queue depth QD with 4 KiB
random reads and writes over the namespace, entirely through shared memory (SQEs into
guest RAM, doorbells into the mmapped BAR0 page, completions polled by phase) - the
way a guest's driver does, so it keeps running while the test's main thread talks to
the daemons over vfio-user sockets.

Checks, all recorded in `errors` (the test asserts it is empty):
- every command completes exactly once: a completion must name a CID in flight on
  that queue (CIDs count up mod 2^16, so a duplicate or stale completion is caught),
  with SQID = the queue; after `stop()` nothing may stay in flight;
- every command succeeds (status 0);
- data verifies: a write fills its 4 KiB block with (slot, version) and the model
  records the version when the write completes; a read must return exactly the
  model's block (never-written blocks read as zeroes).  Blocks with a command in
  flight are never picked again until it completes, so the model is exact.

`pause()` / `resume()` model a VM that is stopped (no submissions, no reaping, no
doorbell writes) - what QEMU does to the guest around the blackout.  `switch(nvme)`
moves the guest to another device (the destination's BAR0) while paused.
"""
from __future__ import annotations

import random
import struct
import threading
import time
from dataclasses import dataclass, field

from benchmarks.hostnvme import HostNvme

BLOCK = 4096
_SQE = struct.Struct("<BBHIQQQQ6I")
OPC_WRITE, OPC_READ = 0x01, 0x02


def pattern(slot: int, version: int) -> bytes:
    if version == 0:
        return bytes(BLOCK)
    return struct.pack("<QQ", slot, version) * (BLOCK // 16)


@dataclass(slots=True)
class _Q:
    qid: int
    depth: int
    sq: int
    cq: int
    bufs: list[int]
    tail: int = 0
    head: int = 0
    phase: int = 1
    next_cid: int = 0
    inflight: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # cid -> op, slot, ver, buf
    free: list[int] = field(default_factory=list)


class VerifiedLoad:
    def __init__(self, nvme: HostNvme, nsid: int, ns_bytes: int, block_size: int = 512,
                 nqueues: int = 4, qd: int = 32, seed: int = 1, write_ratio: float = 0.5) -> None:
        self.nvme = nvme
        self.nsid = nsid
        self.lba_per_block = BLOCK // block_size
        self.slots = ns_bytes // BLOCK
        self.nqueues = nqueues
        self.qd = qd
        self.rng = random.Random(seed)
        self.write_ratio = write_ratio
        self.model: dict[int, int] = {}
        self.busy: set[int] = set()
        self.version = 0
        self.qs: list[_Q] = []
        self.errors: list[str] = []
        self.submitted = self.completed = self.reads_verified = self.writes_done = 0
        self._pause = threading.Event()
        self._paused = threading.Event()
        # Cleared while paused: the load thread blocks on it instead of polling the flag
        # (stopped vCPUs run nothing; a thread waking every 200 us took CPU from the very
        # processes a migration's blackout waits for on the 2-core test machine).
        self._go = threading.Event()
        self._go.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # -- set-up (main thread, before start) ---------------------------------------------
    def create_queues(self, first_qid: int = 1) -> None:
        n = self.nvme
        for i in range(self.nqueues):
            qid = first_qid + i
            hq = n.create_io_queue(qid, self.qd + 1)
            bufs = [n.ram.alloc(BLOCK) for _ in range(self.qd)]
            self.qs.append(_Q(qid, self.qd + 1, hq.sq, hq.cq, bufs, free=list(range(self.qd))))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="verified-load", daemon=True)
        self._thread.start()

    # -- control (main thread) -----------------------------------------------------------
    def pause(self, timeout: float = 5.0) -> None:
        self._paused.clear()
        self._go.clear()
        self._pause.set()
        if not self._paused.wait(timeout):
            raise TimeoutError("the load did not pause")

    def resume(self) -> None:
        self._pause.clear()
        self._go.set()

    def switch(self, nvme: HostNvme) -> None:
        """The guest now runs against `nvme` (same RAM, same queues): call while paused."""
        assert self._pause.is_set()
        self.nvme = nvme

    def stop(self, drain_timeout: float = 10.0) -> None:
        self._stop.set()
        self._pause.clear()
        self._go.set()
        if self._thread is not None:
            self._thread.join(drain_timeout + 5)
        left = sum(len(q.inflight) for q in self.qs)
        if left:
            self.errors.append(f"{left} commands never completed")
        if self.failure is not None:
            raise self.failure

    def wait_completions(self, n: int, timeout: float = 30.0) -> None:
        """Block until `n` more commands completed (the load makes progress)."""
        target = self.completed + n
        deadline = time.monotonic() + timeout
        while self.completed < target:
            if self.failure is not None:
                raise self.failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"load stalled: {self.completed}/{target} completions; "
                                   f"errors {self.errors[:3]}")
            time.sleep(0.005)

    def summary(self) -> dict:
        return {"submitted": self.submitted, "completed": self.completed,
                "reads_verified": self.reads_verified, "writes": self.writes_done,
                "errors": len(self.errors)}

    # -- the guest (load thread) ----------------------------------------------------------
    def _main(self) -> None:
        try:
            self._run()
        except BaseException as e:       # surfaced by stop()/wait_completions()
            self.failure = e

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            if self._pause.is_set():
                self._paused.set()
                self._go.wait()
                continue
            stopping = self._stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + 10.0
            nvme = self.nvme
            ram, db = nvme.ram, nvme.db
            assert db is not None, "the load needs the mmapped doorbell page"
            mm = ram.mm
            words = memoryview(mm).cast("I")
            busy = 0
            for q in self.qs:
                busy += self._reap(q, words, db, mm, ram.base)
                if not stopping:
                    busy += self._submit(q, db, mm, ram.base)
            words.release()
            if stopping and not any(q.inflight for q in self.qs):
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            if not busy:
                time.sleep(0)

    def _reap(self, q: _Q, words: memoryview, db: memoryview, mm, base: int) -> int:
        n = 0
        cqw = (q.cq - base) >> 2
        while True:
            i = cqw + (q.head << 2)
            dw3 = words[i + 3]
            if (dw3 >> 16) & 1 != q.phase:
                break
            dw2 = words[i + 2]
            cid = dw3 & 0xFFFF
            status = (dw3 >> 17) & 0x7FFF
            q.head += 1
            if q.head == q.depth:
                q.head = 0
                q.phase ^= 1
            n += 1
            self._complete(q, cid, status, dw2 >> 16, mm, base)
        if n:
            db[(0x1000 + 8 * q.qid + 4) >> 2] = q.head
        return n

    def _complete(self, q: _Q, cid: int, status: int, sqid: int, mm, base: int) -> None:
        ent = q.inflight.pop(cid, None)
        if ent is None:
            self.errors.append(f"queue {q.qid}: completion for CID {cid} not in flight "
                               f"(duplicate or stale)")
            return
        op, slot, ver, b = ent
        q.free.append(b)
        self.busy.discard(slot)
        self.completed += 1
        if sqid != q.qid:
            self.errors.append(f"queue {q.qid}: CID {cid} completed with SQID {sqid}")
        if status:
            self.errors.append(f"queue {q.qid}: CID {cid} op {op} slot {slot} status {status:#x}")
            if op == OPC_WRITE:
                self.model.pop(slot, None)   # unknown now; never verified again
                self.busy.add(slot)
            return
        if op == OPC_WRITE:
            self.model[slot] = ver
            self.writes_done += 1
        else:
            off = q.bufs[b] - base
            exp = self.model.get(slot, 0)
            if mm[off:off + BLOCK] != pattern(slot, exp):
                got = struct.unpack_from("<QQ", mm, off)
                self.errors.append(f"queue {q.qid}: read of slot {slot} expected version {exp}, "
                                   f"got (slot, version) {got}")
            self.reads_verified += 1

    def _submit(self, q: _Q, db: memoryview, mm, base: int) -> int:
        n = 0
        rng = self.rng
        while q.free:
            slot = rng.randrange(self.slots)
            if slot in self.busy:
                continue
            b = q.free.pop()
            cid = q.next_cid
            while cid in q.inflight:
                cid = (cid + 1) & 0xFFFF
            q.next_cid = (cid + 1) & 0xFFFF
            buf = q.bufs[b]
            if rng.random() < self.write_ratio:
                op = OPC_WRITE
                self.version += 1
                ver = self.version
                mm[buf - base:buf - base + BLOCK] = pattern(slot, ver)
            else:
                op, ver = OPC_READ, 0
            self.busy.add(slot)
            q.inflight[cid] = (op, slot, ver, b)
            lba = slot * self.lba_per_block
            sqe = _SQE.pack(op, 0, cid, self.nsid, 0, 0, buf, 0, lba & 0xFFFFFFFF, lba >> 32,
                            self.lba_per_block - 1, 0, 0, 0)
            off = q.sq - base + q.tail * 64
            mm[off:off + 64] = sqe
            q.tail += 1
            if q.tail == q.depth:
                q.tail = 0
            db[(0x1000 + 8 * q.qid) >> 2] = q.tail   # a doorbell per command, as Linux does
            self.submitted += 1
            n += 1
        return n
