"""Front-end crash recovery, the taking side: a new front-end carries on a dead one's
controller on the same client connection (issue 12; the recording side and the
package/checkpoint layout are in reactor/rescue.py).

Theory of operation
-------------------
The supervisor saw the front-end die while a client was connected and held a rescue
package for it.  It told every worker to drop the dead front-end's slot (a worker's
"drop" comes before the new front-end's "channel" on its control socket, so by the
time a worker answers the new front-end's quiesce it no longer touches the queues:
from then on the queue table and the rings are exactly as the crash left them), then
started this front-end with opts["adopt"] == "rescue" and forwarded the package.

1. Build the function on the package's BAR0 memfd and queue table (nothing is
   reset, the doorbell page is never written), link the new worker channels and
   pause every worker (devstate.stop), as a live upgrade's taker does.
2. Read the newest whole checkpoint (device state without usable I/O queue records).
3. Put the queues right from shared state - the worker-recovery arithmetic
   (reactor/recovery.plan_recovery, nvme/crashjournal.py) applied to every queue:
   - I/O queues: CQEs posted after the published CQ tail are found by phase, the SQ
     walk resumes at the command that was executing (executed again: idempotent), and
     commands parked at the crash (asynchronous backend, or the dead front-end's slow
     path) complete with Command Interrupted, DNR clear (the host retries them).
   - The admin queue (`plan_admin`): the same scan and walk, plus the checkpoint's
     `applied` list (commands whose effect the checkpoint holds): their CQE is posted
     now instead of running them twice; a command with no effect in the checkpoint is
     executed again by the admin poller.  Parked admin commands: AERs the checkpoint
     still counts as outstanding stay parked; an AER it had already matched with an
     event completes with that event; anything else parked completes with Command
     Interrupted, DNR clear.
   The live records (and the admin queue's) replace the checkpoint's queue records.
4. Restore (reactor/connmove.load_session/load_device: the connection, DMA regions,
   interrupt eventfds, then devstate.load_state(shared_bar=True): queues re-created on
   the paused workers), post the completions of step 3, resume, serve the connection,
   and raise each enabled CQ's vector once (a dead worker slot may have posted entries
   without signalling them).
Any failure before step 4 ends with `Unrevivable`: the supervisor starts another
taker from the same package; after 3 failures in a row it falls back to a fresh
front-end (the client's connection is closed then: it must reconnect, as before this
module).

What the client sees (module doc of reactor/rescue.py for the recording order):
a vfio-user request the dead front-end had read but not answered gets no reply (QEMU
times out on it: it has no resend); its effect is in the new front-end or not, as the
checkpoint written before the reply says.  Requests the client sends while no
front-end runs wait in the socket and are served by the new one.  NVMe commands:
each completes exactly once, at worst with Command Interrupted (DNR clear).
"""
from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from migration.snapshot import encode
from nvme.crashjournal import COMMAND_INTERRUPTED, journaled, scan_cq
from nvme.memory import DmaFault, GuestMemory
from nvme.qtable import (QueueTable, SQ_BASE_HI, SQ_BASE_LO, SQ_CQID, SQ_HEAD, SQ_PRIO, SQ_SIZE,
                         SQ_TAIL, CQ_BASE_HI, CQ_BASE_LO, CQ_HEAD, CQ_IV, CQ_PHASE, CQ_SIZE, CQ_TAIL)
from nvme.ring import CQE_SIZE, SQE_SIZE
from nvme.state import CqState, SqState
from nvme.status import RETRY
from migration import nvmeimage
from reactor import devstate
from reactor.connmove import load_device, load_session
from reactor.handover import Package, format_problem, claimed_format
from reactor.recovery import Unrecoverable, plan_recovery
from reactor.rescue import CheckpointArea, Journaled, Rescue
from vfio_user.framing import Frame
from vfio_user.wire import Header

if TYPE_CHECKING:
    from reactor.frontend import FrontEnd

log = logging.getLogger("vnvmed.frontend")
RETRY_STATUS = COMMAND_INTERRUPTED | RETRY


class Unrevivable(Exception):
    pass


@dataclass
class AdminPlan:
    complete: list[tuple[int, int, int]] = field(default_factory=list)   # (cid, status, dw0)
    outstanding: list[int] = field(default_factory=list)                 # AERs kept parked
    reexecute: int = 0                                                   # SQEs left for the poller


def plan_admin(qt: QueueTable, mem: GuestMemory, applied: list[list[Any]], outstanding: list[int],
               aer_out: list[list[int]]) -> AdminPlan:
    """Step 3 for the admin queue (module doc): fixes SQ0/CQ0 records in `qt`."""
    plan = AdminPlan()
    sq, cq = qt.get_sq(0), qt.get_cq(0)
    if sq is None or cq is None:
        return plan
    try:
        cring = mem.view(cq.base, cq.size * CQE_SIZE).cast("I")
        sring = mem.view(sq.base, sq.size * SQE_SIZE).cast("I")
    except DmaFault as e:
        raise Unrevivable(f"admin queue memory: {e}") from None
    try:
        posted, cq.tail, cq.phase = scan_cq(cring, cq.tail, cq.phase, cq.size)
        done = {p.cid for p in posted if p.sqid == 0}
        jcids, overflow = journaled(qt.journal(0))
        if overflow:
            raise Unrevivable("admin SQ journal overflowed")
        parked = set(jcids)
        by_slot = {int(slot): (int(cid), st, int(dw0)) for slot, cid, st, dw0 in applied}
        h = sq.head
        while h != sq.tail:
            cid = sring[16 * h] >> 16
            if cid in done:
                done.discard(cid)
            elif h in by_slot and by_slot[h][0] == cid:
                _, st, dw0 = by_slot[h]
                if st is None:
                    parked.add(cid)               # parked after the checkpoint, before the journal
                else:
                    plan.complete.append((cid, int(st), dw0))
            else:
                break
            h = h + 1 if h + 1 < sq.size else 0
        n = 0
        t = h
        while t != sq.tail:
            n += 1
            t = t + 1 if t + 1 < sq.size else 0
        plan.reexecute = n
        sq.head = h
    finally:
        cring.release()
        sring.release()
    qt.put_cq(cq)
    qt.put_sq(sq)                                 # clears the journal: re-parked below
    posted_cids = {p.cid for p in posted if p.sqid == 0}
    events = {int(c): int(dw0) for c, dw0 in aer_out}
    for cid in sorted(parked - posted_cids):
        if cid in events:
            plan.complete.append((cid, 0, events[cid]))
        elif cid in outstanding:
            plan.outstanding.append(cid)
        else:
            plan.complete.append((cid, RETRY_STATUS, 0))
    plan.outstanding.sort(key=outstanding.index)
    return plan


def _raw_sq(qt: QueueTable, sqid: int) -> SqState:
    r = qt.sq(sqid)
    return SqState(sqid=sqid, cqid=r[SQ_CQID], base=r[SQ_BASE_LO] | (r[SQ_BASE_HI] << 32),
                   size=r[SQ_SIZE], prio=r[SQ_PRIO], head=r[SQ_HEAD], tail=r[SQ_TAIL])


def _raw_cq(qt: QueueTable, cqid: int, ien: bool) -> CqState:
    r = qt.cq(cqid)
    return CqState(cqid=cqid, base=r[CQ_BASE_LO] | (r[CQ_BASE_HI] << 32), size=r[CQ_SIZE],
                   iv=r[CQ_IV], ien=ien, tail=r[CQ_TAIL], phase=r[CQ_PHASE], head=r[CQ_HEAD])


def plan_io(qt: QueueTable, mem: GuestMemory, ctrl: dict[str, Any]) -> dict[int, list[int]]:
    """Step 3 for the I/O queues of the checkpoint's controller section: fixes the
    records, patches `ctrl`'s queue records with them; returns CIDs to retry per SQ."""
    queues = ctrl["queues"]
    for d in queues["cqs"]:
        if qt.get_cq(d["cqid"]) is None:         # deleted after the checkpoint: the
            qt.put_cq(_raw_cq(qt, d["cqid"], bool(d["ien"])))   # re-run delete finds it
    for d in queues["sqs"]:
        if qt.get_sq(d["sqid"]) is None:
            qt.put_sq(_raw_sq(qt, d["sqid"]))
    cqids = [int(d["cqid"]) for d in queues["cqs"]]
    sqids = [int(d["sqid"]) for d in queues["sqs"]]
    try:
        plan = plan_recovery(qt, mem, cqids, sqids, lambda _sqid: set())
    except Unrecoverable as e:
        raise Unrevivable(str(e)) from None
    queues["cqs"] = [qt.get_cq(c).to_dict() for c in cqids]          # type: ignore[union-attr]
    queues["sqs"] = [qt.get_sq(s).to_dict() for s in sqids]          # type: ignore[union-attr]
    return {sqid: retry for sqid, (_park, retry) in plan.items() if retry}


def read_checkpoint(fd: int) -> dict[str, Any]:
    area = CheckpointArea(fd)
    try:
        got = area.read()
    finally:
        area.close()
    if got is None:
        raise Unrevivable("no whole checkpoint")
    st = msgpack.unpackb(got[1], raw=False, strict_map_key=False)
    problem = format_problem(st.get("format"), claimed_format())
    if problem is not None:
        raise Unrevivable(problem)
    if st.get("migrating"):
        raise Unrevivable("a live migration was in progress")
    st["seq"] = got[0]
    return st


async def revive(fe: "FrontEnd") -> dict[str, Any]:
    """Steps 1-4 of the module doc; returns figures for the log and the supervisor."""
    t0 = time.monotonic()
    pkg: Package = await fe.mover.taker._next("rescue", timeout=30.0)
    st = pkg.state
    try:
        if st.get("session") is None:
            raise Unrevivable("no client was connected")
        ckpt_fd = pkg.take(st["ckpt"])
        assert ckpt_fd is not None
        ck = read_checkpoint(ckpt_fd)
        fe.build(bar_fd=pkg.take(st["bar"]), qt_fd=pkg.take(st["qt"]))
        fn, server = fe.fn, fe.server
        assert fn is not None and server is not None
        server.adopt(socket.socket(fileno=pkg.take(st["listen"])),        # type: ignore[arg-type]
                     tuple(st["ino"]) if st.get("ino") else None)        # type: ignore[arg-type]
        server.sessions_served = int(st.get("sessions_served", 0))
        area = CheckpointArea(ckpt_fd)
        rescue = Rescue(fe, area)
        rescue.counts = dict(ck.get("revival") or {})
        pending, rescue.in_seq, rescue.in_off = area.journal()
        await devstate.stop(fn)
        if fn.fatal_reason:
            raise Unrevivable(f"new workers did not answer: {fn.fatal_reason}")
        session = load_session(st["session"], pkg, fn, server.dma_timeout)
        pending, unread = still_queued(pending, session.transport.sock)
        if unread:
            rescue.in_off = unread[0].off   # read again below, journaled anew from there
        resend, frames, refused = replay_plan(pending, [st.get("reply"), ck.get("reply")],
                                              st.get("inbox_fds") or [], pkg)
        session.requeue(frames)
        for f in frames:
            if f.fds:           # until they run, a next package carries them again
                rescue.inbox_fds[f.seq] = list(f.fds)
        # Guest memory first (the plans read the rings); load_device maps it again from
        # the same fds for the session and the workers.
        from reactor.guestmem import MappedGuestMemory
        probe = MappedGuestMemory()
        try:
            for iova, size, off, ref, rd, wr in st["device"]["regions"]:
                probe.map(iova, size, off, pkg.fd(ref), rd, wr)
            snap = devstate.split(bytes(ck["snapshot"]))[-1]
            sections = {name: snap.section(name) for name in nvmeimage.SECTIONS}
            ctrl = sections["controller"]
            retry = plan_io(fn.qtable, probe, ctrl)
            aplan = AdminPlan()
            if ctrl["admin"] is not None:
                aplan = plan_admin(fn.qtable, probe, ck["admin"]["applied"], list(ctrl["aer"]["outstanding"]),
                                   ck.get("aer_out") or [])
                ctrl["admin"]["sq"] = fn.qtable.get_sq(0).to_dict()      # type: ignore[union-attr]
                ctrl["admin"]["cq"] = fn.qtable.get_cq(0).to_dict()      # type: ignore[union-attr]
                ctrl["aer"]["outstanding"] = aplan.outstanding
        finally:
            probe.unmap_all()
        dev = dict(st["device"], snapshot=encode(sections, required=nvmeimage.SECTIONS),
                   fatal_reason=ck.get("fatal_reason"), slow_count=ck.get("slow_count", 0),
                   quiesces=ck.get("quiesces", 0))
        load_device(fn, dev, pkg, session)
    except Exception as e:
        pkg.close_unused()
        raise Unrevivable(str(e) or type(e).__name__) from e
    pkg.close_unused()
    # Step 4: completions, then run.
    retried = 0
    for sqid, cids in retry.items():
        w = fn.placement.worker_of_sq(sqid)
        if w is None or w not in fn.links:
            continue
        fn.links[w].request_sync({"op": "adopt", "sqid": sqid, "park": [], "retry": cids,
                                  "status": RETRY_STATUS}, timeout=10.0)
        retried += len(cids)
    runner = fn.ctrl._runner
    for cid, status, dw0 in aplan.complete:
        if runner is not None:
            runner.park(0, cid)
            runner.complete(0, cid, status, dw0)
            retried += status == RETRY_STATUS
    await devstate.start(fn)
    # Requests the dead front-end had answered in its records but maybe not on the
    # socket: their reply again (a duplicate is dropped by the client: QEMU logs
    # "unexpected reply"); those it could not have run get an error reply.
    for seq, raw in resend:
        await session.send_reply(Header.decode(raw[:16]), raw[16:])
        rescue.answered(seq)
    for seq, raw in refused:
        await session.send_reply(Header.decode(raw[:16]).error_reply(errno.EAGAIN))
        rescue.answered(seq)
    server.adopt_session(session)
    for cq in fn.ctrl.queues.cqs.values():
        if cq.ien:
            fn.irq(cq.iv)
    if runner is not None:
        fn.irq(0)
    fn.admin_kick.set()
    c = rescue.counts
    c["revived"] = int(c.get("revived", 0)) + 1
    c["retried"] = int(c.get("retried", 0)) + retried
    fe.attach_rescue(rescue)
    return {"ms": round((time.monotonic() - t0) * 1000, 2), "queues": len(fn.ctrl.queues.sqs),
            "retried": retried, "admin_completed": len(aplan.complete),
            "admin_reexecute": aplan.reexecute, "checkpoint": ck["seq"],
            "replies_resent": len(resend), "requests_rerun": len(frames), "requests_refused": len(refused)}


def still_queued(pending: list[Journaled], sock: socket.socket) -> tuple[list[Journaled], list[Journaled]]:
    """Split off the journal's tail of records peeked but maybe not taken off the socket
    (reactor/rescue.py `peeked`): they were taken in one recvmsg or not at all, so the
    socket still starts with the first of them exactly when none was taken (a message's
    bytes carry its msg_id: the next request cannot look the same).  (kept, unread)."""
    k = len(pending)
    while k and pending[k - 1].untaken:
        k -= 1
    if k == len(pending):
        return pending, []
    first = pending[k].raw
    try:
        head = sock.recv(len(first), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        head = b""
    if head == first:
        return pending[:k], pending[k:]
    return pending, []


def replay_plan(pending: list[Journaled], replies: list[Any], inbox_fds: list[Any],
                pkg: Package) -> tuple[list[tuple[int, bytes]], list[Frame], list[tuple[int, bytes]]]:
    """Journaled requests not answered: (replies to send again, frames to run again,
    requests that cannot run - their fds never reached the supervisor)."""
    known = {int(r[0]): bytes(r[1]) for r in replies if r}
    fds_of = {int(seq): refs for seq, refs in inbox_fds}
    resend: list[tuple[int, bytes]] = []
    frames: list[Frame] = []
    refused: list[tuple[int, bytes]] = []
    for rec in pending:
        if rec.seq in known:
            resend.append((rec.seq, known[rec.seq]))
            continue
        refs = fds_of.get(rec.seq, [])
        if len(refs) != rec.nfds:
            refused.append((rec.seq, rec.raw))
            continue
        fds = [fd for fd in (pkg.take(r) for r in refs) if fd is not None]
        frames.append(Frame(Header.decode(rec.raw[:16]), rec.raw[16:], fds, False, rec.seq))
    return resend, frames, refused
