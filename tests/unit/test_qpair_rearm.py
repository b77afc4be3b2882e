"""QueueRunner.prepare_sleep and lazy EventIdx (trapped doorbells), against the
host-driver simulation of test_qpair (FlatMemory guest RAM, a real doorbell mmap)."""
from __future__ import annotations

import pytest

from nvme.state import ShadowDoorbells
from tests.unit.test_qpair import CQ1, DBBUF, EVIDX, P, RAM, SQ1, Host

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("qpair_datapath")]


def _pages(h: Host) -> tuple[memoryview, memoryview]:
    sh = memoryview(h.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")
    ev = memoryview(h.ram)[EVIDX - RAM:EVIDX - RAM + P].cast("I")
    return sh, ev


def _need_event(ei: int, new: int, old: int) -> bool:
    return ((new - ei - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@pytest.fixture
def lazy() -> Host:
    h = Host(shadow=ShadowDoorbells(dbbuf=DBBUF, eventidx=EVIDX))
    h.runner.set_lazy_eventidx(True)
    yield h
    h.close()


def test_lazy_poll_leaves_eventidx_behind_and_prepare_sleep_arms_it(lazy) -> None:
    h = lazy
    h.create(1, SQ1, CQ1, 8, 8)
    sh, ev = _pages(h)
    assert ev[2] == 0                      # armed at creation: the first tail write rings
    for cid in (1, 2, 3):
        h.submit(1, cid=cid, ring=False)
    sh[2] = 3
    assert h.runner.poll() == 3
    assert ev[2] == 0                      # busy: not moved, so the host does not ring ...
    assert not _need_event(ev[2], 4, 3)    # ... for its next tail (3 -> 4)
    assert h.runner.prepare_sleep() is True
    assert ev[2] == 3                      # armed at the tail seen now
    assert _need_event(ev[2], 4, 3)        # the host's next tail update rings the doorbell


def test_prepare_sleep_refuses_when_a_tail_moved(lazy) -> None:
    h = lazy
    h.create(1, SQ1, CQ1, 8, 8)
    sh, ev = _pages(h)
    h.submit(1, cid=1, ring=False)
    sh[2] = 1                              # published, not polled yet
    assert h.runner.prepare_sleep() is False
    assert h.runner.poll() == 1
    assert h.runner.prepare_sleep() is True
    assert ev[2] == 1


def test_prepare_sleep_without_shadow_sees_the_doorbell_page() -> None:
    h = Host()
    try:
        h.create(1, SQ1, CQ1, 8, 8)
        assert h.runner.prepare_sleep() is True
        h.submit(1, cid=1)                 # real doorbell (a trapped write stored it)
        assert h.runner.prepare_sleep() is False
        assert h.runner.poll() == 1
        assert h.runner.prepare_sleep() is True
    finally:
        h.close()


def test_sq_waiting_for_cq_room_arms_the_cq_eventidx(lazy) -> None:
    h = lazy
    h.create(1, SQ1, CQ1, 8, 4)            # CQ of 4 entries: 3 usable
    sh, ev = _pages(h)
    assert ev[3] == 0xFFFFFFFF
    for cid in range(1, 6):
        h.submit(1, cid=cid, ring=False)
    sh[2] = 5
    assert h.runner.poll() == 3            # CQ full: two SQEs wait for room
    assert h.runner.poll() == 0
    assert h.runner.prepare_sleep() is True
    assert ev[3] == 0                      # the host's next CQ head update rings
    assert _need_event(ev[3], 2, 0)
    h.reap(1, ring=False)
    sh[3] = h.cq_head[1]                   # the host frees room (shadow only so far)
    assert h.runner.prepare_sleep() is False
    assert h.runner.poll() == 2


def test_invalid_shadow_tail_is_armed_not_spun_on(lazy) -> None:
    h = lazy
    h.create(1, SQ1, CQ1, 8, 8)
    sh, ev = _pages(h)
    sh[2] = 99                             # out of range: reported once, queue skipped
    assert h.runner.poll() == 0
    assert h.errors == [(1, 1)]
    assert h.runner.prepare_sleep() is True
    assert ev[2] == 99                     # the host's next (fixing) write rings
    h.submit(1, cid=7, ring=False)
    sh[2] = 1
    assert h.runner.prepare_sleep() is False
    assert h.runner.poll() == 1


def test_eager_mode_unchanged_eventidx_follows_every_poll() -> None:
    h = Host(shadow=ShadowDoorbells(dbbuf=DBBUF, eventidx=EVIDX))
    try:
        h.create(1, SQ1, CQ1, 8, 8)
        sh, ev = _pages(h)
        h.submit(1, cid=1, ring=False)
        sh[2] = 1
        assert h.runner.poll() == 1
        assert ev[2] == 1
    finally:
        h.close()
