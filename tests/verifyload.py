"""Verified random I/O from a user-space "guest", in a thread: the migration tests' load.

Theory of operation
-------------------
`VerifiedLoad` drives N I/O queue pairs of a `HostNvme` at queue depth QD with 4 KiB
random reads and writes over the namespace, entirely through shared memory (SQEs into
guest RAM, doorbells into the mmapped BAR0 page, completions polled by phase) - the
way a guest's driver does, so it keeps running while the test's main thread talks to
the daemons over vfio-user sockets.

The truth is tests/ioverify.py's `Verifier` (strict: nothing may fail), over 4 KiB
model blocks (one model block = BLOCK bytes = `lba_per_block` namespace LBAs; the
namespace starts zeroed).  Its `problems` are `errors` here (the test asserts it is
empty): a completion for a CID not in flight on that queue (DOUBLED; CIDs count up
mod 2^16, so a duplicate or stale completion is caught), a wrong SQID or any status
but 0 (ERROR), a read that differs from the model (MISMATCH), a command still in
flight after `stop()` (LOST).  This module keeps the mechanics: rings, doorbells,
CIDs, buffers, pause/switch.

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
from typing import Any

from benchmarks.hostnvme import HostNvme
from tests.ioverify import Cmd, Verifier

BLOCK = 4096
_SQE = struct.Struct("<BBHIQQQQ6I")
OPC_WRITE, OPC_READ = 0x01, 0x02


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
    free: list[int] = field(default_factory=list)     # indexes into bufs


class _Trapped:
    """The doorbell page as the load indexes it (32-bit words of BAR0), written as
    REGION_WRITE messages: a device whose doorbells are trapped (no doorbell mmap)."""

    def __init__(self, nvme: HostNvme) -> None:
        self.client = nvme.c

    def __setitem__(self, word: int, value: int) -> None:
        self.client.region_write(0, word * 4, int(value).to_bytes(4, "little"))


class VerifiedLoad:
    def __init__(self, nvme: HostNvme, nsid: int, ns_bytes: int, block_size: int = 512,
                 nqueues: int = 4, qd: int = 32, seed: int = 1, write_ratio: float = 0.5) -> None:
        self.nvme = nvme
        self.nsid = nsid
        self.lba_per_block = BLOCK // block_size
        self.nqueues = nqueues
        self.qd = qd
        self.rng = random.Random(seed)
        self.write_ratio = write_ratio
        self.v = Verifier(ns_bytes // BLOCK, BLOCK, seed, zeroed=True, tolerate=False)
        self.qs: list[_Q] = []
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

    @property
    def errors(self) -> list[str]:
        return self.v.problems

    @property
    def submitted(self) -> int:
        return self.v.c["submitted"]

    @property
    def completed(self) -> int:
        return self.v.c["completed"]

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
        left = list(self.v.inflight.values())
        if left:
            self.v.lost(left, "still in flight after stop()")
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
        c = self.v.c
        return {"submitted": c["submitted"], "completed": c["completed"],
                "reads_verified": c["reads"], "writes": c["writes"], "errors": len(self.errors)}

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
            ram = nvme.ram
            db: Any = nvme.db if nvme.db is not None and not nvme.trapped else _Trapped(nvme)
            mm = ram.mm
            words = memoryview(mm).cast("I")
            busy = 0
            for q in self.qs:
                busy += self._reap(q, words, db, mm, ram.base)
                if not stopping:
                    busy += self._submit(q, db, mm, ram.base)
            words.release()
            if stopping and not self.v.inflight:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            if not busy:
                time.sleep(0)

    def _reap(self, q: _Q, words: memoryview, db: Any, mm, base: int) -> int:
        n = 0
        cqw = (q.cq - base) >> 2
        v = self.v

        def read(cmd: Cmd) -> bytes:
            off = q.bufs[cmd.buf] - base
            return mm[off:off + BLOCK]
        while True:
            i = cqw + (q.head << 2)
            dw3 = words[i + 3]
            if (dw3 >> 16) & 1 != q.phase:
                break
            dw2 = words[i + 2]
            q.head += 1
            if q.head == q.depth:
                q.head = 0
                q.phase ^= 1
            n += 1
            cmd = v.completed(q.qid, dw3 & 0xFFFF, (dw3 >> 17) & 0x7FFF, read, sqid=dw2 >> 16)
            if cmd is not None:
                q.free.append(cmd.buf)
        if n:
            db[(0x1000 + 8 * q.qid + 4) >> 2] = q.head
        return n

    def _submit(self, q: _Q, db: Any, mm, base: int) -> int:
        n = 0
        v, lpb = self.v, self.lba_per_block
        while q.free:
            cmd = v.plan(self.rng, 1, self.write_ratio)
            if cmd is None:
                break
            b = q.free.pop()
            cid = q.next_cid
            while v.busy_cid(q.qid, cid):
                cid = (cid + 1) & 0xFFFF
            q.next_cid = (cid + 1) & 0xFFFF
            buf = q.bufs[b]
            if cmd.write:
                mm[buf - base:buf - base + BLOCK] = v.model.data(cmd.lba, 1, cmd.gen)
            cmd.qid, cmd.cid, cmd.buf = q.qid, cid, b
            v.submitted(cmd)
            lba = cmd.lba * lpb
            sqe = _SQE.pack(OPC_WRITE if cmd.write else OPC_READ, 0, cid, self.nsid, 0, 0, buf, 0,
                            lba & 0xFFFFFFFF, lba >> 32, lpb - 1, 0, 0, 0)
            off = q.sq - base + q.tail * 64
            mm[off:off + 64] = sqe
            q.tail += 1
            if q.tail == q.depth:
                q.tail = 0
            db[(0x1000 + 8 * q.qid) >> 2] = q.tail   # a doorbell per command, as Linux does
            n += 1
        return n
