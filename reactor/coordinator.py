"""The quiesce barrier of one controller, as an explicit state machine.

Theory of operation
-------------------
Before anything that changes what workers may touch (DMA map/unmap, device reset,
CC.EN/SHN teardown, migration state changes) the front-end calls `quiesce()`:

    RUNNING --quiesce--> PAUSING --all acks--> PAUSED --resume--> RESUMING --> RUNNING
                            |--timeout--> PAUSED (controller marked fatal: CSTS.CFS)

Each worker holding a queue of this controller gets QUIESCE: it stops fetching new
SQEs, finishes what it has in flight (commands parked on the slow path included) and
acks.  Only then is the change applied; messages sent while PAUSED (new memory map,
queue changes) reach the worker before RESUME because a ring is FIFO.  The wait is
bounded: a worker that does not ack in time must not hang the client, so the
controller goes fatal instead and the change proceeds.  Other controllers are never
paused: the barrier is per controller, and workers pause per controller slot.

The vfio-user pipeline processes requests strictly in order, so quiesces never nest;
`quiesce()` while not RUNNING is a bug and raises.
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


EDGES: dict[Phase, set[Phase]] = {
    Phase.RUNNING: {Phase.PAUSING},
    Phase.PAUSING: {Phase.PAUSED},
    Phase.PAUSED: {Phase.RESUMING},
    Phase.RESUMING: {Phase.RUNNING},
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
        self._paused: list[int] = []
        self.count = 0

    def _apply(self, to: Phase) -> None:
        if to not in EDGES[self.phase]:
            raise RuntimeError(f"coordinator: illegal edge {self.phase.value} -> {to.value}")
        self.phase = to

    @property
    def quiesced(self) -> bool:
        return self.phase in (Phase.PAUSING, Phase.PAUSED)

    async def quiesce(self, workers: Iterable[int]) -> None:
        self._apply(Phase.PAUSING)
        self.count += 1
        self._paused = sorted(workers)
        if self._paused:
            pending = {w: asyncio.ensure_future(self._request(w, {"op": "quiesce"}))
                       for w in self._paused}
            done, not_done = await asyncio.wait(pending.values(), timeout=self.timeout)
            late = [w for w, f in pending.items() if f in not_done or f.exception() is not None]
            for f in not_done:
                f.cancel()
            if late:
                log.error("quiesce: workers %s did not ack within %.1fs: controller fatal", late,
                          self.timeout)
                self._on_timeout(late)
        self._apply(Phase.PAUSED)

    def resume(self) -> None:
        self._apply(Phase.RESUMING)
        for w in self._paused:
            self._send(w, {"op": "resume"})
        self._paused = []
        self._apply(Phase.RUNNING)
