"""Controller snapshot / restore as plain dicts (msgpack-able), for live migration.

Covers: registers (CC, AQA, ASQ, ACQ, INTMS) and CSTS-relevant state, admin queue
state (head/tail/phase), I/O queue records (refresh them from the workers first with
`Controller.update_queue_records`), features, AER state (outstanding CIDs, queued
events, masks), error log, Changed NS list, SMART counters, shadow doorbell config.
Clock-relative values (timestamp feature, power-on time) are stored as absolute
amounts so they survive a move to another host's monotonic clock.

Restore is not a state-table transition: the destination *becomes* the source's
state.  It re-creates the I/O queues through the hooks (with their saved
head/tail/phase; doorbells are not zeroed: the front-end restores the doorbell page)
and re-arms shadow doorbells and interrupt coalescing the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nvme.admin.features import FeatureState
from nvme.cstate import CState
from nvme.memory import DmaFault
from nvme.state import CqState, ShadowDoorbells, SqState

if TYPE_CHECKING:
    from nvme.controller import Controller

VERSION = 1


def snapshot_controller(c: "Controller") -> dict[str, Any]:
    now = c.clock()
    fs = c.features.to_dict()
    fs["timestamp_ms"] += int((now - fs.pop("timestamp_at")) * 1000)
    admin = None
    aq = c.admin_queue_state()
    if aq is not None:
        sq, cq = aq
        admin = {"sq": sq.to_dict(), "cq": cq.to_dict()}
    return {
        "version": VERSION,
        "regs": c.regs.to_dict(),
        "state": c.state.value,
        "nssro": c.nssro,
        "fatal_rdy": c._fatal_rdy,
        "fatal_reason": c.fatal_reason,
        "uptime": now - c._born,
        "admin": admin,
        "queues": c.queues.to_dict(),
        "features": fs,
        "aer": c.aer.to_dict(),
        "errlog": c.errlog.to_dict(),
        "changed_ns": {"nsids": list(c.changed_ns.nsids), "overflow": c.changed_ns.overflow},
        "stats": c.stats.to_dict(),
        "shadow": {"dbbuf": c.shadow.dbbuf, "eventidx": c.shadow.eventidx},
    }


def restore_controller(c: "Controller", d: dict[str, Any]) -> None:
    if d.get("version") != VERSION:
        raise ValueError(f"controller snapshot version {d.get('version')!r} unsupported")
    c._teardown(zero_doorbells=False)
    now = c.clock()
    c.regs.load(d["regs"])
    c.table.state = CState(d["state"])
    c.nssro = d["nssro"]
    c._fatal_rdy = d["fatal_rdy"]
    c.fatal_reason = d["fatal_reason"]
    c._born = now - d["uptime"]
    fs = dict(d["features"])
    fs["timestamp_at"] = now
    c.features = FeatureState.from_dict(fs)
    c.aer.load(d["aer"])
    c.errlog.load(d["errlog"])
    c.changed_ns.nsids = list(d["changed_ns"]["nsids"])
    c.changed_ns.overflow = d["changed_ns"]["overflow"]
    for k, v in d["stats"].items():
        setattr(c.stats, k, v)
    if d["admin"] is not None:
        try:
            c._start_admin(SqState.from_dict(d["admin"]["sq"]), CqState.from_dict(d["admin"]["cq"]))
            c._repark_aers()
        except DmaFault as e:
            c._runner = None
            c.fail(f"restored admin queue not mapped: {e}")
    c.queues.load(d["queues"])
    for cq in sorted(c.queues.cqs.values(), key=lambda q: q.cqid):
        c.hooks.io_cq_created(cq)
    for sq in sorted(c.queues.sqs.values(), key=lambda q: q.sqid):
        c.hooks.io_sq_created(sq)
    c.shadow = ShadowDoorbells(**d["shadow"])
    if c.shadow.enabled:
        c.hooks.shadow_doorbells_changed(c.shadow)
    f = c.features
    if f.interrupt_coalescing or f.coalescing_exempt:
        c.hooks.coalescing_changed(f.interrupt_coalescing & 0xFF,
                                   (f.interrupt_coalescing >> 8) & 0xFF, set(f.coalescing_exempt))
