"""workers.slot.Slot's deep-idle probe: a poll is skipped only while nothing it reads changed.

A real Slot with a real channel to a "front-end" end (which receives admin_kick), the
runner of tests.unit.test_qpair.Host (a host driver on a real doorbell mmap), on both
data paths.  The runner's poll() is counted: a skipped poll does not reach it.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

import tests.unit.test_qpair as tq
from nvme.state import ShadowDoorbells
from reactor import ipc
from reactor.channel import Channel
from workers.slot import Slot

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("qpair_datapath")]


class Rig:
    def __init__(self, shadow: ShadowDoorbells | None = None) -> None:
        a, b = ipc.pair()
        self.fe = Channel.create(a, f"/vnvt-probe-{os.getpid()}-{id(a):x}")
        wk = Channel.try_attach(b)
        assert wk is not None
        self.h = tq.Host(shadow=shadow)
        self.h.create(1, tq.SQ1, tq.CQ1, 8, 8)
        self.slot = s = Slot("t", wk)
        s.dbw = self.h.db.words
        s.dbq = memoryview(self.h.mm).cast("Q")
        s.runner = self.h.runner
        s.nqueues = 2
        self.polls = 0
        real = self.h.runner.poll

        def counted(*a: Any) -> int:
            self.polls += 1
            return real(*a)
        self.h.runner.poll = counted   # type: ignore[method-assign]

    def settle(self) -> None:
        """Deep-idle polls until one leaves a probe."""
        for _ in range(4):
            assert self.slot.idle_poll() == 0
            if self.slot._probe is not None:
                return
        raise AssertionError("no probe after idle deep polls")

    def skipped(self, n: int = 3) -> bool:
        before = self.polls
        for _ in range(n):
            assert self.slot.idle_poll() == 0
        return self.polls == before

    def close(self) -> None:
        del self.h.runner.poll         # no cycle: the runner goes with the Host, as in test_qpair
        self.slot.runner = None
        self.slot.close()
        self.fe.close(unlink=True)
        self.h.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_idle_polls_are_skipped_until_a_doorbell_changes(rig: Rig) -> None:
    rig.settle()
    assert rig.skipped()
    rig.h.submit(1, cid=7)                       # SQ 1 tail doorbell
    assert rig.slot.idle_poll() == 1             # probe differs: the runner polled
    assert rig.slot._probe is None               # ... and found work: no probe
    assert [e[3] for e in rig.h.reap(1)] == [7]  # (rings the CQ head doorbell)
    rig.settle()
    assert rig.skipped()
    before = rig.polls
    rig.slot.poll()                              # a busy worker's poll ignores the probe
    assert rig.polls == before + 1


def test_a_message_drops_the_probe(rig: Rig) -> None:
    rig.settle()
    rig.fe.send({"op": "resume", "seq": 1})
    for m in rig.slot.chan.recv_all():
        rig.slot.handle(m)
    before = rig.polls
    rig.slot.idle_poll()
    assert rig.polls == before + 1


def test_pending_coalesced_interrupt_leaves_no_probe(rig: Rig) -> None:
    rig.h.runner.set_coalescing(5, 255, set())   # 25.5 ms: still pending after the poll
    rig.h.submit(1, cid=3)
    assert rig.slot.idle_poll() == 1
    assert rig.slot.idle_poll() == 0
    # Unless 25.5 ms passed meanwhile (a loaded machine) and it fired: no probe, the
    # poll must run to fire it in time.
    assert rig.slot._probe is None or rig.h.irqs


def test_shadow_doorbell_change_is_seen() -> None:
    r = Rig(shadow=ShadowDoorbells(dbbuf=tq.DBBUF, eventidx=tq.EVIDX))
    try:
        r.settle()
        assert r.skipped()
        sh = memoryview(r.h.ram)[tq.DBBUF - tq.RAM:tq.DBBUF - tq.RAM + tq.P].cast("I")
        r.h.submit(1, cid=5, ring=False)
        sh[2] = r.h.sq_tail[1]                   # the shadow tail only, no doorbell write
        assert r.slot.idle_poll() == 1
    finally:
        r.close()


def _kicks(fe: Channel) -> int:
    return sum(1 for m in fe.recv_all() if m.get("op") == "admin_kick")


def test_admin_watch_and_absent_queue_doorbells(rig: Rig) -> None:
    rig.slot.handle({"op": "admin_watch", "sq": 0, "cq": 0, "zero": [[2, 9], [11, 4000]]})
    rig.settle()
    assert rig.skipped()
    # A write to SQ 5's doorbell (no such queue): not the probe's business (the poll
    # would not read it); the worker's check_absent (about once a second) kicks.
    rig.h.db.set_sq_tail(5, 1)
    assert rig.skipped(1)
    assert _kicks(rig.fe) == 0
    rig.slot.check_absent()
    assert _kicks(rig.fe) == 1 and rig.slot.admin_watch is None
    rig.h.db.set_sq_tail(5, 0)                   # the front-end's scan resets it
    # Re-armed; a poll leaves absent queues to check_absent, which sees CQ 12's head.
    rig.slot.handle({"op": "admin_watch", "sq": 0, "cq": 0, "zero": [[2, 9], [11, 4000]]})
    rig.h.db.set_cq_head(12, 3)
    rig.slot.poll()
    assert _kicks(rig.fe) == 0
    rig.slot.check_absent()
    assert _kicks(rig.fe) == 1
    # The admin doorbells themselves: seen by every poll.
    rig.slot.handle({"op": "admin_watch", "sq": 0, "cq": 0, "zero": []})
    rig.settle()
    rig.h.db.set_sq_tail(0, 1)
    rig.slot.poll()
    assert _kicks(rig.fe) == 1


def test_a_slot_with_nothing_to_poll_is_left_out_of_deep_idle_rounds(rig: Rig) -> None:
    """A controller whose queues all run on the other worker: no queues, no watch, no
    asynchronous namespace here - its poll cannot do anything (Worker._deep_slots)."""
    assert rig.slot.needs_idle_poll()            # two queues
    rig.slot.nqueues = 0
    assert not rig.slot.needs_idle_poll()
    rig.slot.handle({"op": "admin_watch", "sq": 0, "cq": 0, "zero": []})
    assert rig.slot.needs_idle_poll()
