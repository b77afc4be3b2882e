"""Worker crash recovery, pure parts (nvme/crashjournal.py, reactor/recovery.plan_recovery).

A "death" is simulated by an executor that raises a BaseException in the middle of a
batch: QueueRunner only catches Exception, so the batch stops exactly where a killed
process would, with whatever it had published to the queue table, the CQ ring and
the journal.  A fresh runner (the new worker) then attaches the queues from the
table after plan_recovery fixed the records.  Every submitted command must complete
exactly once: executed (fast path), retried (parked on a backend), or by the slow
path that still holds it.
"""
from __future__ import annotations

import random
import struct

import pytest

from nvme.crashjournal import SLOTS, journaled, park_cid, resume_head, scan_cq, unpark_slot
from nvme.doorbell import Doorbells
from nvme.memory import FlatMemory
from nvme.qpair import QueueRunner
from nvme.qtable import QueueTable
from nvme.state import CqState, SqState
from nvme.status import RETRY
from reactor.recovery import plan_recovery

BASE, SQB, CQB = 0x10000, 0x10000, 0x20000


class Died(BaseException):
    pass


def test_journal_slots_overflow_and_clear() -> None:
    j = QueueTable.private(2).journal(1)
    cids = [0xFFFF, 0] + list(range(7, 7 + SLOTS - 2))
    slots = {c: park_cid(j, c) for c in cids}
    assert sorted(slots.values()) == list(range(SLOTS))
    got, over = journaled(j)
    assert sorted(got) == sorted(cids) and not over
    assert park_cid(j, 99) == -1 and journaled(j)[1]          # the 128th: OVERFLOW
    unpark_slot(j, slots.pop(7), none_left=False)
    got, over = journaled(j)
    assert sorted(got) == sorted(slots) and over               # still overflowed
    for c, sl in list(slots.items()):
        unpark_slot(j, sl, none_left=False)
    assert journaled(j) == ([], True)                           # 99 is still parked, unjournaled
    unpark_slot(j, -1, none_left=True)                          # ... until it completes
    assert journaled(j) == ([], False) and not any(j[i] for i in range(4))


def test_put_sq_clears_the_journal() -> None:
    t = QueueTable.private(4)
    park_cid(t.journal(2), 5)
    t.put_sq(SqState(2, 2, 0x1000, 16))
    assert journaled(t.journal(2)) == ([], False)
    assert journaled(t.journal(1)) == ([], False)


def test_scan_stops_at_phase_and_is_bounded() -> None:
    ring = memoryview(bytearray(16 * 8)).cast("I")
    for i in range(3):                           # entries 5, 6, 7 posted with phase 1
        ring[4 * (5 + i) + 2] = (1 << 16) | i    # sqid 1, sqhd i
        ring[4 * (5 + i) + 3] = (1 << 16) | (100 + i)
    ring[4 * 0 + 3] = 1 << 16 | 200              # slot 0 still holds last lap's phase: stop
    posted, t, p = scan_cq(ring, 5, 1, 8)
    assert [x.cid for x in posted] == [100, 101, 102] and (t, p) == (0, 0)
    allset = memoryview(bytearray(b"\xff" * 16 * 8)).cast("I")
    posted, _, _ = scan_cq(allset, 0, 1, 8)
    assert len(posted) == 7                      # garbage: at most size - 1


def test_resume_head_skips_done_then_stops() -> None:
    ring = memoryview(bytearray(64 * 8)).cast("I")
    for slot, cid in enumerate([10, 11, 12, 13, 14, 15, 16, 17]):
        ring[16 * slot] = 0x02 | (cid << 16)
    assert resume_head(ring, 2, 6, 8, {12, 13}) == 4
    assert resume_head(ring, 2, 3, 8, {12, 13}) == 3      # bounded by the tail it read
    assert resume_head(ring, 6, 1, 8, {16, 17, 10}) == 1   # wraps


class Env:
    """One SQ/CQ pair (qid 1) of depth `n` in guest memory, a host that submits."""

    def __init__(self, n: int = 32) -> None:
        self.n = n
        self.buf = bytearray(0x40000)
        self.mem = FlatMemory()
        self.mem.add(BASE, self.buf)
        self.dbpage = bytearray(4096)
        self.db = memoryview(self.dbpage).cast("I")
        self.qt = QueueTable.private(8)
        self.tail = 0
        self.cqhead = 0
        self.phase = 1
        self.completions: list[tuple[int, int]] = []     # (cid, status)

    def runner(self, execute) -> QueueRunner:
        return QueueRunner(doorbells=Doorbells(memoryview(self.dbpage)), mem=self.mem, execute=execute,
                           irq=lambda v: None, doorbell_error=lambda i, q: None, table=self.qt)

    def submit(self, cid: int) -> None:
        off = SQB - BASE + 64 * self.tail
        self.buf[off:off + 64] = struct.pack("<BBH", 0x02, 0, cid) + bytes(60)
        self.tail = (self.tail + 1) % self.n
        self.db[2] = self.tail

    def reap(self) -> None:
        while True:
            off = CQB - BASE + 16 * self.cqhead
            dw3 = struct.unpack_from("<I", self.buf, off + 12)[0]
            if (dw3 >> 16) & 1 != self.phase:
                break
            self.completions.append((dw3 & 0xFFFF, (dw3 >> 17) & 0x3FFF))
            self.cqhead += 1
            if self.cqhead == self.n:
                self.cqhead, self.phase = 0, self.phase ^ 1
        self.db[3] = self.cqhead


def _die_mid_batch(seed: int):
    """A runner on Env's queue pair dies at a random execute(): (env, rng, cids,
    submitted, slow-path CIDs, CIDs parked on the backend) at the moment of death."""
    rng = random.Random(seed)
    e = Env()
    parked_by_backend: set[int] = set()
    slow: set[int] = set()
    calls = {"n": 0}
    die_at = rng.randrange(1, 40)

    def execute(sqe, sqid):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise Died()
        cid = sqe[2] | (sqe[3] << 8) if sqe.format == "B" else sqe.cast("B")[2] | (sqe.cast("B")[3] << 8)
        k = rng.random()
        if k < 0.15:
            parked_by_backend.add(cid)
            return None
        if k < 0.25:
            slow.add(cid)
            return None
        return (0, 0)

    r1 = e.runner(execute)
    r1.add_cq(CqState(1, CQB, e.n, 0, True))
    r1.add_sq(SqState(1, 1, SQB, e.n))
    cids = list(range(1000 + seed * 100, 1000 + seed * 100 + 60))
    submitted = []
    died = False
    it = iter(cids)
    while not died:
        for _ in range(rng.randrange(1, 8)):
            if (e.tail + 1) % e.n == (e.cqhead - 0) % e.n:
                break
            c = next(it, None)
            if c is None:
                break
            e.submit(c)
            submitted.append(c)
        try:
            r1.poll(budget=rng.randrange(1, 16))
        except Died:
            died = True
        e.reap()
        # a backend finishes some of its parked commands before the death
        for c in list(parked_by_backend):
            if not died and rng.random() < 0.3:
                parked_by_backend.discard(c)
                r1.complete(1, c, 0, 0)
        if len(submitted) == len(cids) and not died:
            r1.poll()
            e.reap()
            break
    return e, rng, cids, submitted, slow, parked_by_backend


@pytest.mark.parametrize("seed", range(40))
def test_death_mid_batch_completes_every_command_exactly_once(seed: int) -> None:
    e, rng, cids, submitted, slow, parked_by_backend = _die_mid_batch(seed)
    # --- the worker is dead: plan from shared state, a new runner takes over ---------
    plan = plan_recovery(e.qt, e.mem, [1], [1], lambda sqid: set(slow))
    park, retry = plan[1]
    _take_over(e, cids, submitted, slow, parked_by_backend, park, retry)


@pytest.mark.parametrize("seed", range(10))
def test_replacement_dying_before_it_adopted_loses_nothing(seed: int) -> None:
    """The replacement attached the queues (the walk cleared the journal) and died
    before the adopt: the front-end's carried lists make the next plan whole."""
    e, rng, cids, submitted, slow, parked_by_backend = _die_mid_batch(seed)
    park1, retry1 = plan_recovery(e.qt, e.mem, [1], [1], lambda sqid: set(slow))[1]
    r2 = e.runner(lambda sqe, sqid: (0, 0))
    r2.attach_cq(1)
    r2.attach_sq(1)                    # ... and dies here, before the adopt message
    assert plan_recovery(e.qt, e.mem, [1], [1], lambda sqid: set(slow))[1] == ([], [])
    park, retry = plan_recovery(e.qt, e.mem, [1], [1], lambda sqid: set(slow),
                                carried={1: park1 + retry1})[1]
    assert (sorted(park), sorted(retry)) == (sorted(park1), sorted(retry1))
    _take_over(e, cids, submitted, slow, parked_by_backend, park, retry)


def _take_over(e, cids, submitted, slow, parked_by_backend, park, retry) -> None:
    assert set(park) == slow and set(retry) == parked_by_backend
    r2 = e.runner(lambda sqe, sqid: (0, 0))
    r2.attach_cq(1)
    r2.attach_sq(1)
    for c in park:
        r2.park(1, c)
    for c in retry:
        r2.park(1, c)
        r2.complete(1, c, 0x21 | RETRY, 0)
    for c in slow:                      # the front-end's slow path finishes them
        r2.complete(1, c, 0, 0)
    for c in cids[len(submitted):]:     # and the host goes on
        while (e.tail + 1) % e.n == e.cqhead:
            r2.poll()
            e.reap()
        e.submit(c)
        submitted.append(c)
    for _ in range(20):
        r2.poll()
        e.reap()
    got = [c for c, _ in e.completions]
    assert sorted(got) == sorted(submitted), (
        f"lost {sorted(set(submitted) - set(got))}, doubled {sorted(c for c in set(got) if got.count(c) > 1)}")
    retried = [c for c, st in e.completions if st]
    assert sorted(retried) == sorted(parked_by_backend)
    assert all(st == 0x21 for c, st in e.completions if st), "retry status with DNR clear"
