"""QueueRunner: the poll engine for the SQs/CQs of ONE controller.

Theory of operation
-------------------
Used by workers (I/O queues, IoExecutor plugged in) and by the front-end (admin
queue, admin executor plugged in).  One `poll()` is one batch:

1. For every CQ read the host's head once (shadow doorbell for I/O queues when
   Doorbell Buffer Config is active, else the doorbell page) and validate it: it
   must be < size and may only advance over entries we posted.  A bad value ->
   doorbell_error(1, cqid) ONCE, the CQ is marked broken and skipped (its SQs are
   not fetched) until the host writes a valid head.  Never spin on garbage.
2. For every SQ (round robin start) read the tail once, validate (< size; bad ->
   doorbell_error(1, sqid) once, skipped until fixed).  Then fetch at most
   `cq free slots - parked commands on that CQ` SQEs, so a CQ can never overflow
   (SQ-side flow control, as SPDK does).  Each SQE is read through the read-only SQ
   view AFTER the tail that covers it was read, its CID read once, and handed to
   `execute(sqe, sqid)`.  A result posts a CQE with SQHD = new head and SQID filled
   in (DW3 written last, see nvme.ring); `None` parks the command: it keeps its CQ
   slot reserved until `complete()`.
3. Interrupts: at most one irq per CQ per batch, only if IEN and something was
   posted, subject to Interrupt Coalescing (fire when THR+1 entries are pending or
   TIME*100us passed since the first un-signalled one; admin CQ and exempt vectors
   always fire at once).  `coalesce_deadline()` tells the poller when to come back.

EventIdx rearm protocol (shadow doorbells, I/O SQs only): after consuming an SQ we
store EventIdx = the tail we consumed up to (one 32-bit store), issue a full
barrier, and re-read the shadow tail.  If it moved, the host may have published its
tail before seeing our EventIdx and so not rung the real doorbell: `has_work()`
stays true and the poller must poll again instead of sleeping.  CQ EventIdx is set
to 0xFFFFFFFF ("never ring"): we read shadow CQ heads ourselves.

Lazy EventIdx (`lazy_eventidx=True`, used with trapped doorbells, where every MMIO
doorbell write the guest makes costs a vfio-user message): while the poller is busy
it reads the shadow tails itself, so poll() leaves EventIdx behind and the guest,
whose need_event(EventIdx, new, old) test then fails, does not write the doorbell.
Before the poller sleeps it calls `prepare_sleep()`, which arms every SQ (EventIdx =
the shadow tail it reads now), issues a full barrier and re-reads the shadow tails
(SPDK's vfio_user_sq_rearm): a tail that moved means the host may have checked the
old EventIdx and not rung, so prepare_sleep() says "poll again" instead of sleeping.
An SQ whose pending entries wait for CQ room has its CQ's EventIdx armed the same way
(= the head we know), so the host's next CQ head update rings the doorbell and wakes
us; CQs never drop back to "never ring" (an old EventIdx traps once per ring wrap,
as 0xFFFFFFFF does with Linux's 16-bit need_event).

Queue state (SEAMS S1): head/tail/phase/broken of every queue live in the controller's
queue table (nvme.qtable): the front-end reads them (stats, migration snapshots), a
live upgrade hands them to a new process, a restarted worker re-attaches to them, the
native data path runs on them.  The runner owning a queue is the only writer of its
record, so it keeps the words it writes as attributes of its _Sq/_Cq (a memoryview
item costs twice an attribute, and the QD1 poll reads a dozen of them) and stores
every change through to the record in the same place: at the end of a batch the
record is exact.  Whatever else writes a record (the native path, a restore) is
followed by `reload()`, which re-reads them.  Parked commands and interrupt
bookkeeping are this process's own.

Errors: guest input never raises out of poll().  An exception from `execute` other
than a per-command status is our bug: logged and completed with INTERNAL_ERROR so
the guest does not hang; NeedsMessageDma escaping execute (the worker should park
and forward such commands) completes with DATA_TRANSFER_ERROR.  Queue memory that
cannot be mapped on set_memory() is reported through `fault(qid, reason)` (the
controller goes CFS) and the queue is skipped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .crashjournal import park_cid, unpark_slot
from .doorbell import Doorbells, ShadowDoorbellView
from .fence import full_barrier
from .memory import DmaFault, GuestMemory, NeedsMessageDma
from .qtable import (BROKEN, CQ_FLAGS, CQ_HEAD, CQ_PHASE, CQ_TAIL, SQ_FLAGS, SQ_HEAD, SQ_TAIL,
                     QueueTable, cq_state, sq_state)
from .ring import CQE_SIZE, SQE_SIZE, cq_head_ok, write_cqe
from .state import CqState, ShadowDoorbells, SqState
from .status import DNR, Status

log = logging.getLogger(__name__)

ExecuteFn = Callable[[memoryview, int], "tuple[int, int] | None"]
INVALID_DOORBELL_VALUE = 1


@dataclass(slots=True, eq=False)
class _Cq:
    r: memoryview                     # the CQ's queue-table record (words, see nvme.qtable)
    qid: int
    base: int
    size: int
    iv: int
    ien: bool
    tail: int = 0                     # = r[CQ_TAIL]   (written through, see module doc)
    phase: int = 1                    # = r[CQ_PHASE]
    head: int = 0                     # = r[CQ_HEAD]
    broken: bool = False              # = r[CQ_FLAGS] & BROKEN
    words: memoryview | None = None   # RW view of the ring, cast 'I'
    inflight: int = 0                 # parked commands that will post here
    pending: int = 0                  # posted, not yet signalled
    first_ns: int = 0                 # when the oldest un-signalled entry was noticed
    faulted: bool = False
    nsq: int = 0
    dbi: int = 0                      # index of the head doorbell in Doorbells.words
    stale: int | None = None          # doorbell value to disregard (see set_shadow)


@dataclass(slots=True, eq=False)
class _Sq:
    r: memoryview                     # the SQ's queue-table record
    qid: int
    base: int
    size: int
    cq: _Cq
    head: int = 0                     # = r[SQ_HEAD]   (written through, see module doc)
    tail: int = 0                     # = r[SQ_TAIL]
    broken: bool = False              # = r[SQ_FLAGS] & BROKEN
    words: memoryview | None = None   # RO view of the ring, cast 'I'
    faulted: bool = False
    parked: set[int] = field(default_factory=set)   # CIDs parked on this SQ
    j: memoryview | None = None       # the SQ's crash journal (nvme.crashjournal)
    jslot: dict[int, int] = field(default_factory=dict)   # parked CID -> journal slot
    dbi: int = 0                      # index of the tail doorbell in Doorbells.words
    stale: int | None = None          # doorbell value to disregard (see set_shadow)


# How long a worker lets commands parked on an asynchronous backend finish before a
# Delete I/O SQ completes them as ABORTED_SQ_DELETION (a stalled server must not hang the
# worker).  The front-end waits longer than this for the worker's answer.
SQ_DELETE_DRAIN_S = 2.0


class QueueRunner:
    def __init__(self, *, doorbells: Doorbells, mem: GuestMemory, execute: ExecuteFn,
                 irq: Callable[[int], None], doorbell_error: Callable[[int, int], None],
                 shadow: ShadowDoorbells | None = None,
                 fault: Callable[[int, str], None] | None = None, page_size: int = 4096,
                 lazy_eventidx: bool = False, table: QueueTable | None = None) -> None:
        self._db = doorbells
        self._lazy = lazy_eventidx
        self._mem = mem
        self._execute = execute
        self._irq = irq
        self._db_error = doorbell_error
        self._fault = fault
        self._page_size = page_size
        self.table = table if table is not None else QueueTable.private(doorbells.nqueues)
        self._cqs: dict[int, _Cq] = {}
        self._cqlist: list[_Cq] = []       # the same CQs, for the per-poll loop
        self._dbw = doorbells.words
        self._sqs: dict[int, _Sq] = {}
        self._order: list[_Sq] = []
        self._rr = 0
        self._dirty: list[_Cq] = []
        self.dirty: Any = None             # dirty-page log (migration): mark(addr, n), or None
        self._paused = False
        self._more = False
        self._nparked = 0
        self.errors = 0                   # completions posted with a non-zero status
        # Failed commands for the controller's Error Information log (sqid, cid, status,
        # lba, nsid): collected on the error path only, taken by the owner after a poll.
        self.failed: list[tuple[int, int, int, int, int]] = []
        self.failed_dropped = 0
        self._thr = 0
        self._time_ns = 0
        self._exempt: set[int] = set()
        self._shadow_cfg: ShadowDoorbells | None = None
        self._shadow: ShadowDoorbellView | None = None
        if shadow is not None and shadow.enabled:
            self.set_shadow(shadow)

    # -- queue set ----------------------------------------------------------
    def add_cq(self, cq: CqState) -> None:
        """Write cq into the queue table and run it.  Raises DmaFault if the ring is
        not mapped (the caller picks the status; the record is left as written)."""
        if cq.cqid in self._cqs or cq.cqid >= self._db.nqueues:
            raise ValueError(f"CQ {cq.cqid} exists or has no doorbell")
        self.table.put_cq(cq)
        self.attach_cq(cq.cqid)

    def attach_cq(self, cqid: int) -> None:
        """Run the CQ whose record is already in the queue table (restore, re-attach)."""
        if cqid in self._cqs or cqid >= self._db.nqueues:
            raise ValueError(f"CQ {cqid} exists or has no doorbell")
        st = self.table.get_cq(cqid)
        if st is None:
            raise ValueError(f"CQ {cqid} has no live record in the queue table")
        words = self._mem.view(st.base, st.size * CQE_SIZE, write=True).cast("I")
        c = _Cq(self.table.cq(cqid), cqid, st.base, st.size, st.iv, st.ien, st.tail, st.phase,
                st.head, st.broken, words, dbi=(cqid << 1) | 1)
        self._cqs[cqid] = c
        self._cqlist.append(c)
        if self._shadow is not None and cqid:
            self._shadow.set_cq_eventidx(cqid, 0xFFFFFFFF)

    def add_sq(self, sq: SqState) -> None:
        if sq.sqid in self._sqs or sq.sqid >= self._db.nqueues:
            raise ValueError(f"SQ {sq.sqid} exists or has no doorbell")
        if sq.cqid not in self._cqs:
            raise ValueError(f"SQ {sq.sqid}: CQ {sq.cqid} does not exist")
        self.table.put_sq(sq)
        self.attach_sq(sq.sqid)

    def attach_sq(self, sqid: int) -> None:
        if sqid in self._sqs or sqid >= self._db.nqueues:
            raise ValueError(f"SQ {sqid} exists or has no doorbell")
        st = self.table.get_sq(sqid)
        if st is None:
            raise ValueError(f"SQ {sqid} has no live record in the queue table")
        cq = self._cqs.get(st.cqid)
        if cq is None:
            raise ValueError(f"SQ {sqid}: CQ {st.cqid} does not exist")
        words = self._mem.view(st.base, st.size * SQE_SIZE, write=False).cast("I")
        s = _Sq(self.table.sq(sqid), sqid, st.base, st.size, cq, st.head, st.tail, st.broken,
                words, dbi=sqid << 1, j=self.table.journal(sqid))
        cq.nsq += 1
        self._sqs[sqid] = s
        self._order.append(s)
        if self._shadow is not None and sqid:
            self._shadow.set_sq_eventidx(sqid, st.tail)

    def remove_sq(self, sqid: int) -> SqState | None:
        """Stop running the SQ; commands still parked on it complete with
        ABORTED_SQ_DELETION.  Returns its final record (left in the table: the
        front-end owns it again), or None when the front-end already cleared it (it
        stopped waiting for this worker: a timeout under load made the controller
        fatal, and the message arrived after)."""
        s = self._sqs.pop(sqid)
        self._order.remove(s)
        cq = s.cq
        cq.nsq -= 1
        for cid in sorted(s.parked):
            self._nparked -= 1
            cq.inflight -= 1
            self._post(cq, s, cid, Status.ABORTED_SQ_DELETION, 0, unpark=True)
        s.parked.clear()
        self._signal()
        return sq_state(s.r)

    def release_views(self) -> None:
        """The runner is being thrown away: drop every view of guest memory it holds, so
        the mappings can be closed even while something still refers to the runner."""
        for c in self._cqs.values():
            c.words = None
        for s in self._sqs.values():
            s.words = None
        self._shadow = None

    def remove_cq(self, cqid: int) -> CqState | None:
        """Stop running the CQ (no SQ may use it); its final record, or None (remove_sq)."""
        c = self._cqs[cqid]
        if c.nsq:
            raise ValueError(f"CQ {cqid} still has SQs")
        del self._cqs[cqid]
        self._cqlist.remove(c)
        if c in self._dirty:
            self._dirty.remove(c)
        return cq_state(c.r)

    # -- configuration --------------------------------------------------------
    def set_memory(self, mem: GuestMemory) -> None:
        """Re-map every ring after the DMA map changed (called while quiesced)."""
        self._mem = mem
        for c in self._cqs.values():
            try:
                c.words = mem.view(c.base, c.size * CQE_SIZE, write=True).cast("I")
                c.faulted = False
            except DmaFault as e:
                self._queue_fault(c, c.qid, f"CQ memory: {e}")
        for s in self._sqs.values():
            try:
                s.words = mem.view(s.base, s.size * SQE_SIZE, write=False).cast("I")
                s.faulted = False
            except DmaFault as e:
                self._queue_fault(s, s.qid, f"SQ memory: {e}")
        if self._shadow_cfg is not None:
            try:
                self._shadow = ShadowDoorbellView(mem, self._shadow_cfg, self._page_size)
                self._shadow.dirty = self.dirty
            except DmaFault:
                log.info("shadow doorbell pages unmapped: back to the doorbell page",
                         extra={"ratelimit": "shadow pages unmapped"})
                self.set_shadow(None)

    def _queue_fault(self, q: _Cq | _Sq, qid: int, reason: str) -> None:
        q.words = None
        q.faulted = True
        if self._fault is not None:
            self._fault(qid, reason)
        else:
            log.warning("queue %d faulted: %s", qid, reason, extra={"ratelimit": "queue fault"})

    def set_shadow(self, shadow: ShadowDoorbells | None) -> None:
        """Enable (raises DmaFault if the pages are not mapped) or drop shadow doorbells.

        Dropping: the doorbell page holds whatever the host last rang, which with
        shadow doorbells may be far behind what we consumed.  We never write it (a
        store could overwrite a doorbell write the host makes at that instant); each
        I/O queue instead disregards the value its doorbell holds now until the host
        writes a different one.
        """
        if shadow is None or not shadow.enabled:
            if self._shadow is not None or self._shadow_cfg is not None:
                dbw = self._dbw
                for s in self._sqs.values():
                    if s.qid:
                        s.stale = dbw[s.dbi]
                for c in self._cqs.values():
                    if c.qid:
                        c.stale = dbw[c.dbi]
            self._shadow = None
            self._shadow_cfg = None
            return
        view = ShadowDoorbellView(self._mem, shadow, self._page_size)
        view.dirty = self.dirty
        self._shadow, self._shadow_cfg = view, shadow
        for s in self._sqs.values():
            s.stale = None
            if s.qid:
                view.set_sq_eventidx(s.qid, s.tail)
        for c in self._cqs.values():
            c.stale = None
            if c.qid:
                view.set_cq_eventidx(c.qid, 0xFFFFFFFF)

    def set_coalescing(self, threshold: int, time_100us: int, exempt_vectors: set[int]) -> None:
        """Interrupt Coalescing feature (08h): THR (0's based) and TIME (100 us units)."""
        self._thr = threshold & 0xFF
        self._time_ns = (time_100us & 0xFF) * 100_000
        self._exempt = set(exempt_vectors)

    def pause_fetch(self, paused: bool) -> None:
        self._paused = paused

    def set_dirty(self, log: Any) -> None:
        """Dirty-page logging on (a DirtyLog) or off (None): CQEs and EventIdx stores are
        marked after they are written, once per CQ per batch (migration.dirty)."""
        self.dirty = log
        if self._shadow is not None:
            self._shadow.dirty = log

    # -- the batch --------------------------------------------------------------
    def poll(self, budget: int = 256) -> int:
        done = 0
        self._more = False
        sh = self._shadow
        dbw = self._dbw          # one aligned 32-bit load per doorbell read
        for c in self._cqlist:
            if sh is not None and c.dbi != 1:
                h = sh.cq_head(c.qid)
            else:
                h = dbw[c.dbi]
            if (h != c.head or c.broken) and not c.faulted:
                self._cq_doorbell(c, h, sh is None)
        order = self._order
        if self._paused or not order:
            if self._dirty:
                self._signal()
            return 0
        n = len(order)
        if n == 1:
            start = 0
        else:
            start = self._rr % n
            self._rr = start + 1
        for k in range(n):
            s = order[start + k - n if start + k >= n else start + k]
            # Idle fast path (no shadow doorbells): tail unchanged and nothing
            # pending means _run_sq would do nothing; skip the call.
            if sh is None and dbw[s.dbi] == s.tail and s.head == s.tail and not s.broken:
                continue
            if done >= budget:
                self._more = True
                break
            done += self._run_sq(s, budget - done, sh)
        if self._dirty:
            self._signal()
        return done

    def _cq_doorbell(self, c: _Cq, h: int, from_page: bool) -> None:
        """A new (or still broken) CQ head: accept it or report it once (NVMe §5.1 / 4.2)."""
        if from_page and c.stale is not None:
            if h == c.stale:
                return                     # left over from shadow mode: not a host write
            c.stale = None
        r = c.r
        if cq_head_ok(c.head, c.tail, c.size, h):
            c.head = r[CQ_HEAD] = h
            if c.broken:
                c.broken = False
                r[CQ_FLAGS] &= ~BROKEN
        elif not c.broken:
            c.broken = True
            r[CQ_FLAGS] |= BROKEN
            self._db_error(INVALID_DOORBELL_VALUE, c.qid)

    def _run_sq(self, s: _Sq, budget: int, sh: ShadowDoorbellView | None) -> int:
        c = s.cq
        if s.faulted or c.faulted or c.broken:
            return 0
        qid = s.qid
        use_shadow = sh is not None and qid != 0
        tail = sh.sq_tail(qid) if use_shadow else self._dbw[s.dbi]  # type: ignore[union-attr]
        size = s.size
        if tail != s.tail or s.broken:
            if s.stale is not None and not use_shadow:
                if tail == s.stale:
                    tail = s.tail          # left over from shadow mode: not a host write
                else:
                    s.stale = None
            if not 0 <= tail < size:
                if not s.broken:
                    s.broken = True
                    s.r[SQ_FLAGS] |= BROKEN
                    self._db_error(INVALID_DOORBELL_VALUE, qid)
                return 0
            s.tail = s.r[SQ_TAIL] = tail
            if s.broken:
                s.broken = False
                s.r[SQ_FLAGS] &= ~BROKEN
        # Pending SQEs, bounded by CQ room minus parked commands (ring.fetch_budget).
        csize = c.size
        room = csize - 1 - (c.tail - c.head) % csize - c.inflight
        n = (tail - s.head) % size
        if n > room:
            n = room if room > 0 else 0
        if n > budget:
            n = budget
            self._more = True
        done = self._fetch(s, n) if n else 0
        if use_shadow and not self._lazy:
            assert sh is not None
            # Store (and fence) only a new value: an unchanged EventIdx was fenced when it
            # was stored, and a store of the same value would still be a guest-memory
            # write (dirty page while migrating).  The shadow tail is re-read either way.
            if sh.sq_eventidx(qid) != tail:
                sh.set_sq_eventidx(qid, tail)
                full_barrier()
            if sh.sq_tail(qid) != tail:
                self._more = True
        if s.head != tail and not self._more:
            self._more = self._budget(s) > 0
        return done

    @staticmethod
    def _budget(s: _Sq) -> int:
        """ring.fetch_budget on the runner's view: SQEs that may be fetched right now."""
        c = s.cq
        room = c.size - 1 - (c.tail - c.head) % c.size - c.inflight
        if room <= 0:
            return 0
        pend = (s.tail - s.head) % s.size
        return pend if pend < room else room

    def _fetch(self, s: _Sq, n: int) -> int:
        """Fetch, execute and complete n SQEs of s (the caller checked CQ room)."""
        c = s.cq
        qid = s.qid
        # Hot loop: everything it touches is in locals, the CQE is posted inline
        # (same stores in the same order as nvme.ring.write_cqe: DW0..DW2, then DW3
        # in one store; tests/unit/test_cqe_store_order.py records them).
        words = s.words
        assert words is not None
        cw = c.words
        execute = self._execute
        size = s.size
        head = s.head
        ctail, cphase, csize = c.tail, c.phase, c.size
        sqid_hi = (qid & 0xFFFF) << 16
        parked = s.parked
        posted = 0
        done = 0
        for _ in range(n):
            base = head << 4
            sqe = words[base:base + 16]
            cid = words[base] >> 16
            head += 1
            if head == size:
                head = 0
            if self._nparked and cid in parked:
                res: tuple[int, int] | None = (Status.CID_CONFLICT, 0)
            else:
                try:
                    res = execute(sqe, qid)
                except NeedsMessageDma:
                    log.warning("SQ %d CID %d needs message DMA and was not parked", qid, cid,
                                extra={"ratelimit": "message DMA not parked"})
                    res = (Status.DATA_TRANSFER_ERROR, 0)
                except Exception:  # our bug, not the guest's: keep the guest alive
                    log.exception("executor failed on SQ %d CID %d", qid, cid)
                    res = (Status.INTERNAL_ERROR, 0)
                if res is None:
                    # Journal the CID before the head moves past it (nvme.crashjournal:
                    # a worker that dies now leaves it findable), then publish the head;
                    # the parked command's later CQE reports this SQHD.
                    s.jslot[cid] = park_cid(s.j, cid)  # type: ignore[arg-type]
                    s.head = s.r[SQ_HEAD] = head
                    parked.add(cid)
                    c.inflight += 1
                    self._nparked += 1
                    continue
            done += 1
            if cw is None:
                continue
            status = res[0]
            if status:
                self.errors += 1
                self._note_failure(qid, cid, status, sqe)
            i = ctail << 2
            cw[i] = res[1] & 0xFFFFFFFF
            cw[i + 1] = 0                                   # DW1 reserved
            cw[i + 2] = head | sqid_hi
            cw[i + 3] = (cid | (((((status & 0x7FF) << 1) | DNR) if status else 0) | cphase) << 16)
            ctail += 1
            if ctail == csize:
                ctail = 0
                cphase ^= 1
            posted += 1
        s.head = s.r[SQ_HEAD] = head
        if posted:
            if self.dirty is not None:     # the entries just written (after their stores)
                first = ctail - posted
                if first >= 0:
                    self.dirty.mark(c.base + (first << 4), posted << 4)
                else:
                    self.dirty.mark(c.base + ((csize + first) << 4), -first << 4)
                    self.dirty.mark(c.base, ctail << 4)
            cr = c.r
            c.tail = cr[CQ_TAIL] = ctail
            if cphase != c.phase:
                c.phase = cr[CQ_PHASE] = cphase
            if c.pending == 0:
                c.first_ns = 0
                self._dirty.append(c)
            c.pending += posted
        return done

    def _post(self, c: _Cq, s: _Sq, cid: int, status: int, dw0: int, unpark: bool = False) -> None:
        if c.words is None:
            if unpark:
                unpark_slot(s.j, s.jslot.pop(cid, -1), not s.parked)  # type: ignore[arg-type]
            return
        if status:
            self.errors += 1
            if status != Status.ABORTED_SQ_DELETION:     # the host's own doing: not an error
                self._note_failure(s.qid, cid, status, None)
        write_cqe(c.words, c.tail, c.phase, dw0, s.head, s.qid, cid, status)
        if self.dirty is not None:
            self.dirty.mark(c.base + (c.tail << 4), 16)
        if unpark:
            # Between the entry and the published tail (nvme.crashjournal): a crash here
            # leaves a CQE the recovery scan finds, never a journaled command that is
            # both completed and retried.
            unpark_slot(s.j, s.jslot.pop(cid, -1), not s.parked)  # type: ignore[arg-type]
        t = c.tail + 1
        cr = c.r
        if t == c.size:
            t = 0
            c.phase = cr[CQ_PHASE] = c.phase ^ 1
        c.tail = cr[CQ_TAIL] = t
        if c.pending == 0:
            c.first_ns = 0
            self._dirty.append(c)
        c.pending += 1

    def _note_failure(self, sqid: int, cid: int, status: int, sqe: memoryview | None) -> None:
        """Keep a failed command for the Error Information log (bounded between takes)."""
        if len(self.failed) >= 64:
            self.failed_dropped += 1
            return
        nsid = lba = 0
        if sqe is not None:
            nsid = sqe[1]
            if sqe[0] & 0xFF in (0x01, 0x02, 0x05, 0x08):   # write, read, compare, write zeroes
                lba = sqe[10] | (sqe[11] << 32)
        self.failed.append((sqid, cid, int(status), lba, nsid))

    def take_failures(self) -> list[tuple[int, int, int, int, int]]:
        out, self.failed = self.failed, []
        return out

    def reload(self) -> None:
        """Re-read every queue's words from the table after another writer (the native
        data path, a restore) changed them (see the module doc)."""
        for c in self._cqs.values():
            r = c.r
            c.tail, c.phase, c.head = r[CQ_TAIL], r[CQ_PHASE], r[CQ_HEAD]
            c.broken = bool(r[CQ_FLAGS] & BROKEN)
        for s in self._sqs.values():
            r = s.r
            s.head, s.tail = r[SQ_HEAD], r[SQ_TAIL]
            s.broken = bool(r[SQ_FLAGS] & BROKEN)

    def _signal(self) -> None:
        if not self._dirty:
            return
        keep: list[_Cq] = []
        now = 0
        for c in self._dirty:
            if not c.ien:
                c.pending = 0
                continue
            if (self._thr or self._time_ns) and c.qid and c.iv not in self._exempt:
                if c.pending <= self._thr:
                    now = now or time.monotonic_ns()
                    if c.first_ns == 0:
                        c.first_ns = now
                    if now - c.first_ns < self._time_ns:
                        keep.append(c)
                        continue
            c.pending = 0
            self._irq(c.iv)
        self._dirty = keep

    # -- parked commands ------------------------------------------------------
    def complete(self, sqid: int, cid: int, status: int, dw0: int, signal: bool = True) -> None:
        """Finish a parked command; unknown (sqid, cid) pairs are ignored (SQ deleted).

        signal=False leaves the interrupt to a later `signal_pending()`: a caller finishing
        a batch (backend completions) raises one per CQ, not one per command."""
        s = self._sqs.get(sqid)
        if s is None or cid not in s.parked:
            log.debug("complete() for unknown command SQ %d CID %d", sqid, cid)
            return
        s.parked.discard(cid)
        s.cq.inflight -= 1
        self._nparked -= 1
        self._post(s.cq, s, cid, status, dw0, unpark=True)
        if signal:
            self._signal()

    def signal_pending(self) -> None:
        """Interrupts for what complete(signal=False) posted (coalescing rules apply)."""
        self._signal()

    def park(self, sqid: int, cid: int) -> None:
        """Count (sqid, cid) as parked without fetching it (restored AER commands)."""
        s = self._sqs[sqid]
        if cid in s.parked:
            return
        s.jslot[cid] = park_cid(s.j, cid)  # type: ignore[arg-type]
        s.parked.add(cid)
        s.cq.inflight += 1
        self._nparked += 1

    def inflight(self, sqid: int | None = None) -> int:
        """Parked commands: of the whole runner, or of one SQ."""
        if sqid is None:
            return self._nparked
        s = self._sqs.get(sqid)
        return len(s.parked) if s is not None else 0

    def has_work(self) -> bool:
        """True if the last poll left work behind (budget, EventIdx race, pending SQEs)."""
        return self._more

    def set_lazy_eventidx(self, lazy: bool) -> None:
        """Lazy EventIdx (see the module doc): only prepare_sleep() arms the SQs."""
        self._lazy = lazy

    def prepare_sleep(self) -> bool:
        """About to sleep until a doorbell write wakes us: arm EventIdx, then re-check.

        Returns False if there is work to poll for first (the caller must not sleep),
        True if every doorbell change from now on reaches a doorbell write: with
        shadow doorbells each SQ's EventIdx is the shadow tail read here and, for an
        SQ whose entries wait for CQ room, the CQ's EventIdx is the head we know.
        Without shadow doorbells there is nothing to arm; only pending work counts.
        """
        if self._more:
            return False
        sh = self._shadow
        dbw = self._dbw
        armed: list[tuple[_Sq, int, int | None]] = []
        for s in self._order:
            c = s.cq
            if s.faulted or c.faulted:
                continue        # reported as a fault: the host resets us, nothing to wait for
            qid = s.qid
            use_shadow = sh is not None and qid != 0
            tail = sh.sq_tail(qid) if use_shadow else dbw[s.dbi]  # type: ignore[union-attr]
            sbroken, cbroken = s.broken, c.broken
            if tail != s.tail and (0 <= tail < s.size or not sbroken) and tail != s.stale:
                return False    # a new tail (or a fix of a broken one) poll() has not seen
            # A CQ head we wait for: the CQ is full for this SQ's pending entries, or its
            # doorbell holds an invalid value (reported; we wait for the host to fix it).
            cq_wait: int | None = None
            if use_shadow and cbroken:
                assert sh is not None
                cq_wait = sh.cq_head(c.qid)
            elif s.head != s.tail and not (sbroken or cbroken or self._paused):
                if self._budget(s) > 0:
                    return False
                cq_wait = c.head
            if use_shadow:
                assert sh is not None
                sh.set_sq_eventidx(qid, tail)              # the host's next tail update rings
                if cq_wait is not None:
                    sh.set_cq_eventidx(c.qid, cq_wait)     # ... and its next head update
                armed.append((s, tail, cq_wait))
        if not armed:
            return True
        assert sh is not None
        full_barrier()          # EventIdx stores before the re-reads (vs the host's db/ei order)
        for s, tail, cq_wait in armed:
            if sh.sq_tail(s.qid) != tail:
                return False
            if cq_wait is not None and sh.cq_head(s.cq.qid) != cq_wait:
                return False
        return True

    def idle_watch(self) -> tuple[int, memoryview | None] | None:
        """For a poller about to skip polls while nothing changes (workers/slot.py, deep
        idle): (highest qid run here, the shadow doorbell words or None).  Until the
        doorbell words of qids 0..that (or their shadow copies) change, poll() finds
        nothing to do; None when it may have work regardless (budget left over, an
        EventIdx race, coalesced interrupts pending, failures not yet taken)."""
        if self._more or self._dirty or self.failed:
            return None
        top = 0
        for q in self._cqs:
            if q > top:
                top = q
        for s in self._order:
            if s.qid > top:
                top = s.qid
        sh = self._shadow
        return top, (sh.words[0] if sh is not None else None)

    def coalesce_deadline(self) -> int | None:
        """monotonic_ns by which poll() should run again to flush coalesced interrupts."""
        if not self._dirty or not self._time_ns:
            return None
        firsts = [c.first_ns for c in self._dirty if c.first_ns]
        return min(firsts) + self._time_ns if firsts else time.monotonic_ns()

    # -- state ----------------------------------------------------------------
    def cq_state(self, cqid: int) -> CqState:
        """A copy of the CQ's record (see nvme.qtable)."""
        st = cq_state(self._cqs[cqid].r)
        assert st is not None
        return st

    def sq_state(self, sqid: int) -> SqState:
        st = sq_state(self._sqs[sqid].r)
        assert st is not None
        return st

    def queue_ids(self) -> tuple[list[int], list[int]]:
        """(SQ ids, CQ ids) this runner runs."""
        return [s.qid for s in self._order], list(self._cqs)

    def snapshot(self) -> dict[str, Any]:
        """Plain data (msgpack-able); restore by add_cq/add_sq of the records."""
        return {
            "cqs": [self.cq_state(q).to_dict() for q in self._cqs],
            "sqs": [self.sq_state(s.qid).to_dict() for s in self._order],
            "shadow": None if self._shadow_cfg is None else
            {"dbbuf": self._shadow_cfg.dbbuf, "eventidx": self._shadow_cfg.eventidx},
            "coalescing": {"thr": self._thr, "time_ns": self._time_ns, "exempt": sorted(self._exempt)},
            "parked": [[s.qid, cid] for s in self._order for cid in sorted(s.parked)],
        }
