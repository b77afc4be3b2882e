"""Transparent worker recovery: a restarted worker takes over a dead worker's queues.

Theory of operation
-------------------
When a worker dies the supervisor restarts it on its core and hands every front-end a
channel to it (the "worker" control message).  The front-end does not make the
controller fatal: it keeps the dead worker's queue placement and, once the new
worker has its hello, memory map, interrupt routes, shadow doorbells and coalescing
(NvmeFunction.add_worker), `recover()` rebuilds every queue from shared state
(nvme.crashjournal has the reasoning):

1. each CQ of the worker: scan the ring from the published tail for CQEs the dead
   worker posted, move the record's tail/phase past them;
2. each SQ: the journaled CIDs (parked commands) and the scanned CQEs' CIDs tell the
   walk from the published head where the executing command was; the record's head
   is set there, so the new worker executes it again (idempotent I/O);
3. records written, the new worker attaches the queues (add_cq/add_sq, as for new
   queues) and adopts the journaled commands: those the front-end's slow path still
   runs are parked again (their slow_done will find them), every other one completes
   with Command Interrupted and DNR clear (the host retries it);
4. every recovered CQ with interrupts enabled gets one interrupt (the dead worker may
   have posted entries without signalling them).

A replacement that dies too before it took the journaled commands (step 3) would
lose them: the walk cleared the journal.  So the front-end keeps what it asked a worker
to adopt until the ack (`fn.recovery_carry`) and adds it to the next plan; commands
whose CQE the dying replacement did post are found by the CQ scan as usual.  (A
replacement that posted such a CQE, published the CQ tail and died before its ack
would get that command completed twice: a window of a few instructions.)

Bounds: the sync requests use the normal worker timeout (a new worker that does not
answer makes the controller fatal, as before); a journal that overflowed (more than
127 commands of one SQ parked at once) or ring memory the front-end cannot map makes
the controller fatal (CSTS.CFS): the host resets it, as it had to before this module.
The figures (`recovered`, `retried`, ...) are in `vnvmectl stats` (controller.recovery).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from nvme.crashjournal import COMMAND_INTERRUPTED, journaled, resume_head, scan_cq
from nvme.memory import DmaFault, GuestMemory
from nvme.qtable import QueueTable
from nvme.ring import CQE_SIZE, SQE_SIZE
from nvme.status import RETRY

if TYPE_CHECKING:
    from reactor.nvmefn import NvmeFunction
    from reactor.workerlink import WorkerLink

log = logging.getLogger("vnvmed.frontend")


@dataclass
class RecoveryStats:
    recovered: int = 0        # worker deaths survived (per controller)
    queues: int = 0           # SQs re-attached
    retried: int = 0          # commands completed with Command Interrupted, DNR clear
    reparked: int = 0         # slow-path commands handed to the new worker
    fallbacks: int = 0        # recoveries that had to make the controller fatal


class Unrecoverable(Exception):
    pass


def orphans(fn: "NvmeFunction", wid: int) -> tuple[list[int], list[int]]:
    """(CQ ids, SQ ids) placed on worker `wid`."""
    cqs = sorted(cq for cq, w in fn.placement.cq_worker.items() if w == wid)
    sqs = sorted(sq for sq, cq in fn.placement.sq_cq.items() if cq in cqs)
    return cqs, sqs


def recover(fn: "NvmeFunction", link: "WorkerLink") -> None:
    """Re-attach the queues placed on link.wid (its previous process died) to `link`."""
    cqids, sqids = orphans(fn, link.wid)
    carried = fn.recovery_carry.pop(link.wid, {})
    if not cqids:
        return
    st = fn.recovery
    try:
        plan = plan_recovery(fn.qtable, fn.mem, cqids, sqids, fn.slow.cids, carried)
    except Unrecoverable as e:
        st.fallbacks += 1
        fn.placement.drop_worker(link.wid)
        fn.placement.set_workers(sorted(fn.links))
        fn._fatal(f"worker {link.wid} died; its queues cannot be recovered: {e}")
        return
    for cqid in cqids:
        fn._sync(link.wid, {"op": "add_cq", "cqid": cqid}, timeout=10.0)
    for sqid in sqids:
        fn._sync(link.wid, {"op": "add_sq", "sqid": sqid}, timeout=10.0)
    for sqid, (park, retry) in plan.items():
        if not (park or retry):
            continue
        try:
            link.request_sync({"op": "adopt", "sqid": sqid, "park": park, "retry": retry,
                               "status": COMMAND_INTERRUPTED | RETRY}, timeout=10.0)
        except ConnectionError:     # died too: the next replacement adopts them
            fn.recovery_carry.setdefault(link.wid, {}).setdefault(sqid, []).extend(park + retry)
            continue
        except TimeoutError as e:
            fn._fatal(f"worker {link.wid}: {e}")
            return
        st.retried += len(retry)
        st.reparked += len(park)
    for cqid in cqids:
        cq = fn.qtable.get_cq(cqid)
        if cq is not None and cq.ien:
            fn.irqs.fire(cq.iv)
    fn.slow.flush_pending(link.wid)
    st.recovered += 1
    st.queues += len(sqids)
    log.warning("%s: worker %d replaced: %d queue(s) re-attached, %d command(s) to retry, "
                "%d slow-path command(s) re-parked", fn.name, link.wid, len(sqids),
                sum(len(r) for _, r in plan.values()), sum(len(p) for p, _ in plan.values()))


def plan_recovery(qt: QueueTable, mem: GuestMemory, cqids: list[int], sqids: list[int],
                  slow_cids: Callable[[int], set[int]],
                  carried: dict[int, list[int]] | None = None) -> dict[int, tuple[list[int], list[int]]]:
    """Steps 1 and 2 of the module doc: fix the records in `qt`, return per SQ the
    journaled commands (plus `carried`: those a dead replacement did not adopt) to
    re-park (`slow_cids(sqid)` still runs them) and to retry."""
    done: dict[int, set[int]] = {}
    for cqid in cqids:
        cq = qt.get_cq(cqid)
        if cq is None:
            raise Unrecoverable(f"CQ {cqid} has no record")
        try:
            ring = mem.view(cq.base, cq.size * CQE_SIZE).cast("I")
        except DmaFault as e:
            raise Unrecoverable(f"CQ {cqid} ring: {e}") from None
        posted, cq.tail, cq.phase = scan_cq(ring, cq.tail, cq.phase, cq.size)
        ring.release()
        qt.put_cq(cq)
        for p in posted:
            done.setdefault(p.sqid, set()).add(p.cid)
    plan: dict[int, tuple[list[int], list[int]]] = {}
    for sqid in sqids:
        sq = qt.get_sq(sqid)
        if sq is None:
            raise Unrecoverable(f"SQ {sqid} has no record")
        cids, overflow = journaled(qt.journal(sqid))
        if overflow:
            raise Unrecoverable(f"SQ {sqid}: more commands were parked than the journal holds")
        cids += [c for c in (carried or {}).get(sqid, ()) if c not in cids]
        finished = done.get(sqid, set())
        try:
            ring = mem.view(sq.base, sq.size * SQE_SIZE).cast("I")
        except DmaFault as e:
            raise Unrecoverable(f"SQ {sqid} ring: {e}") from None
        sq.head = resume_head(ring, sq.head, sq.tail, sq.size, finished | set(cids))
        ring.release()
        qt.put_sq(sq)                  # clears the journal: the new worker re-parks
        pending = [c for c in cids if c not in finished]
        slow = slow_cids(sqid)
        plan[sqid] = ([c for c in pending if c in slow], [c for c in pending if c not in slow])
    return plan
