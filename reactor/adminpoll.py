"""The front-end's admin poller: runs the admin queue of one NvmeFunction.

Theory of operation
-------------------
The admin SQ tail and CQ head doorbells live in the mmapped doorbell page: no trap
tells us about a host write, so the loop polls - busy after admin activity (Linux
probes with dozens of admin commands in a row), backing off to `max_interval`, and
to `deep_interval` after `deep_after` s of silence.  CC writes, trapped doorbells,
resumes and new sessions set `fn.admin_kick` and wake it at once.

Deep idle: after `deep_after` s without admin commands the loop hands its doorbells to
a worker (`admin_watch`, to one that runs our I/O queues: it polls them anyway; it sends
`admin_kick` when the admin SQ tail / CQ head differs from what the admin queue took,
or when a doorbell of a queue that does not exist (qids 1..max_io_queues) is not 0 -
Write to Invalid Doorbell Register, which our scan reports) and sleeps with only
a safety timer (ADMIN_WATCH_SAFETY_S): the cadence of the scan for writes past
max_io_queues.  A worker that dies or joins kicks the loop (NvmeFunction.add_worker /
worker_lost), which re-arms the watch on a live one.  With no guest, or CC.EN=0, there
is no timer at all.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

log = logging.getLogger("vnvmed.frontend")

# The deep-idle safety timer (see above).  Tests raise it to prove that a wake-up came
# from the worker's kick.  At 5 s, 64 idle guests' front-ends cost 0.4 % of a core.
ADMIN_WATCH_SAFETY_S = float(os.environ.get("VNVMED_ADMIN_WATCH_SAFETY_S", 60.0))


async def admin_loop(fn: Any, min_interval: float = 0.0002, max_interval: float = 0.01,
                     deep_interval: float = 0.25, deep_after: float = 1.0) -> None:
    """Run fn's admin queue (see the module doc).  With trapped doorbells (every admin
    doorbell write kicks) an idle loop waits 1 s.  Doorbells of queues that do not
    exist are scanned for at most every 100 ms while the loop polls."""
    loop = asyncio.get_running_loop()
    interval = max_interval
    last = loop.time()
    last_scan = 0.0
    while True:
        n = 0
        now = loop.time()
        if not fn.coord.quiesced and fn.session is not None:
            try:
                if fn.rescue is not None:      # front-end crash recovery (reactor/rescue.py)
                    fn.rescue.admin_poll_start()
                n = fn.ctrl.poll_admin()
                if fn.rescue is not None:
                    fn.rescue.admin_poll_end(n > 0)
                if n or now - last_scan > 0.1:
                    fn.ctrl.scan_doorbells()
                    last_scan = now
            except Exception:
                log.exception("%s: admin queue failed", fn.name)
                fn._fatal("admin queue processing failed")
        wait: float | None
        if n:
            last = now
            wait = interval = min_interval
        elif fn.session is None or not fn.ctrl.ready:
            # No guest, or its controller is not enabled: nothing to poll until a CC
            # write, a resume or a new session (all of them kick) - no timer at all,
            # so an idle front-end without a guest never wakes (64 of them woke
            # 64 times a second for ~0.9 % of a core).
            wait = None
            interval = max_interval
        elif fn.trapped:
            # Trapped doorbells: every admin doorbell write and CC write kicks us, so
            # the timeout is only a safety net.
            wait = interval = 1.0
        elif now - last > deep_after and watch_admin(fn):
            # Deep idle: a worker watches our doorbells (see the module doc).  With a
            # 250 ms poll 64 idle guests' front-ends cost 5.8 % of a core.
            wait = interval = ADMIN_WATCH_SAFETY_S
        else:
            wait = interval = min(interval * 2, deep_interval if now - last > deep_after else max_interval)
        fn.admin_kick.clear()
        # The timeout is a timer that sets the kick event itself: one TimerHandle
        # and the event's waiter future per wait.  asyncio.wait_for would wrap the
        # wait in a Task and a cancellation on every timeout - several event-loop
        # iterations and ~5x the CPU of an idle wake-up (it wakes 10x a second).
        timer = loop.call_later(wait, fn.admin_kick.set) if wait is not None else None
        try:
            await fn.admin_kick.wait()
        finally:
            if timer is not None:
                timer.cancel()


def watch_admin(fn: Any) -> bool:
    """Ask one worker to kick us when the admin SQ tail or CQ head doorbell differs
    from what the admin queue has taken; False if there is no worker to ask."""
    if not fn.links:
        return False
    sq, cq = fn.qtable.get_sq(0), fn.qtable.get_cq(0)
    if sq is None or cq is None:
        return False
    fn.ctrl.scan_doorbells()   # a write to an absent queue's doorbell before the watch
    # A worker that runs queues of ours wakes to poll them anyway; another one would
    # have to visit our slot for the watch alone.
    busy = fn.placement.busy_workers() & fn.links.keys()
    fn._send(min(busy or fn.links), {"op": "admin_watch", "sq": sq.tail, "cq": cq.head,
                                     "zero": absent_queues(fn.ctrl)})
    return True


def absent_queues(ctrl: Any) -> list[list[int]]:
    """[first, end) runs of qids 1..max_io_queues with neither an SQ nor a CQ: the
    watching worker kicks us when a doorbell of one is not 0 (Write to Invalid
    Doorbell Register, which scan_doorbells reports and resets), so no timer of ours
    has to scan for it."""
    q = ctrl.queues
    runs: list[list[int]] = []
    for qid in range(1, ctrl.cfg.max_io_queues + 1):
        if qid in q.sqs or qid in q.cqs:
            continue
        if runs and runs[-1][1] == qid:
            runs[-1][1] = qid + 1
        else:
            runs.append([qid, qid + 1])
    return runs
