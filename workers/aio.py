"""Worker side of asynchronous backends: one BackendIo per slot (controller).

Theory of operation
-------------------
For every namespace whose backend has an asynchronous engine (backends.aio:
file on io_uring or a thread pool, nbd, rbd) the slot's BackendIo opens the engine,
puts a depth-bounded AioQueue in front of it and registers a submitter in
`executor.aio_ns`, so the executor parks commands on it (nvme.io.aio).  Backend
requests carry their AioCommand as owner.

`service(woke)` is called by the worker loop every round (also while the slot is
paused for quiesce: parked commands must finish for the quiesce ack).  With nothing
outstanding it returns at once.  Otherwise it reaps every queue - engines whose
completions are visible in memory (io_uring CQ, librbd's hand-over deque) need no
system call - and, only if an engine needs readiness (an NBD socket) or the worker
just woke from a sleep, asks its own epoll set which engine fds are ready (one
epoll_wait with timeout 0).  Each finished command is completed on the runner
(`QueueRunner.complete(sqid, cid, status, 0)`), which posts the CQE and interrupts.

Sleeping: `fileno()` is that epoll set; the worker adds it to the epoll it sleeps
in, so an idle worker with requests outstanding wakes when an engine fd becomes
ready (an eventfd written by io_uring / librbd / the pool, an NBD socket readable).
After a wake-up the worker calls service(woke=True), which drains the eventfds.
Completions a busy worker reaps by polling leave their eventfd counts behind, so
right before a sleep `prepare_sleep()` drains those (engine.settle) and says whether
a completion slipped in meanwhile: the sleep then neither ends at once for nothing
nor misses a completion whose count the drain took.

Interrupts: the slot passes `signal`, so a reaped batch raises one interrupt per CQ
(runner.signal_pending) instead of one per command.

Native rings (`serve_native(runner)`, the native data path): a namespace whose backend
offers `native_fds()` (file:) also gets a NativeRing (nvme/native/uring.py) in
`native`, which is the executor's `native_rings`: the C loop submits that namespace's
Reads/Writes/Flushes to it and `service` reaps it through `runner.reap_native()` (CQEs
posted in C).  The Python engine stays attached for everything else on the namespace
(Compare, Write Zeroes, Deallocate, commands C hands to Python).  Its eventfd is in
the same epoll set; `outstanding` counts its requests, so quiesce, Delete I/O SQ,
detach and close wait for them as for the Python engines' (bounded the same way);
what is left then completes with ECANCELED's status, as there.
"""
from __future__ import annotations

import errno
import logging
import select
import time
from typing import Any, Callable, Sequence

from backends.aio import DEFAULT_DEPTH, AioQueue, Op, Req, open_async
from nvme.io import aio as nvme_aio
from nvme.io.aio import AioCommand
from nvme.io.opcodes import IoOpcode

log = logging.getLogger("vnvmed.worker")

assert (Op.READ, Op.WRITE, Op.FLUSH, Op.WRITE_ZEROES, Op.DISCARD) == (
    nvme_aio.OP_READ, nvme_aio.OP_WRITE, nvme_aio.OP_FLUSH, nvme_aio.OP_WRITE_ZEROES, nvme_aio.OP_DISCARD)

CompleteFn = Callable[[int, int, int, int], None]   # (sqid, cid, status, dw0)


class BackendIo:
    def __init__(self, complete: CompleteFn, signal: Callable[[], None] | None = None) -> None:
        self._aio_ns: dict[int, Any] = {}    # the executor's aio_ns once bound: nsid -> submitter
        self._complete = complete
        # With `signal`, `complete` posts without interrupting and each reaped batch ends
        # with one signal() (one interrupt per CQ per batch, as the sync path gives, not
        # one per command: 32 eventfd writes and guest wake-ups per QD32 batch).
        self._signal = signal
        self._io = [0, 0, 0, 0]
        self._ep = select.epoll()
        self.queues: dict[int, AioQueue] = {}
        self._by_fd: dict[int, int] = {}     # engine fd -> nsid
        self._poll_needed = False            # some engine only completes after readiness
        self._pending = 0                    # Python engines' requests submitted or waiting
        self.new = 0                         # requests submitted since the last push()
        self._quiet = 0                      # service() rounds since the last completion
        self._out: list[Req] = []
        self.completed = 0
        self.native: dict[int, Any] = {}       # nsid -> NativeRing (the executor's native_rings)
        self._runner: Any = None               # the NativeQueueRunner reaping them
        self._backends: dict[int, tuple[Any, int]] = {}   # nsid -> (backend, depth)

    def bind(self, executor: Any) -> None:
        """Serve this executor (IoExecutor): its aio_ns dict and its I/O counters."""
        executor.aio_ns = self._aio_ns
        executor.native_rings = self.native
        self._io = executor.io

    @property
    def outstanding(self) -> int:
        """Backend requests submitted or waiting, native rings' included."""
        n = self._pending
        if self.native:
            for r in self.native.values():
                n += r.busy()
        return n

    @outstanding.setter
    def outstanding(self, value: int) -> None:
        """Set the Python engines' share (the rings count their own)."""
        self._pending = value - sum(r.busy() for r in self.native.values())

    def serve_native(self, runner: Any) -> None:
        """The native data path runs this slot: file namespaces get rings C submits to."""
        self._runner = runner
        for nsid, (backend, depth) in list(self._backends.items()):
            self._open_native(nsid, backend, depth)

    def _open_native(self, nsid: int, backend: Any, depth: int) -> None:
        fds = getattr(backend, "native_fds", None)
        if self._runner is None or fds is None or nsid in self.native:
            return
        from nvme.native.uring import NativeRing
        try:
            fd, dfd = fds()
            ring = NativeRing(fd, dfd, depth)
        except OSError as e:
            log.warning("namespace %d: no native io_uring ring (%s): the Python engine serves it",
                        nsid, e.strerror or e)
            return
        log.info("namespace %d: native io_uring ring, depth %d", nsid, depth)
        self._ep.register(ring.fileno(), select.EPOLLIN)
        self.native[nsid] = ring
        self._runner.invalidate()

    # -- namespaces ------------------------------------------------------------
    def attach(self, nsid: int, backend: Any, depth: int = DEFAULT_DEPTH) -> bool:
        """Serve nsid asynchronously if its backend can; False if it stays synchronous."""
        self.detach(nsid)
        engine = open_async(backend)
        if engine is None:
            return False
        log.info("namespace %d: asynchronous backend %s, depth %d", nsid, type(engine).__name__, depth)
        q = AioQueue(engine, depth, name=f"ns{nsid}")
        fd = engine.fileno()
        self._ep.register(fd, select.EPOLLIN)
        self._by_fd[fd] = nsid
        self.queues[nsid] = q
        self._poll_needed = any(getattr(x.engine, "needs_readiness", False) for x in self.queues.values())
        self._aio_ns[nsid] = self._submitter(q)
        self._backends[nsid] = (backend, depth)
        self._open_native(nsid, backend, depth)
        return True

    def detach(self, nsid: int, timeout: float = 2.0) -> None:
        """Stop serving nsid: its outstanding requests finish first (bounded), then the engine closes."""
        q = self.queues.get(nsid)
        if q is None:
            return
        self._backends.pop(nsid, None)
        deadline = time.monotonic() + timeout
        self._close_native(nsid, deadline)
        self._aio_ns.pop(nsid, None)
        while q.outstanding() and time.monotonic() < deadline:
            self.service(woke=True)
            if q.outstanding():
                self._ep.poll(0.005)
        del self.queues[nsid]
        fd = q.engine.fileno()
        self._by_fd.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        left: list[Req] = []
        q.fail_waiting(errno.ECANCELED, left)
        busy = q.engine.busy()
        q.engine.close()               # engines give back what they still held, failed
        q.engine.reap(False, left)
        if busy:
            log.warning("namespace %d detached with %d backend requests outstanding", nsid, busy)
        self._pending -= len(left)
        self._finish(left)
        self._poll_needed = any(getattr(x.engine, "needs_readiness", False) for x in self.queues.values())

    def _close_native(self, nsid: int, deadline: float) -> None:
        """Drain nsid's ring (bounded), answer what is left, close it."""
        ring = self.native.get(nsid)
        if ring is None:
            return
        while ring.busy() and time.monotonic() < deadline:
            if not self.service(woke=True) and ring.busy():
                self._ep.poll(0.005)
        del self.native[nsid]
        try:
            self._ep.unregister(ring.fileno())
        except (OSError, ValueError):
            pass
        left = ring.busy()
        if self._runner is not None:
            self._runner.abandon_native(ring, errno.ECANCELED)   # also drops its C context
        if left:
            log.warning("namespace %d detached with %d ring requests outstanding", nsid, left)
        ring.close()

    def _submitter(self, q: AioQueue) -> Callable[[AioCommand, int, int, int, Sequence[memoryview], bool], None]:
        def submit(cmd: AioCommand, op: int, offset: int, length: int,
                   bufs: Sequence[memoryview], fua: bool) -> None:
            self._pending += 1
            self.new += 1
            q.submit(Req(op, offset, length, bufs, fua, cmd))
        return submit

    # -- the loop ----------------------------------------------------------------
    def push(self) -> int:
        """After a batch of commands: start what the engines only queued (io_uring SQEs are
        entered once per batch).  Without this a worker that goes to sleep right after
        parking commands would leave them unsubmitted until its sleep times out.  Returns
        the requests submitted since the last push (the worker counts them as work)."""
        n, self.new = self.new, 0
        for q in self.queues.values():
            fs = getattr(q.engine, "flush_submit", None)
            if fs is not None:
                fs()
        got = 0
        if self._runner is not None and self.native:
            k, got = self._runner.take_native_counts()    # entered by the C loop already
            n += k
        if n or got:
            self._quiet = 0    # (called every round with rings: a stalled one stays "quiet")
        return n

    def fileno(self) -> int:
        return self._ep.fileno()

    def flowing(self) -> bool:
        """Completions came within the last 64 service rounds (a stalled server's do not)."""
        return self._quiet < 64

    def prepare_sleep(self) -> bool:
        """The worker is about to sleep: completions reaped by polling (no wake-up) left
        their eventfd counts behind, which would end the sleep at once for nothing and
        cost a round of three system calls; clear them.  False if completions are ready
        now (one landed between the last reap and the drain): poll instead of sleeping."""
        ok = True
        for q in self.queues.values():
            settle = getattr(q.engine, "settle", None)
            if settle is not None and settle():
                ok = False
        for r in self.native.values():
            if r.settle():
                ok = False
        return ok

    def service(self, woke: bool = False, native: bool = True) -> int:
        """Reap completions and complete finished commands; returns commands completed.
        native=False: leave the rings to the runner's poll that follows (the C loop reaps
        them at the start of each round)."""
        n = 0
        if self.native and self._runner is not None:
            # No eventfd read on a wake: the reap marks the ring `unread` and prepare_sleep()
            # drains it (one read per sleep, not per wake).
            if native:
                n = self._runner.reap_native()
            if not self._pending:
                # Nothing out on the Python engines: no readiness poll, no eventfd reads
                # (a failing read is a BlockingIOError: ~3 syscalls' worth); a stale count
                # there is drained by prepare_sleep (engine.settle) as always.
                self._quiet = 0 if n else self._quiet + 1
                return n
        if not self._pending and not woke:
            if self.queues:
                self._quiet = self._quiet + 1
            return 0
        ready: set[int] | None = None
        quiet = self._quiet
        self._quiet = 0 if n else quiet + 1
        # Readiness costs a system call: every round while answers flow, every 64th once the
        # engines have been silent for 64 rounds (a stalled server must not tax the worker's
        # other queues; its fd still wakes a sleeping worker).
        if woke or (self._poll_needed and (quiet < 64 or not quiet & 63)):
            by_fd = self._by_fd
            ready = {by_fd[fd] for fd, _ in self._ep.poll(0) if fd in by_fd}
        out = self._out
        for nsid, q in self.queues.items():
            q.reap(ready is not None and nsid in ready, out)
        if not out:
            return n
        self._quiet = 0
        self._pending -= len(out)
        return n + self._finish(out)

    def _finish(self, out: list[Req]) -> int:
        n = 0
        io = self._io
        complete = self._complete
        for req in out:
            cmd: AioCommand = req.owner
            if cmd.part_done(req.err):
                st = cmd.finish()
                if not st:
                    if cmd.opc == IoOpcode.READ:
                        io[0] += 1
                        io[2] += cmd.length
                    elif cmd.opc == IoOpcode.WRITE:
                        io[1] += 1
                        io[3] += cmd.length
                complete(cmd.sqid, cmd.cid, st, 0)
                n += 1
        out.clear()
        self.completed += n
        if n and self._signal is not None:
            self._signal()
        return n

    def stats(self) -> dict[str, Any]:
        """Per asynchronous namespace: engine, depth bound, requests out (vnvmectl stats)."""
        out = {str(nsid): {"engine": type(q.engine).__name__, "depth": q.depth,
                           "outstanding": q.outstanding(), "waiting": len(q.wait)}
               for nsid, q in self.queues.items()}
        for nsid, r in self.native.items():   # C's requests next to the Python engine's
            d = out.setdefault(str(nsid), {"outstanding": 0, "waiting": 0})
            d["engine"] = f"native io_uring + {d.get('engine', '-')}"
            d["depth"] = r.depth
            d["outstanding"] += r.busy()
        return out

    def close(self) -> None:
        for nsid in list(self.queues):
            self.detach(nsid, timeout=0.5)
        self._ep.close()
