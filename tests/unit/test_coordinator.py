"""reactor/coordinator.py: every edge of the quiesce table, and every edge it refuses.

Workers are played by futures the test resolves (ack), leaves pending (late) or fails
(died); `sent` records the fire-and-forget messages (RESUME) in order.
"""
from __future__ import annotations

import asyncio
import itertools

import pytest

from reactor.coordinator import EDGES, Coordinator, Phase


class Workers:
    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour          # wid -> "ack" | "late" | "dead" | "error"
        self.sent: list[tuple[int, dict]] = []
        self.asked: list[int] = []
        self.timeouts: list[list[int]] = []

    async def request(self, wid: int, msg: dict) -> dict:
        assert msg == {"op": "quiesce"}
        self.asked.append(wid)
        how = self.behaviour.get(wid, "ack")
        if how == "late":
            await asyncio.Event().wait()
        if how == "dead":
            raise ConnectionError(f"worker {wid} gone")
        if how == "error":
            raise RuntimeError(f"worker {wid} refused")
        return {"op": "ack"}

    def send(self, wid: int, msg: dict) -> None:
        self.sent.append((wid, msg))

    def coordinator(self, timeout: float = 0.05) -> Coordinator:
        return Coordinator(self.request, self.send, self.timeouts.append, timeout)


def run(coro):
    return asyncio.run(coro)


def resumes(w: Workers) -> list[int]:
    return [wid for wid, msg in w.sent if msg == {"op": "resume"}]


def test_running_pausing_paused_resuming_running() -> None:
    w = Workers({})
    c = w.coordinator()

    async def go() -> None:
        await c.quiesce([2, 1])
        assert c.phase is Phase.PAUSED and c.quiesced and w.asked == [1, 2]
        c.resume()

    run(go())
    assert c.phase is Phase.RUNNING and not c.quiesced
    assert resumes(w) == [1, 2] and w.timeouts == [] and c.count == 1


def test_no_workers_pauses_at_once() -> None:
    w = Workers({})
    c = w.coordinator()
    run(c.quiesce([]))
    assert c.phase is Phase.PAUSED
    c.resume()
    assert c.phase is Phase.RUNNING and w.sent == []


@pytest.mark.parametrize("how", ["late", "error"])
def test_late_or_refusing_worker_faults_and_nobody_resumes_until_reset(how: str) -> None:
    w = Workers({1: "ack", 2: how})
    c = w.coordinator()

    async def go() -> None:
        await c.quiesce([1, 2])
        assert c.phase is Phase.FAULTED and w.timeouts == [[2]]
        c.resume()                                   # the change went ahead; still fatal
        assert c.phase is Phase.FAULTED and w.sent == []
        await c.quiesce([1, 2])                      # next change: no wait, nobody asked
        assert c.phase is Phase.FAULTED and w.asked == [1, 2] and c.count == 1
        c.resume(recovered=False)
        assert w.sent == []
        c.resume(recovered=True)                     # the reset cleared CSTS.CFS

    run(go())
    assert c.phase is Phase.RUNNING and resumes(w) == [1, 2]


def test_dead_worker_counts_as_paused_and_its_replacement_joins_paused() -> None:
    """A worker that died (ConnectionError: workerlink saw the hang-up) fetches nothing:
    not late, no fault.  Its replacement joining while quiesced must be paused first and
    resumed with the others; one joining while running is not touched."""
    w = Workers({1: "ack", 2: "dead"})
    c = w.coordinator()

    async def go() -> None:
        await c.quiesce([1, 2])
        assert c.phase is Phase.PAUSED and w.timeouts == []
        assert c.joined(2) is True            # the replacement of 2, during the change
        assert c.joined(3) is True            # a worker that had no queue of ours
        c.resume()
        assert c.joined(2) is False           # running: nothing to do

    run(go())
    assert c.phase is Phase.RUNNING and resumes(w) == [1, 2, 3]


def test_replacement_joining_a_faulted_controller_stays_paused() -> None:
    w = Workers({1: "late"})
    c = w.coordinator()

    async def go() -> None:
        await c.quiesce([1])
        assert c.phase is Phase.FAULTED
        assert c.joined(1) is True
        c.resume()
        assert w.sent == []
        c.resume(recovered=True)

    run(go())
    assert resumes(w) == [1]


def test_cancelled_quiesce_resumes_everyone_and_leaves_running() -> None:
    w = Workers({1: "ack", 2: "late"})
    c = w.coordinator(timeout=30)

    async def go() -> None:
        task = asyncio.ensure_future(c.quiesce([1, 2]))
        while len(w.asked) < 2:
            await asyncio.sleep(0)
        assert c.phase is Phase.PAUSING
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c.phase is Phase.RUNNING and resumes(w) == [1, 2]
        await c.quiesce([1])                         # was: "illegal edge pausing -> pausing"
        assert c.phase is Phase.PAUSED
        c.resume()

    run(go())
    assert c.phase is Phase.RUNNING and w.timeouts == []


def test_resume_in_running_and_nested_quiesce_are_refused() -> None:
    w = Workers({})
    c = w.coordinator()
    with pytest.raises(RuntimeError, match="illegal edge running -> resuming"):
        c.resume()

    async def go() -> None:
        await c.quiesce([1])
        with pytest.raises(RuntimeError, match="illegal edge paused -> pausing"):
            await c.quiesce([1])

    run(go())


def test_the_table_is_exactly_these_edges() -> None:
    """Every (from, to) pair: allowed iff listed; the list is the documented table."""
    want = {
        (Phase.RUNNING, Phase.PAUSING),
        (Phase.PAUSING, Phase.PAUSED), (Phase.PAUSING, Phase.FAULTED), (Phase.PAUSING, Phase.RESUMING),
        (Phase.PAUSED, Phase.RESUMING),
        (Phase.RESUMING, Phase.RUNNING),
        (Phase.FAULTED, Phase.FAULTED), (Phase.FAULTED, Phase.RESUMING),
    }
    assert {(a, b) for a, tos in EDGES.items() for b in tos} == want
    w = Workers({})
    for a, b in itertools.product(Phase, Phase):
        c = w.coordinator()
        c.phase = a
        if (a, b) in want:
            c._apply(b)
            assert c.phase is b
        else:
            with pytest.raises(RuntimeError, match="illegal edge"):
                c._apply(b)
