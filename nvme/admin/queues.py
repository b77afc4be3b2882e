"""Create/Delete I/O Submission and Completion Queues (NVMe Base 1.4 5.3-5.6).

The controller keeps the authoritative table of which I/O queues exist (`IoQueues`);
the queues themselves run in workers, reached through the hooks.  Checks are made
in the order the spec lists the status codes, so each bad field gets its own answer:
queue id, CQ reference, size, contiguity, PRP offset, interrupt vector.
A new queue's doorbells (and shadow doorbell / EventIdx slots) are zeroed first:
old Linux drivers leave stale values behind (SPDK commit 0d0524b9e0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nvme.errors import CommandError
from nvme.memory import DmaFault
from nvme.ring import CQE_SIZE, SQE_SIZE
from nvme.state import CqState, SqState
from nvme.status import Status

from .command import AdminCmd

if TYPE_CHECKING:
    from nvme.controller import Controller

IOSQES_64 = 6  # CC.IOSQES: 2^6 = 64-byte SQEs, the only size we support
IOCQES_16 = 4  # CC.IOCQES: 2^4 = 16-byte CQEs


@dataclass(slots=True)
class IoQueues:
    sqs: dict[int, SqState] = field(default_factory=dict)
    cqs: dict[int, CqState] = field(default_factory=dict)
    allocated: tuple[int, int] | None = None   # (nsq, ncq) from Set Features 07h, 1's based

    def limit(self, max_io_queues: int, cq: bool) -> int:
        if self.allocated is None:
            return max_io_queues
        return self.allocated[1 if cq else 0]

    def sqs_on(self, cqid: int) -> list[int]:
        return [s.sqid for s in self.sqs.values() if s.cqid == cqid]

    def to_dict(self) -> dict[str, Any]:
        return {"sqs": [s.to_dict() for s in sorted(self.sqs.values(), key=lambda s: s.sqid)],
                "cqs": [c.to_dict() for c in sorted(self.cqs.values(), key=lambda c: c.cqid)],
                "allocated": list(self.allocated) if self.allocated else None}

    def load(self, d: dict[str, Any]) -> None:
        self.sqs = {s["sqid"]: SqState.from_dict(s) for s in d["sqs"]}
        self.cqs = {c["cqid"]: CqState.from_dict(c) for c in d["cqs"]}
        self.allocated = tuple(d["allocated"]) if d["allocated"] else None  # type: ignore[assignment]


def _check_qid(c: "Controller", qid: int, cq: bool) -> None:
    table = c.queues.cqs if cq else c.queues.sqs
    if qid == 0 or qid > c.queues.limit(c.cfg.max_io_queues, cq) or qid in table:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"qid {qid}")


def _check_size(c: "Controller", qsize0: int) -> int:
    entries = qsize0 + 1
    if entries < 2 or entries > c.cfg.mqes:
        raise CommandError(Status.INVALID_QUEUE_SIZE, f"{entries} entries")
    return entries


def _check_base(c: "Controller", base: int, nbytes: int, write: bool) -> None:
    if base & 0xFFF:
        raise CommandError(Status.INVALID_PRP_OFFSET, "queue base not page aligned")
    try:
        c.mem.view(base, nbytes, write=write)
    except DmaFault:
        raise CommandError(Status.INVALID_FIELD, "queue memory not mapped") from None


def handle_create_io_cq(c: "Controller", cmd: AdminCmd) -> int:
    qid, qsize0 = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
    pc, ien, iv = cmd.cdw11 & 1, bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
    _check_qid(c, qid, cq=True)
    entries = _check_size(c, qsize0)
    if not pc:
        raise CommandError(Status.INVALID_FIELD, "PC=0: non-contiguous queues unsupported")
    if (c.regs.cc >> 20) & 0xF != IOCQES_16:
        raise CommandError(Status.INVALID_FIELD, "CC.IOCQES is not 16 bytes")
    _check_base(c, cmd.prp1, entries * CQE_SIZE, write=True)
    if iv >= c.cfg.msix_vectors:
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"iv {iv}")
    cq = CqState(cqid=qid, base=cmd.prp1, size=entries, iv=iv, ien=ien)
    c.zero_doorbells(qid, sq=False)
    c.queues.cqs[qid] = cq
    c.hooks.io_cq_created(cq)
    return 0


def handle_create_io_sq(c: "Controller", cmd: AdminCmd) -> int:
    qid, qsize0 = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
    pc, prio, cqid = cmd.cdw11 & 1, (cmd.cdw11 >> 1) & 3, cmd.cdw11 >> 16
    _check_qid(c, qid, cq=False)
    if cqid == 0 or cqid not in c.queues.cqs:
        raise CommandError(Status.COMPLETION_QUEUE_INVALID, f"cqid {cqid}")
    entries = _check_size(c, qsize0)
    if not pc:
        raise CommandError(Status.INVALID_FIELD, "PC=0: non-contiguous queues unsupported")
    if (c.regs.cc >> 16) & 0xF != IOSQES_64:
        raise CommandError(Status.INVALID_FIELD, "CC.IOSQES is not 64 bytes")
    _check_base(c, cmd.prp1, entries * SQE_SIZE, write=False)  # SQs are only read
    sq = SqState(sqid=qid, cqid=cqid, base=cmd.prp1, size=entries, prio=prio)
    c.zero_doorbells(qid, sq=True)
    c.queues.sqs[qid] = sq
    c.hooks.io_sq_created(sq)
    return 0


def handle_delete_io_sq(c: "Controller", cmd: AdminCmd) -> int | None:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in c.queues.sqs or qid in c.sq_deletions:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"sqid {qid}")
    # Commands of this SQ that the front-end itself is still running (slow path: DMA
    # messages to the client) must finish first, and they need the front-end's loop,
    # which this admin command runs on: so the command is parked and completed by
    # Controller.sq_quiet() when the last of them is done (spec: every command of a
    # deleted SQ is completed or aborted before the delete completes).
    if c.hooks.sq_busy(qid):
        c.sq_deletions[qid] = cmd.cid
        return None
    delete_io_sq(c, qid)
    return 0


def delete_io_sq(c: "Controller", qid: int) -> None:
    # The hook returns once the worker let go of the queue (parked commands completed).
    c.hooks.io_sq_deleted(qid)
    del c.queues.sqs[qid]
    c.zero_doorbells(qid, sq=True)


def handle_delete_io_cq(c: "Controller", cmd: AdminCmd) -> int:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in c.queues.cqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"cqid {qid}")
    if c.queues.sqs_on(qid):
        raise CommandError(Status.INVALID_QUEUE_DELETION, f"SQs {c.queues.sqs_on(qid)} use CQ {qid}")
    c.hooks.io_cq_deleted(qid)
    del c.queues.cqs[qid]
    c.zero_doorbells(qid, sq=False)
    return 0
