"""The queue table: the state of every queue of one controller as fixed records in memory.

Theory of operation
-------------------
A queue's progress (SQ head, the tail last accepted from the host, CQ tail and phase,
the head last accepted, "broken doorbell" flags) is the only state that must survive
the process running the queue: a live migration snapshots it, a live upgrade hands
it to a new process, a restarted worker re-attaches to it, and the Python and native
data paths both run on it.  So it lives here, in a flat array of 32-bit words that
the front-end creates in a memfd and every worker of the controller maps, not in the
objects of whichever process runs the queue.

Layout: a 64-byte header (magic, version, queue count), then per qid a 64-byte SQ
record followed by a 64-byte CQ record (qid 0 is the admin queue).  Every field is
one u32 word; a 64-bit base is two words (lo, hi) that never change while the queue
lives.  Words are read and written one aligned 32-bit access at a time through a
memoryview cast to 'I' (DESIGN §4: another process may read any word at any
instant, so no struct.pack_into).

Ownership: the process running a queue (the worker it is placed on; the front-end for
the admin queue) is the only writer of its record while it runs it.  The front-end
writes a record before handing the queue to a worker and after taking it back.
Anybody may read at any time (stats); a consistent picture of a controller needs its
workers quiesced (then every record is final).  Words 8..15 of each record are
reserved (9..15); the crash-recovery journals (nvme.crashjournal) follow the records,
JOURNAL_WORDS per qid.

`nvme.state.SqState` / `CqState` remain the serialised form (messages, snapshots,
tests); `put_*` / `get_*` convert.
"""
from __future__ import annotations

from typing import Iterator

from .state import CqState, SqState

MAGIC = 0x5451_4E56          # "VNQT" little-endian
VERSION = 1
HEADER_WORDS = 16
RECORD_WORDS = 16            # 64 bytes
QID_WORDS = 2 * RECORD_WORDS

# SQ record words (9..11 free)
SQ_FLAGS, SQ_QID, SQ_SIZE, SQ_HEAD, SQ_TAIL, SQ_CQID, SQ_BASE_LO, SQ_BASE_HI, SQ_PRIO = range(9)
# CQ record words (9..11 free)
CQ_FLAGS, CQ_QID, CQ_SIZE, CQ_TAIL, CQ_PHASE, CQ_HEAD, CQ_BASE_LO, CQ_BASE_HI, CQ_IV = range(9)
# journal words of both records: their meaning belongs to the worker's crash recovery
J0, J1, J2, J3 = 12, 13, 14, 15

# FLAGS bits
LIVE = 1          # the queue exists
BROKEN = 2        # the last doorbell value was invalid: skipped until the host fixes it
IEN = 8           # CQ: interrupts enabled


# After the records: one crash journal per qid (nvme.crashjournal: which parked
# commands an SQ's worker holds; written only on the parking path).
JOURNAL_WORDS = 68


def table_bytes(nqueues: int) -> int:
    """Size of a table for qids 0..nqueues-1 (records, then the journals)."""
    return 4 * (HEADER_WORDS + nqueues * (QID_WORDS + JOURNAL_WORDS))


class QueueTable:
    """Records over a buffer (memfd mmap in the daemon, bytearray in tests)."""

    __slots__ = ("_w", "nqueues")

    def __init__(self, buf: object, nqueues: int | None = None, *, init: bool = False) -> None:
        mv = memoryview(buf)  # type: ignore[arg-type]
        w = (mv if mv.format == "B" else mv.cast("B")).cast("I")
        if nqueues is None:
            nqueues = (len(w) - HEADER_WORDS) // (QID_WORDS + JOURNAL_WORDS)
        if len(w) < HEADER_WORDS + nqueues * (QID_WORDS + JOURNAL_WORDS):
            raise ValueError(f"queue table of {len(w) * 4} bytes is too small for {nqueues} queues")
        self._w = w
        self.nqueues = nqueues
        if init:
            w[1] = VERSION
            w[2] = nqueues
            w[0] = MAGIC
        elif w[0] != MAGIC or w[1] != VERSION:
            raise ValueError("not a queue table (bad magic or version)")

    @classmethod
    def private(cls, nqueues: int) -> "QueueTable":
        """A table nobody else sees (tests, tools, a runner without a shared table)."""
        return cls(bytearray(table_bytes(nqueues)), nqueues, init=True)

    # -- raw records (hot loops index these directly) --------------------------
    def sq(self, qid: int) -> memoryview:
        self._check(qid)
        o = HEADER_WORDS + qid * QID_WORDS
        return self._w[o:o + RECORD_WORDS]

    def cq(self, qid: int) -> memoryview:
        self._check(qid)
        o = HEADER_WORDS + qid * QID_WORDS + RECORD_WORDS
        return self._w[o:o + RECORD_WORDS]

    def journal(self, qid: int) -> memoryview:
        """The crash journal of SQ `qid` (nvme.crashjournal), JOURNAL_WORDS words."""
        self._check(qid)
        o = HEADER_WORDS + self.nqueues * QID_WORDS + qid * JOURNAL_WORDS
        return self._w[o:o + JOURNAL_WORDS]

    def _check(self, qid: int) -> None:
        if not 0 <= qid < self.nqueues:
            raise ValueError(f"qid {qid} outside the queue table (0..{self.nqueues - 1})")

    # -- conversions -----------------------------------------------------------
    def put_sq(self, sq: SqState) -> memoryview:
        r = self.sq(sq.sqid)
        r[SQ_FLAGS] = 0                      # not live while half written
        r[SQ_QID] = sq.sqid
        r[SQ_CQID] = sq.cqid
        r[SQ_SIZE] = sq.size
        r[SQ_HEAD] = sq.head
        r[SQ_TAIL] = sq.tail
        r[SQ_PRIO] = sq.prio
        r[SQ_BASE_LO] = sq.base & 0xFFFFFFFF
        r[SQ_BASE_HI] = sq.base >> 32
        for i in range(9, RECORD_WORDS):
            r[i] = 0
        j = self.journal(sq.sqid)
        for i in range(JOURNAL_WORDS):
            j[i] = 0                         # a new owner re-journals what it parks
        r[SQ_FLAGS] = LIVE | (BROKEN if sq.broken else 0)
        return r

    def put_cq(self, cq: CqState) -> memoryview:
        r = self.cq(cq.cqid)
        r[CQ_FLAGS] = 0
        r[CQ_QID] = cq.cqid
        r[CQ_IV] = cq.iv
        r[CQ_SIZE] = cq.size
        r[CQ_TAIL] = cq.tail
        r[CQ_PHASE] = cq.phase
        r[CQ_HEAD] = cq.head
        r[CQ_BASE_LO] = cq.base & 0xFFFFFFFF
        r[CQ_BASE_HI] = cq.base >> 32
        for i in range(9, RECORD_WORDS):
            r[i] = 0
        r[CQ_FLAGS] = LIVE | (BROKEN if cq.broken else 0) | (IEN if cq.ien else 0)
        return r

    def get_sq(self, qid: int) -> SqState | None:
        return sq_state(self.sq(qid))

    def get_cq(self, qid: int) -> CqState | None:
        return cq_state(self.cq(qid))

    def clear_sq(self, qid: int) -> None:
        self.sq(qid)[SQ_FLAGS] = 0

    def clear_cq(self, qid: int) -> None:
        self.cq(qid)[CQ_FLAGS] = 0

    def clear(self) -> None:
        for qid in range(self.nqueues):
            self.clear_sq(qid)
            self.clear_cq(qid)

    def live_sqs(self) -> Iterator[SqState]:
        for qid in range(self.nqueues):
            s = self.get_sq(qid)
            if s is not None:
                yield s

    def live_cqs(self) -> Iterator[CqState]:
        for qid in range(self.nqueues):
            c = self.get_cq(qid)
            if c is not None:
                yield c


def sq_state(r: memoryview) -> SqState | None:
    """The record as a plain SqState (a copy), or None if the SQ does not exist."""
    f = r[SQ_FLAGS]
    if not f & LIVE:
        return None
    return SqState(sqid=r[SQ_QID], cqid=r[SQ_CQID], base=r[SQ_BASE_LO] | (r[SQ_BASE_HI] << 32),
                   size=r[SQ_SIZE], prio=r[SQ_PRIO], head=r[SQ_HEAD], tail=r[SQ_TAIL],
                   broken=bool(f & BROKEN))


def cq_state(r: memoryview) -> CqState | None:
    f = r[CQ_FLAGS]
    if not f & LIVE:
        return None
    return CqState(cqid=r[CQ_QID], base=r[CQ_BASE_LO] | (r[CQ_BASE_HI] << 32), size=r[CQ_SIZE],
                   iv=r[CQ_IV], ien=bool(f & IEN), tail=r[CQ_TAIL], phase=r[CQ_PHASE],
                   head=r[CQ_HEAD], broken=bool(f & BROKEN))
