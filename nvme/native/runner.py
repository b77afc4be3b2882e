"""NativeQueueRunner: QueueRunner whose poll runs in C (fastpath.c) when it can.

Theory of operation
-------------------
The Python QueueRunner stays the reference and does everything unusual; this subclass
only replaces `poll()`:

* A context (struct vn_ctx) describes the runner's queues (their queue-table records,
  ring pointers), the doorbell and shadow pages, the guest memory regions (host
  pointers of the fd mappings), the namespaces served natively (ram: the backend's
  memory; null), message-write windows, MDTS and the dirty-page maps.  It is built
  lazily and dropped by `invalidate()` whenever any of that may have changed: the
  worker's slot calls it after every control message, and the runner's own
  configuration methods call it.  While it exists, Python holds the buffers behind
  every pointer in it (`_keep`), so no pointer outlives its mapping (MappedGuestMemory
  parks an mmap that is still exported instead of closing it).
* `vn_poll()` works on the records directly.  The Python-side copies of head/tail/
  phase in _Sq/_Cq go stale (`_stale`); every Python entry point that reads them
  calls `_sync()` (QueueRunner.reload) first.  Parked-command counts go the other way
  (`_push_inflight`) before the next native poll.
* When vn_poll() stops before an SQE it cannot serve (VN_NEED_SQE) Python runs exactly
  that SQE with QueueRunner._fetch (execute, park, error status...), then the native
  poll continues; for VN_NEED_POLL (a doorbell value to report, a broken queue) the
  whole poll is Python's.  Shapes the C side does not take at all (faulted queues,
  stale doorbell values after shadow mode, more than 64 queues/regions/namespaces,
  a page size other than 4 KiB) run on the Python path until they go away.
* File namespaces with a NativeRing (`executor.native_rings`, opened by the worker's
  BackendIo): the C loop parks their Reads/Writes/Flushes on the ring and
  `reap_native()` (called by BackendIo.service) posts them from C.  Python's view of
  the CQ room counts them: `_Cq.inflight` = Python's parked + `_nseen[cqid]`, the
  ring requests last seen for that CQ (`_native_sync`).  What C gives back (failures,
  requests of an SQ going away, completions with no context to post with) Python
  adopts as its own parked command (`_adopt`) and completes or answers the usual way.
"""
from __future__ import annotations

from typing import Any

from ..qpair import QueueRunner

VN_NEED_SQE = 1 << 20
VN_NEED_POLL = 1 << 21
VN_SIGNAL = 1 << 22
VN_MORE = 1 << 23
VN_STALE = 1 << 24
VN_BACK = 1 << 25            # ring requests for Python wait in a back list
MAX = 64                     # array sizes of struct vn_ctx
SPIN = 64                    # empty rounds the C loop adds before returning (~2-4 us here)
# With file requests on the rings: spin up to RING_SPIN_US after the last work, at most
# RING_SLICE_US per poll (fastpath.c vn_poll: why a flowing stream is not slept through).
# 2 ms: a 4 KiB O_DIRECT read here takes 0.1-0.5 ms, so a stream never waits for a
# wake-up; 20 us: the worker's other slots are polled at least that often.
RING_SPIN_US = 2000
RING_SLICE_US = 20
KIND = {"ram": 1, "null": 2}
FILE = 3                     # a file namespace with a NativeRing


class _NoExecutor:
    """No namespace served natively: every SQE goes to the runner's `execute` (tests)."""
    namespaces: dict[int, Any] = {}
    aio_ns: dict[int, Any] = {}
    native_rings: dict[int, Any] = {}
    mdts_bytes = 0
    page_size = 4096
    dirty = None
    mem = None


class NativeQueueRunner(QueueRunner):
    """`executor`: the IoExecutor whose namespaces, MDTS, windows and dirty log the C loop
    serves like IoExecutor.execute would; None serves none natively."""

    def __init__(self, *, executor: Any = None, irq_fd: Any = None, spin: int = SPIN,
                 ring_spin_us: int = RING_SPIN_US, ring_slice_us: int = RING_SLICE_US,
                 **kw: Any) -> None:
        from . import ffi, lib, why_not
        if lib is None:
            raise RuntimeError(f"native data path unavailable: {why_not}")
        self._ffi, self._lib = ffi, lib
        self._ex = executor if executor is not None else _NoExecutor()
        self._irq_fd = irq_fd        # vector -> eventfd (or None): the C loop signals it itself
        self._spin = spin
        self._ring_spin = (ring_spin_us, ring_slice_us)
        self._ctx: Any = None
        self._keep: list[Any] = []
        self._stale = False
        self._inflight_dirty = True
        self._hold = False
        self.native_polls = 0        # polls the C loop ran (diagnostics, tests)
        self.python_polls = 0
        self.io_native = [0, 0, 0, 0]   # reads, writes, bytes read, bytes written (C side)
        self._nseen: dict[int, int] = {}  # cqid -> ring requests counted in its inflight
        self._back: Any = ffi.new("struct vn_back *")
        self._ring_wait: set[int] = set()   # SQs waiting for ring room (prepare_sleep)
        super().__init__(**kw)

    # -- the poll ---------------------------------------------------------------
    def poll(self, budget: int = 256) -> int:
        ctx = self._ctx
        if ctx is None:
            ctx = self._build()
            if ctx is None or self._paused:
                return self._reap_then_py_poll(budget)
        elif self._paused:
            return self._reap_then_py_poll(budget)
        if self._inflight_dirty:
            self._push_inflight(ctx)
        vn_poll = self._lib.vn_poll
        r = vn_poll(ctx, budget)
        self.native_polls += 1
        if r < VN_NEED_SQE:              # nothing happened
            self._more = False
            if self._dirty:              # coalesced interrupts whose time has come
                self._signal()
            return 0
        self._stale = True
        if not r & (VN_NEED_SQE | VN_NEED_POLL):
            if r & VN_SIGNAL:
                self._signal_native(ctx)
            elif self._dirty:
                self._signal()
            self._more = bool(r & VN_MORE)
            if r & VN_BACK:
                return (r & 0xFFFFF) + self._take_back(list(self._ex.native_rings.values()))
            return r & 0xFFFFF
        # Mixed batch: the C loop stopped before an SQE (or a doorbell) that Python runs.
        # Interrupts are decided once at the end (at most one per CQ per batch).
        done = 0
        vecs: set[int] = set()
        back = False
        while True:
            done += r & 0xFFFFF
            back = back or bool(r & VN_BACK)
            if r & VN_SIGNAL:
                self._collect_native(ctx, vecs)
            if r & VN_NEED_POLL:
                done += self._py_poll(budget - done, signal=False)
                break
            if not r & VN_NEED_SQE:
                self._more = bool(r & VN_MORE)
                break
            self._sync()
            s = self._order[ctx.stop_sq]
            n = 1
            if ctx.conflict:
                ctx.conflict = 0
                done += self._fetch_conflict(s)
            else:
                if self._ex.aio_ns and not ctx.nrings:
                    # Asynchronous namespaces (workers/aio.py) not served in C: each of their
                    # SQEs would cost a C -> Python -> C round trip (+3 us per I/O at QD32):
                    # Python takes the rest of this SQ (a ram SQE among them runs in Python).
                    # With rings, C checks every SQE first (CID conflicts, ring requests).
                    n = max(1, min(self._budget(s), budget - done))
                done += self._fetch(s, n)
            self._push_inflight(ctx)
            ctx.resume = 1               # the round goes on where it stopped
            r = vn_poll(ctx, budget - done)
            self.native_polls += 1
            self._stale = True
        if back:                         # posts too: signalled with the rest below
            self._hold = True
            try:
                done += self._take_back(list(self._ex.native_rings.values()))
            finally:
                self._hold = False
        for c in self._dirty:
            vecs.discard(c.iv)
        if self._dirty:
            self._signal()
        irq = self._irq
        for v in vecs:
            irq(v)
        return done

    def _fetch_conflict(self, s: Any) -> int:
        """The SQE at s's head reuses the CID of a command in flight on a ring: Python's
        own check answers it (CID Conflict, reported like any failure)."""
        assert s.words is not None
        cid = s.words[s.head << 4] >> 16
        fresh = cid not in s.parked
        if fresh:
            s.parked.add(cid)
            self._nparked += 1
        try:
            return self._fetch(s, 1)
        finally:
            if fresh:
                s.parked.discard(cid)
                self._nparked -= 1

    # -- file namespaces on rings ---------------------------------------------------
    def reap_native(self) -> int:
        """Post what the rings finished (BackendIo.service calls this every round while
        ring requests are out); returns commands completed."""
        rings = self._ex.native_rings
        if not rings:
            return 0
        ctx = self._ctx
        if ctx is None:
            ctx = self._build()
        if ctx is None:                  # the Python path runs this configuration
            lib = self._lib
            if any(lib.vn_ring_reap_raw(r.ptr) for r in rings.values()):
                return self._take_back(list(rings.values()))
            return 0
        if self._inflight_dirty:
            self._push_inflight(ctx)
        r = self._lib.vn_reap(ctx)
        if not r:
            return 0
        self._stale = True
        done = r & 0xFFFFF
        if r & VN_SIGNAL:
            self._signal_native(ctx)
        if r & VN_BACK:
            done += self._take_back(list(rings.values()))
        return done

    def take_native_counts(self) -> tuple[int, int]:
        """(commands the C loop put on rings, commands it completed from rings) since the
        last call: the worker counts the first as work (as BackendIo.push counts Python's),
        the second says the backend is answering (BackendIo.flowing)."""
        ctx = self._ctx
        if ctx is None:
            return 0, 0
        n, got = ctx.newp, ctx.reaped
        if n:
            ctx.newp = 0
        if got:
            ctx.reaped = 0
        return int(n), int(got)

    def abandon_native(self, ring: Any, err: int) -> int:
        """The ring goes away (namespace detached, slot closing) with requests still in
        flight: each completes now with `err`'s status (BackendIo.detach's rule for the
        Python engines); their late completions only free ring slots."""
        self._sync()
        self.invalidate()
        self._lib.vn_ring_orphan(ring.ptr, -1)
        return self._take_back([ring], orphan_err=err)

    def _take_back(self, rings: list[Any], orphan_err: int | None = None) -> int:
        """Adopt what the rings gave back and finish it the Python way."""
        from nvme.io.aio import status_for
        lib, b = self._lib, self._back
        done = 0
        log = self.dirty if self.dirty is not None else self._ex.dirty
        for ring in rings:
            while lib.vn_ring_take(ring.ptr, b):
                err = int(b.err)
                if not self._adopt(int(b.qid), int(b.cid), int(b.jslot)):
                    continue
                if err < 0:
                    if orphan_err is None:
                        continue          # remove_sq answers it (Aborted: SQ Deletion)
                    err = orphan_err
                if not err and b.opc == 2:
                    if log is not None:   # a read that landed: marked before its CQE
                        for i in range(min(int(b.nseg), 32)):
                            log.mark(int(b.addr[i]), int(b.len[i]))
                self.complete(int(b.qid), int(b.cid), status_for(int(b.opc), err), 0, signal=False)
                done += 1
        if done:
            self._signal()
        return done

    def _adopt(self, sqid: int, cid: int, jslot: int) -> bool:
        """A ring request becomes one of Python's parked commands (its journal slot too)."""
        s = self._sqs.get(sqid)
        if s is None or cid in s.parked:
            return False
        s.parked.add(cid)
        s.jslot[cid] = jslot
        s.cq.inflight += 1
        self._nparked += 1
        self._inflight_dirty = True
        self._native_sync()               # ... and leaves the rings' count
        return True

    def _native_sync(self) -> None:
        """Bring each CQ's inflight to Python's parked + ring requests posting there."""
        ctx = self._ctx
        seen = self._nseen
        if ctx is not None:
            for i, c in enumerate(self._cqlist):
                n = ctx.cq[i].native
                d = n - seen.get(c.qid, 0)
                if d:
                    c.inflight += d
                    seen[c.qid] = n
            return
        rings = list(self._ex.native_rings.values())
        now: dict[int, int] = {}
        for s in self._order:
            k = sum(r.busy(s.qid) for r in rings) if rings else 0
            now[s.cq.qid] = now.get(s.cq.qid, 0) + k
        for c in self._cqlist:
            n = now.get(c.qid, 0)
            d = n - seen.get(c.qid, 0)
            if d:
                c.inflight += d
                seen[c.qid] = n

    def inflight(self, sqid: int | None = None) -> int:
        """Parked commands, ring requests included (quiesce, Delete I/O SQ wait for them)."""
        n = super().inflight(sqid)
        rings = self._ex.native_rings
        if rings:
            n += sum(r.busy(-1 if sqid is None else sqid) for r in rings.values())
        return n

    def _reap_then_py_poll(self, budget: int) -> int:
        """A poll on the Python path: the rings are reaped first, as a C poll would."""
        n = self.reap_native() if self._ex.native_rings else 0
        return n + self._py_poll(budget)

    def _py_poll(self, budget: int, signal: bool = True) -> int:
        self._sync()
        self.python_polls += 1
        self._hold = not signal      # the caller signals once for the whole batch
        ctx = self._ctx
        if ctx is not None:
            self._rr = ctx.rr        # one round-robin position for both loops
        try:
            n = super().poll(budget)
        finally:
            self._hold = False
            if ctx is not None:
                ctx.rr = self._rr
        self._inflight_dirty = True
        return n

    def _signal(self) -> None:
        if not self._hold:
            super()._signal()

    def _signal_native(self, ctx: Any) -> None:
        """Interrupts for what the C loop posted: its decisions, or with coalescing
        configured Python's (it keeps the timers)."""
        if ctx.coalesce:
            self._collect_native(ctx, set())
            self._signal()
            return
        irq = self._irq
        for i in range(ctx.nirq):
            irq(ctx.irq[i])

    def _collect_native(self, ctx: Any, vecs: set[int]) -> None:
        """Add what the C loop posted: to `vecs` (no coalescing), or as pending entries
        of Python's coalescing state."""
        if not ctx.coalesce:
            vecs.update(ctx.irq[i] for i in range(ctx.nirq))
            return
        for i, c in enumerate(self._cqlist):
            posted = ctx.cq[i].posted
            if posted:
                if c.pending == 0:
                    c.first_ns = 0
                    self._dirty.append(c)
                c.pending += posted

    # -- keeping Python's view right -----------------------------------------------
    def _sync(self) -> None:
        if self._stale:
            self._stale = False
            self.reload()
        if self._ex.native_rings:
            self._native_sync()

    def _push_inflight(self, ctx: Any) -> None:
        seen = self._nseen
        for i, c in enumerate(self._cqlist):
            ctx.cq[i].inflight = c.inflight - seen.get(c.qid, 0)
        for i, s in enumerate(self._order):
            ctx.sq[i].parked = len(s.parked)
        self._inflight_dirty = False

    def invalidate(self) -> None:
        """Something the context describes may have changed: rebuild before the next poll."""
        if self._ctx is not None:
            io = self._ctx.io
            for i in range(4):
                self.io_native[i] += io[i]
            self._rr = self._ctx.rr
        self._ctx = None
        self._keep = []

    def native_io(self) -> list[int]:
        """Reads, writes, bytes read, bytes written completed by the C loop so far."""
        out = list(self.io_native)
        if self._ctx is not None:
            for i in range(4):
                out[i] += self._ctx.io[i]
        return out

    # Every QueueRunner entry point that reads the cached words syncs first; those that
    # change what the context describes drop it.
    def complete(self, sqid: int, cid: int, status: int, dw0: int, signal: bool = True) -> None:
        self._sync()
        super().complete(sqid, cid, status, dw0, signal)
        self._inflight_dirty = True

    def park(self, sqid: int, cid: int) -> None:
        self._sync()
        super().park(sqid, cid)
        self._inflight_dirty = True

    def prepare_sleep(self) -> bool:
        self._sync()
        ctx = self._ctx
        if ctx is not None and ctx.nrings:
            # An SQ whose next SQE waits for room on a full ring: a completion wakes us
            # (the ring's eventfd is in the sleep set), so its pending SQEs are no reason
            # to keep polling (_budget below says 0 for it while we decide).
            wait = self._lib.vn_sq_waits_for_ring
            self._ring_wait = {s.qid for i, s in enumerate(self._order) if wait(ctx, i)}
        try:
            return super().prepare_sleep()
        finally:
            self._ring_wait = set()

    def _budget(self, s: Any) -> int:  # type: ignore[override]
        if self._ring_wait and s.qid in self._ring_wait:
            return 0
        return QueueRunner._budget(s)

    def reload(self) -> None:
        self._stale = False
        super().reload()

    def attach_cq(self, cqid: int) -> None:
        self._sync()
        super().attach_cq(cqid)
        self.invalidate()

    def attach_sq(self, sqid: int) -> None:
        self._sync()
        super().attach_sq(sqid)
        self.invalidate()

    def release_views(self) -> None:
        self.invalidate()          # the C context's buffer exports go with it
        super().release_views()

    def remove_sq(self, sqid: int) -> Any:
        self._sync()
        self.invalidate()
        rings = list(self._ex.native_rings.values())
        for ring in rings:               # still running: answered below as Python's own
            self._lib.vn_ring_orphan(ring.ptr, sqid)
        if rings:
            self._take_back(rings)
        return super().remove_sq(sqid)

    def remove_cq(self, cqid: int) -> Any:
        self._nseen.pop(cqid, None)
        return self._remove_cq(cqid)

    def _remove_cq(self, cqid: int) -> Any:
        self._sync()
        self.invalidate()
        return super().remove_cq(cqid)

    def set_memory(self, mem: Any) -> None:
        self._sync()
        self.invalidate()
        super().set_memory(mem)

    def set_shadow(self, shadow: Any) -> None:
        self._sync()
        self.invalidate()
        super().set_shadow(shadow)

    def set_coalescing(self, threshold: int, time_100us: int, exempt_vectors: set[int]) -> None:
        self.invalidate()
        super().set_coalescing(threshold, time_100us, exempt_vectors)

    def set_dirty(self, log: Any) -> None:
        self.invalidate()
        super().set_dirty(log)

    def set_lazy_eventidx(self, lazy: bool) -> None:
        self.invalidate()
        super().set_lazy_eventidx(lazy)

    # -- the context --------------------------------------------------------------
    def _ptr(self, ctype: str, buf: Any) -> Any:
        p = self._ffi.from_buffer(ctype, buf)
        self._keep.append(p)
        return p

    def _build(self) -> Any:
        """A fresh context, or None if this configuration runs on the Python path."""
        self._sync()
        ex = self._ex
        sqs, cqs = self._order, self._cqlist
        queues: list[Any] = [*sqs, *cqs]
        if (len(sqs) > MAX or len(cqs) > MAX or ex.page_size != 4096
                or any(q.faulted or q.stale is not None or q.words is None for q in queues)):
            return None
        regions = self._mem.regions() if hasattr(self._mem, "regions") else None
        log = self.dirty if self.dirty is not None else ex.dirty
        dirty = log.regions() if log is not None else []
        windows = getattr(ex.mem, "windows", ())
        if regions is None or len(regions) > MAX or len(dirty) > MAX or len(windows) > 16:
            return None
        self._keep = []
        ffi = self._ffi
        c = ffi.new("struct vn_ctx *")
        self._keep.append(c)
        c.db = self._ptr("uint32_t[]", self._dbw)
        sh = self._shadow
        if sh is not None:
            sdb, sei = sh.words
            c.sh_db = self._ptr("uint32_t[]", sdb)
            c.sh_ei = self._ptr("uint32_t[]", sei)
            c.ei_iova = sh.cfg.eventidx
        c.lazy = int(self._lazy)
        c.spin = self._spin
        c.ring_spin_us, c.ring_slice_us = self._ring_spin
        c.rr = self._rr
        c.coalesce = int(bool(self._thr or self._time_ns))
        c.mdts = ex.mdts_bytes or 0
        index = {}
        for i, q in enumerate(cqs):
            v = c.cq[i]
            v.rec = self._ptr("uint32_t[]", q.r)
            v.ring = self._ptr("uint32_t[]", q.words)
            v.base, v.qid, v.size, v.dbi = q.base, q.qid, q.size, q.dbi
            v.ien, v.iv, v.inflight = int(q.ien), q.iv, q.inflight
            fd = self._irq_fd(q.iv) if self._irq_fd is not None else None
            v.irqfd = fd if fd is not None else -1
            index[q.qid] = i
        c.ncq = len(cqs)
        for i, s in enumerate(sqs):
            v = c.sq[i]
            v.rec = self._ptr("uint32_t[]", s.r)
            v.ring = self._ptr("uint32_t[]", s.words)
            v.qid, v.size, v.dbi, v.cq, v.parked = s.qid, s.size, s.dbi, index[s.cq.qid], len(s.parked)
            if s.j is not None:
                v.j = self._ptr("uint32_t[]", s.j)
        c.nsq = len(sqs)
        for i, (iova, size, view, r, w) in enumerate(regions):
            g = c.reg[i]
            g.iova, g.size, g.r, g.w = iova, size, int(r), int(w)
            if view is not None:
                g.host = self._ptr("uint8_t[]", view)
        c.nreg = len(regions)
        for i, (start, end) in enumerate(windows):
            c.win[2 * i], c.win[2 * i + 1] = start, end
        c.nwin = len(windows)
        for i, m in enumerate(dirty):
            d = c.dirty[i]
            d.iova, d.size, d.first = m.iova, m.size, m.first
            d.bm = self._ptr("uint8_t[]", m.bm)
        c.ndirty = len(dirty)
        nns = 0
        aio = ex.aio_ns
        rings = ex.native_rings
        nrings = 0
        for nsid, ns in ex.namespaces.items():
            ring = rings.get(nsid) if rings else None
            kind = FILE if ring is not None else KIND.get(getattr(ns.backend, "native_kind", ""), 0)
            if not 0 < nsid < MAX or not kind or (nsid in aio and ring is None):
                continue
            v = c.ns[nsid]
            v.kind, v.blocks, v.shift, v.ro = kind, ns.blocks, ns.lba_shift, int(ns.read_only)
            if kind == 1:
                v.data = self._ptr("uint8_t[]", ns.backend.direct_memory)
            elif ring is not None:
                v.ring = ring.ptr
                if all(c.rings[k] != ring.ptr for k in range(nrings)):
                    c.rings[nrings] = ring.ptr
                    nrings += 1
            nns = max(nns, nsid + 1)
        c.nns = nns
        c.nrings = nrings
        if nrings:
            self._lib.vn_ctx_count(c)      # what the rings hold per SQ/CQ
        self._ctx = c
        if nrings:
            self._native_sync()
        self._push_inflight(c)
        return c
