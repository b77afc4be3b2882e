"""A minimal queue runner for the admin queue pair.

Stand-in with the same API subset as nvme.qpair.QueueRunner (the I/O poll engine),
used when that module is not available.  The admin queue is low-rate, so this is
deliberately simple: one pass over each SQ per poll, SQ-side flow control so the CQ
never overflows, and parked commands (AERs) completed later through `complete()`.

Ordering rules (DESIGN.md section 4): the SQ tail is read before the SQEs it covers;
each SQE is copied out of guest memory before it is interpreted; a CQE is published by
its DW3 store, done last (nvme.ring.post_cqe).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from nvme.doorbell import Doorbells
from nvme.errors import QueueFault
from nvme.memory import DmaFault, GuestMemory
from nvme.ring import CQE_SIZE, SQE_SIZE, fetch_budget, post_cqe, valid_cq_head, valid_sq_tail
from nvme.state import CqState, SqState

Execute = Callable[[memoryview, int], "tuple[int, int] | None"]


class AdminQueueRunner:
    def __init__(self, *, doorbells: Doorbells, mem: GuestMemory, execute: Execute,
                 irq: Callable[[int], None], doorbell_error: Callable[[int, int], None],
                 shadow: object = None) -> None:
        self.db = doorbells
        self.mem = mem
        self.execute = execute
        self.irq = irq
        self.doorbell_error = doorbell_error
        self.sqs: dict[int, SqState] = {}
        self.cqs: dict[int, CqState] = {}
        self._parked: set[tuple[int, int]] = set()
        # Completions waiting for CQ room: (sqid, cid, status, dw0)
        self._pending: deque[tuple[int, int, int, int]] = deque()

    def add_cq(self, cq: CqState) -> None:
        self.cqs[cq.cqid] = cq

    def add_sq(self, sq: SqState) -> None:
        self.sqs[sq.sqid] = sq

    def remove_sq(self, sqid: int) -> SqState:
        self._parked = {p for p in self._parked if p[0] != sqid}
        self._pending = deque(p for p in self._pending if p[0] != sqid)
        return self.sqs.pop(sqid)

    def remove_cq(self, cqid: int) -> CqState:
        return self.cqs.pop(cqid)

    def set_memory(self, mem: GuestMemory) -> None:
        self.mem = mem

    def set_shadow(self, shadow: object) -> None:
        pass  # the admin queue never uses shadow doorbells

    def set_coalescing(self, thr: int, time_100us: int, exempt_vectors: set[int]) -> None:
        pass  # admin completions are never coalesced

    def inflight(self) -> int:
        return len(self._parked) + len(self._pending)

    def _cq_ring(self, cq: CqState) -> memoryview:
        try:
            return self.mem.view(cq.base, cq.size * CQE_SIZE, write=True).cast("I")
        except DmaFault as e:
            raise QueueFault(cq.cqid, str(e)) from None

    def _refresh_cq_head(self, cq: CqState) -> bool:
        head = self.db.cq_head(cq.cqid)
        if head == cq.head:
            return not cq.broken
        if valid_cq_head(cq, head):
            cq.head, cq.broken = head, False
            return True
        if not cq.broken:
            cq.broken = True
            self.doorbell_error(0x01, cq.cqid)
        return False

    def _post(self, sqid: int, cid: int, status: int, dw0: int) -> bool:
        sq = self.sqs.get(sqid)
        if sq is None:
            return True   # queue gone: the completion has nowhere to go
        cq = self.cqs[sq.cqid]
        if not self._refresh_cq_head(cq) or cq.head == (cq.tail + 1) % cq.size:
            return False
        post_cqe(self._cq_ring(cq), cq, dw0, sq.head, sqid, cid, status)
        if cq.ien:
            self.irq(cq.iv)
        return True

    def complete(self, sqid: int, cid: int, status: int, dw0: int) -> None:
        self._parked.discard((sqid, cid))
        if self._pending or not self._post(sqid, cid, status, dw0):
            self._pending.append((sqid, cid, status, dw0))

    def _flush(self) -> None:
        while self._pending and self._post(*self._pending[0]):
            self._pending.popleft()

    def poll(self, budget: int = 256) -> int:
        self._flush()
        done = 0
        for sq in list(self.sqs.values()):
            cq = self.cqs[sq.cqid]
            if not self._refresh_cq_head(cq):
                continue
            tail = self.db.sq_tail(sq.sqid)
            if tail != sq.tail or sq.broken:
                if not valid_sq_tail(sq, tail):
                    if not sq.broken:
                        sq.broken = True
                        self.doorbell_error(0x01, sq.sqid)
                    continue
                sq.tail, sq.broken = tail, False
            n = min(fetch_budget(sq, cq, len(self._pending)), budget - done)
            for _ in range(n):
                try:
                    raw = bytes(self.mem.view(sq.base + sq.head * SQE_SIZE, SQE_SIZE))
                except DmaFault as e:
                    raise QueueFault(sq.sqid, str(e)) from None
                sq.head = (sq.head + 1) % sq.size
                res = self.execute(memoryview(raw), sq.sqid)
                cid = int.from_bytes(raw[2:4], "little")
                if res is None:
                    self._parked.add((sq.sqid, cid))
                else:
                    self.complete(sq.sqid, cid, res[0], res[1])
                done += 1
        self._flush()
        return done
