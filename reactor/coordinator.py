"""The quiesce barrier of one controller, as an explicit state machine.

Theory of operation
-------------------
Before anything that changes what workers may touch (DMA map/unmap, device reset,
CC.EN/SHN teardown, migration state changes) the front-end calls `quiesce()`; after the
change, `resume()`.  Each worker holding a queue of this controller gets QUIESCE: it
stops fetching new SQEs, finishes what it has in flight (commands parked on the slow
path included) and acks.  Only then is the change applied; messages sent while paused
(new memory map, queue changes) reach the worker before RESUME because a ring is FIFO.
Other controllers are never paused: the barrier is per controller, and workers pause
per controller slot.  The vfio-user pipeline processes requests strictly in order, so
quiesces never nest.

The table (EDGES; one `_apply` refuses anything else):

    RUNNING  --quiesce-->  PAUSING  --every worker acked-->  PAUSED --resume--> RESUMING
    PAUSING  --a worker late (timeout, died)-->  FAULTED      RESUMING --sent--> RUNNING
    PAUSING  --cancelled (client gone mid-wait)-->  RESUMING  (every asked worker resumed)
    FAULTED  --quiesce-->  FAULTED       (nothing of ours runs: no wait)
    FAULTED  --resume, controller still fatal-->  FAULTED     (workers stay paused)
    FAULTED  --resume after the reset cleared the fault-->  RESUMING

The safe behaviour on a late worker: the change must still go ahead (the client is
waiting and will reuse its memory whatever we answer), so the controller goes fatal
(CSTS.CFS, `on_timeout`) and from then on no worker is resumed for this controller
until the host resets it (CC.EN 1->0 or DEVICE_RESET, both quiesced changes whose
`resume(recovered=True)` ends FAULTED; by then the controller's queues are gone).
A worker that was late acts on its ring in order - QUIESCE first - so once it is back
it pauses and stays paused: it fetches nothing for this controller again.  What it
cannot undo is the one command it was stuck in when the deadline passed; its own
mapping keeps the client's memfd alive (no SIGBUS), so at worst that command's data
lands in memory the client has unmapped.
A worker that *died* (its request fails with ConnectionError: reactor/workerlink.py sees
the hang-up at once) is not late: a dead process fetches nothing, so it counts as
paused.  Its replacement joins while we are quiesced: `joined()` asks it to quiesce
before it gets any queue (its ring is FIFO) and puts it with the paused ones, so
`resume()` resumes it like the others (issue 12: a DMA map racing a worker's death
made the controller fatal).
A cancelled wait (the pipeline task cancelled because the client disconnected) leaves
no half-paused controller: every asked worker gets RESUME (after its QUIESCE, FIFO) and
the barrier is RUNNING again, so the teardown that follows can quiesce once more.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from typing import Awaitable, Callable, Iterable

log = logging.getLogger("vnvmed.coordinator")


class Phase(enum.Enum):
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    FAULTED = "faulted"       # a worker missed the deadline: controller fatal until reset


EDGES: dict[Phase, set[Phase]] = {
    Phase.RUNNING: {Phase.PAUSING},
    Phase.PAUSING: {Phase.PAUSED, Phase.FAULTED, Phase.RESUMING},
    Phase.PAUSED: {Phase.RESUMING},
    Phase.RESUMING: {Phase.RUNNING},
    Phase.FAULTED: {Phase.FAULTED, Phase.RESUMING},
}


class Coordinator:
    def __init__(self, request: Callable[[int, dict], Awaitable[dict]],
                 send: Callable[[int, dict], None],
                 on_timeout: Callable[[list[int]], None], timeout: float = 2.0) -> None:
        self.phase = Phase.RUNNING
        self._request = request        # (worker, msg) -> ack (awaits the worker's ack)
        self._send = send              # (worker, msg) fire and forget
        self._on_timeout = on_timeout
        self.timeout = timeout
        self._paused: list[int] = []   # asked to quiesce and not resumed since
        self.count = 0

    def _apply(self, to: Phase) -> None:
        if to not in EDGES[self.phase]:
            raise RuntimeError(f"coordinator: illegal edge {self.phase.value} -> {to.value}")
        self.phase = to

    @property
    def quiesced(self) -> bool:
        return self.phase in (Phase.PAUSING, Phase.PAUSED, Phase.FAULTED)

    async def quiesce(self, workers: Iterable[int]) -> None:
        if self.phase is Phase.FAULTED:
            self._apply(Phase.FAULTED)     # every worker of ours is paused already
            return
        self._apply(Phase.PAUSING)
        self.count += 1
        self._paused = sorted(workers)
        if not self._paused:
            self._apply(Phase.PAUSED)
            return
        pending = {w: asyncio.ensure_future(self._request(w, {"op": "quiesce"}))
                   for w in self._paused}
        try:
            done, not_done = await asyncio.wait(pending.values(), timeout=self.timeout)
        except asyncio.CancelledError:
            for f in pending.values():
                f.cancel()
            self._resume_all()
            raise
        late = [w for w, f in pending.items()
                if f in not_done or (f.exception() is not None and not isinstance(f.exception(), ConnectionError))]
        gone = [w for w, f in pending.items() if f in done and isinstance(f.exception(), ConnectionError)]
        for f in not_done:
            f.cancel()
        if gone:
            log.info("quiesce: workers %s died meanwhile (paused: their replacements join paused)", gone)
        if late:
            log.error("quiesce: workers %s did not ack within %.1fs: controller fatal, its "
                      "workers stay paused until the host resets it", late, self.timeout)
            self._apply(Phase.FAULTED)
            self._on_timeout(late)
            return
        self._apply(Phase.PAUSED)

    def joined(self, worker: int) -> bool:
        """A (replacement) worker joins: True if it must be asked to quiesce first
        (we are quiesced); it is then resumed with the others."""
        if not self.quiesced:
            return False
        if worker not in self._paused:
            self._paused.append(worker)
        return True

    def resume(self, recovered: bool = False) -> None:
        """After the change.  In FAULTED only `recovered` (the reset cleared CSTS.CFS) resumes."""
        if self.phase is Phase.FAULTED and not recovered:
            self._apply(Phase.FAULTED)
            return
        self._resume_all()

    def _resume_all(self) -> None:
        self._apply(Phase.RESUMING)
        for w in self._paused:
            self._send(w, {"op": "resume"})
        self._paused = []
        self._apply(Phase.RUNNING)
