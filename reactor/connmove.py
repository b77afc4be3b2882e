"""Moving one running controller between front-end processes: its connection, fds, state.

Theory of operation
-------------------
Giving side (`Giver`, in the old front-end), asked by its supervisor:

1. `static()`: what never changes while the controller lives - the BAR0 doorbell
   memfd (the client has it mmapped: the taker must use the very same one) and the
   listening socket.  Sent before anything stops, so the taker can map the page,
   link its workers and attach the namespaces outside the blackout.
2. `freeze()`: stop accepting; put a barrier into the session's request FIFO, so
   every command received before it has been answered; at the barrier (the blackout
   starts here) quiesce the controller (workers stop fetching, commands in flight -
   slow path too - complete and post their CQEs; the socket is still read, for the
   slow path's DMA replies), then stop reading the socket between two recvmsg calls.
   Whatever the client sends from now on waits in the socket buffer.  Then export:
   the connected socket, frames read but not processed, a partial message and its
   fds, the negotiated capabilities, every DMA region and its fd, the interrupt
   eventfds, and the device state (controller snapshot with the workers' queue
   records, PCI config space).
3. Then either `thaw()` (the handover failed: resume the controller, read the socket
   again, release the barrier, accept again - as if nothing happened) or `release()`
   (the taker has it: exit without touching anything shared - no reset, no unmap
   message, no doorbell zeroing, no unlink of the socket path).

Taking side (`Taker`, in a new front-end started with opts["adopt"]): `prepare()`
with the static package (NvmeFunction on the same BAR memfd, worker links, every
worker's slot paused by a quiesce before it holds a queue), `restore()` with the
state package (nothing runs yet: queues are placed on paused workers, the socket is
not read), and `resume()` once the supervisor says the handover is committed.  Until
then the taker is provisional: told to stop, it exits without side effects.

The device state is the migration snapshot (SEAMS S4, reactor/devstate.py: the same
bytes live migration moves, with their own format version and identity check); the
connection's own fds (DMA regions, interrupt eventfds) travel beside it.  The doorbell
page is never restored: the memfd is the same object, and the guest may have written
it during the blackout.  A migration in progress refuses the handover.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from migration.snapshot import SnapshotError
from reactor import devstate
from reactor.handover import FdTable, Package, PackageAssembler, claimed_format, format_problem, send_package
from reactor.session import Session
from vfio_user.framing import Frame
from vfio_user.negotiate import ClientCaps
from vfio_user.dmamsg import DmaLayout
from vfio_user.wire import Header

if TYPE_CHECKING:
    from reactor.frontend import FrontEnd
    from reactor.nvmefn import NvmeFunction

log = logging.getLogger("vnvmed.handover")
FREEZE_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(on: bool) -> None:
    """A provisional taker must not outlive the process that started it: if the new
    supervisor dies its forkserver (our parent) goes, and the kernel SIGKILLs us at once
    instead of letting a half-restored front-end run on (see reactor/upgrade.py)."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL if on else 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): errno %d", ctypes.get_errno())
    if on and os.getppid() != parent:      # it died before we asked
        os.kill(os.getpid(), signal.SIGKILL)


class HandoverRefused(Exception):
    pass


class _Barrier:
    """Reached by the session's pipeline between two commands; held until released."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.arrived: asyncio.Future[None] = loop.create_future()
        self.go_on: asyncio.Future[None] = loop.create_future()

    async def reached(self) -> None:
        if not self.arrived.done():
            self.arrived.set_result(None)
        await self.go_on

    def close(self) -> None:    # the session went away before we got there
        if not self.arrived.done():
            self.arrived.set_exception(ConnectionError("session closed"))
        self.release()

    def release(self) -> None:
        if not self.go_on.done():
            self.go_on.set_result(None)


# ------------------------------------------------------------------ device state
def save_device(fn: "NvmeFunction", fds: FdTable) -> dict[str, Any]:
    """The stopped function's state: the migration snapshot (SEAMS S4: controller with
    the queue table's records, PCI config, doorbell page) plus what belongs to the
    connection rather than the device - DMA regions and interrupt eventfds, as fds."""
    r = fn.irqs
    return {
        "snapshot": devstate.save_state(fn),
        "regions": [[iova, size, off, fds.ref(fd), rd, wr]
                    for (iova, size), (off, fd, rd, wr) in fn.dma_regions.items()],
        "irqs": {"msix": [[v, fds.ref(fd)] for v, fd in r.msix.items()],
                 "intx": fds.ref(r.intx), "intx_unmask": fds.ref(r.intx_unmask),
                 "other": [[k, fds.ref(fd)] for k, fd in r.other.items()],
                 "intx_masked": r.intx_masked},
        "fatal_reason": fn.fatal_reason, "slow_count": fn.slow.count, "quiesces": fn.coord.count,
    }


def load_device(fn: "NvmeFunction", st: dict[str, Any], pkg: Package, session: Session | None) -> None:
    """Apply save_device()'s state to a fresh function whose workers are paused."""
    if session is not None:
        for iova, size, off, ref, rd, wr in st["regions"]:
            fd = pkg.take(ref)
            session.memory.map(iova, size, off, fd, rd, wr)
            session.dma_fds[iova] = fd
        if session.negotiated:
            session._connected = True
            fn.client_connected(session)
        for iova, size, off, ref, rd, wr in st["regions"]:
            fn.dma_mapped(iova, size, off, pkg.fd(ref), rd, wr)      # dups the fd
    irq = st["irqs"]
    r = fn.irqs
    r.msix = {int(v): pkg.take(ref) for v, ref in irq["msix"]}          # type: ignore[misc]
    r.intx, r.intx_unmask = pkg.take(irq["intx"]), pkg.take(irq["intx_unmask"])
    r.other = {int(k): pkg.take(ref) for k, ref in irq["other"]}        # type: ignore[misc]
    r.intx_masked = bool(irq["intx_masked"])
    # Placement counts every controller's queues: the loads once, before the restore
    # creates its queues in one batch (devstate: no round trip per queue).
    for wid, link in list(fn.links.items()):
        try:
            fn.placement.report(wid, int(link.request_sync({"op": "load"}, timeout=5.0)["queues"]))
        except (TimeoutError, ConnectionError) as e:
            # Advisory (placement only): a worker busy draining a dropped slot's backend
            # requests made a front-end take-over fail here (issue 12, load 15).
            log.info("%s: worker %d load not known (%s); placing without it", fn.name, wid, e)
    try:
        # The doorbell page stays as it is: it is the very page the guest writes.
        devstate.load_state(fn, bytes(st["snapshot"]), shared_bar=True)
    except SnapshotError as e:
        raise HandoverRefused(f"snapshot refused: {e}") from None
    fn.fatal_reason = st.get("fatal_reason")
    fn.slow.count = int(st.get("slow_count", 0))
    fn.coord.count = int(st.get("quiesces", 0))


# ------------------------------------------------------------------ the connection
def save_session(s: Session, fds: FdTable, pending: bool = True) -> dict[str, Any]:
    """The connection; `pending=False` leaves out frames read but not processed and a
    partial message (a rescue package, reactor/rescue.py: those die with a crash)."""
    caps = None
    if s.client_caps is not None:
        caps = asdict(s.client_caps)
        caps["proposed"] = sorted(caps["proposed"])
    frames = [[f.header.encode() + f.payload, [fds.ref(fd) for fd in f.fds], f.fds_truncated]
              for f in s.queued_frames()] if pending else []
    data, marks, pfds = s.framer.export() if pending else (b"", [], [])
    return {"fd": fds.ref(s.transport.sock.fileno()), "name": s.name, "caps": caps,
            "dma_layout": s.dma_layout.value if s.dma_layout is not None else None,
            "next_id": s._next_id, "frames": frames,
            "partial": [data, [list(m) for m in marks], [fds.ref(fd) for fd in pfds]]}


def _fds(pkg: Package, refs: list[Any]) -> list[int]:
    out = []
    for r in refs:
        fd = pkg.take(r)
        if fd is None:
            raise HandoverRefused("a frame refers to no fd")
        out.append(fd)
    return out


def load_session(st: dict[str, Any], pkg: Package, device: Any, dma_timeout: float) -> Session:
    sock = socket.socket(fileno=pkg.take(st["fd"]))
    s = Session(sock, device, dma_timeout=dma_timeout, name=str(st["name"]))
    if st.get("caps") is not None:
        known = set(ClientCaps.__dataclass_fields__)
        caps = {k: v for k, v in st["caps"].items() if k in known}
        caps["proposed"] = frozenset(caps.get("proposed", ()))
        s.client_caps = ClientCaps(**caps)
    if st.get("dma_layout"):
        s.dma_layout = DmaLayout(st["dma_layout"])
    s._next_id = int(st.get("next_id", 0x8000))
    frames = []
    for raw, refs, trunc in st.get("frames", []):
        raw = bytes(raw)
        frames.append(Frame(Header.decode(raw), raw[16:], _fds(pkg, refs), bool(trunc)))
    s.requeue(frames)
    data, marks, refs = st.get("partial") or [b"", [], []]
    s.framer.adopt(bytes(data), [(int(a), int(b), bool(c)) for a, b, c in marks], _fds(pkg, refs))
    return s


# ------------------------------------------------------------------ giving side
class Giver:
    """The old front-end's side (see the module doc)."""

    def __init__(self, fe: "FrontEnd") -> None:
        self.fe = fe
        self.barrier: _Barrier | None = None
        self.session: Session | None = None
        self.t_freeze = 0
        self.frozen = False

    def static(self) -> tuple[dict[str, Any], list[int]]:
        fe = self.fe
        assert fe.fn is not None and fe.server is not None
        sock, ino = fe.server.listening
        fds = FdTable()
        st = {"format": list(claimed_format()), "name": fe.spec.name, "bar": fds.ref(fe.fn.bar_fd),
              "listen": fds.ref(sock.fileno()), "ino": list(ino) if ino else None,
              "sessions_served": fe.server.sessions_served, "handovers": fe.handovers}
        return st, fds.fds

    async def freeze(self, timeout: float = FREEZE_TIMEOUT) -> tuple[dict[str, Any], list[int]]:
        fe = self.fe
        fn, server = fe.fn, fe.server
        assert fn is not None and server is not None
        if self.frozen:
            raise HandoverRefused("already frozen")
        if not fn.mig.engine.running or fn.mig.held or fn.mig.dirty.active:
            raise HandoverRefused(f"controller {fe.spec.name}: a live migration is in progress "
                                  f"({fn.mig.engine.state.name}); upgrade after it")
        server.hold_accepting()
        session = server.session
        try:
            if session is not None and not session._closed:
                self.barrier = _Barrier()
                session.inject(self.barrier)
                try:
                    await asyncio.wait_for(asyncio.shield(self.barrier.arrived), timeout)
                except ConnectionError:          # the client left meanwhile
                    self.barrier = None
            if server.session is not None and self.barrier is None:
                await asyncio.wait_for(server.wait_session_end(), timeout)
            session = server.session if self.barrier is not None else None
            self.t_freeze = time.monotonic_ns()
            self.session = session
            self.frozen = True
            before = fn.fatal_reason
            await devstate.stop(fn)
            t_stopped = time.monotonic_ns()
            if fn.fatal_reason != before:     # a worker did not drain in time
                raise HandoverRefused(f"controller {fe.spec.name}: {fn.fatal_reason}")
            if session is not None:
                deadline = time.monotonic() + timeout
                while session._pending:       # our own DMA requests (slow path) in flight
                    if time.monotonic() > deadline:
                        raise HandoverRefused(f"controller {fe.spec.name}: DMA requests pending")
                    await asyncio.sleep(0.001)
                session.hold_reading()
            fds = FdTable()
            waiting = [[fds.ref(conn.fileno()), since] for conn, since in server.waiting()]
            st: dict[str, Any] = {"format": list(claimed_format()), "name": fe.spec.name,
                                  "t_freeze": self.t_freeze, "waiting": waiting,
                                  "session": save_session(session, fds) if session is not None else None,
                                  "device": save_device(fn, fds)}
            st["t_stopped"] = t_stopped
            st["t_frozen"] = time.monotonic_ns()
            return st, fds.fds
        except BaseException:
            await self.thaw()
            raise

    async def thaw(self) -> None:
        fe = self.fe
        assert fe.fn is not None and fe.server is not None
        held = (time.monotonic_ns() - self.t_freeze) / 1e6 if self.frozen else 0.0
        if self.frozen:
            self.frozen = False
            if self.session is not None:
                self.session.resume_reading()
            await devstate.start(fe.fn)
        if self.barrier is not None:
            self.barrier.release()
            self.barrier = None
        self.session = None
        fe.server.resume_accepting()
        log.info("%s: handover cancelled; serving on (paused %.1f ms)", fe.spec.name, held)

    def release(self) -> None:
        """The new front-end has the controller: leave without touching anything shared."""
        fe = self.fe
        log.info("%s: handed over; front-end %d exits", fe.spec.name, os.getpid())
        fe.exit_quietly()


# ------------------------------------------------------------------ taking side
class Taker:
    """A new front-end adopting a controller (see the module doc)."""

    def __init__(self, fe: "FrontEnd") -> None:
        self.fe = fe
        self.packages: asyncio.Queue[Package] = asyncio.Queue()
        self.go = asyncio.Event()
        self.session: Session | None = None
        self.waiting: list[tuple[socket.socket, float]] = []
        self.t_freeze = 0
        # CLOCK_MONOTONIC is one clock for every process: the blackout's phases (ns)
        self.marks: dict[str, int] = {}

    async def _next(self, kind: str, timeout: float | None = None) -> Package:
        pkg = await asyncio.wait_for(self.packages.get(), timeout)
        if pkg.kind != kind:
            pkg.close_unused()
            raise HandoverRefused(f"expected a {kind} package, got {pkg.kind}")
        problem = format_problem(pkg.state.get("format"), claimed_format())
        if problem is not None:
            pkg.close_unused()
            raise HandoverRefused(problem)
        return pkg

    async def prepare(self) -> None:
        fe = self.fe
        pkg = await self._next("static")
        st = pkg.state
        try:
            fe.build(bar_fd=pkg.take(st["bar"]))
            assert fe.fn is not None and fe.server is not None
            ino = tuple(st["ino"]) if st.get("ino") else None
            fe.server.adopt(socket.socket(fileno=pkg.take(st["listen"])), ino)  # type: ignore[arg-type]
            fe.server.sessions_served = int(st.get("sessions_served", 0))
            fe.handovers = dict(st.get("handovers") or {})
        finally:
            pkg.close_unused()
        fn = fe.fn
        # Every worker's slot paused before it gets a queue: nothing runs until resume().
        await devstate.stop(fn)
        if fn.fatal_reason:
            raise HandoverRefused(f"new workers did not answer: {fn.fatal_reason}")

    async def restore(self) -> None:
        fe = self.fe
        fn, server = fe.fn, fe.server
        assert fn is not None and server is not None
        pkg = await self._next("state")
        self.marks["received"] = time.monotonic_ns()
        try:
            st = pkg.state
            self.t_freeze = int(st["t_freeze"])
            self.marks.update(freeze=self.t_freeze, frozen=int(st.get("t_frozen", self.t_freeze)),
                              stopped=int(st.get("t_stopped", self.t_freeze)))
            if st.get("session") is not None:
                self.session = load_session(st["session"], pkg, fn, server.dma_timeout)
            self.waiting = [(socket.socket(fileno=pkg.take(ref)), float(since))
                            for ref, since in st.get("waiting", [])]
            load_device(fn, st["device"], pkg, self.session)
        finally:
            pkg.close_unused()
        self.marks["restored"] = time.monotonic_ns()

    async def resume(self) -> dict[str, float]:
        """Committed: run.  Returns the blackout and its phases in ms: freeze (barrier,
        quiesce, snapshot in the old front-end; quiesce: the part until every worker
        acknowledged), transfer (through both supervisors),
        restore (here), commit (waiting for every other controller and the commit),
        resume."""
        fe = self.fe
        fn, server = fe.fn, fe.server
        assert fn is not None and server is not None
        self.marks["go"] = time.monotonic_ns()
        await devstate.start(fn)
        if self.session is not None:
            server.adopt_session(self.session)
        for conn, since in self.waiting:      # clients waiting for their turn
            conn.setblocking(False)
            server.enqueue(conn, since)
        if fn.ctrl.features.interrupt_coalescing:
            # Completions the old workers held back for coalescing: signal them now.
            for cq in fn.ctrl.queues.cqs.values():
                if cq.ien:
                    fn.irq(cq.iv)
        m = self.marks
        m["resumed"] = time.monotonic_ns()
        ms = {"blackout_ms": m["resumed"] - m["freeze"], "freeze_ms": m["frozen"] - m["freeze"],
              "quiesce_ms": m["stopped"] - m["freeze"],
              "transfer_ms": m["received"] - m["frozen"], "restore_ms": m["restored"] - m["received"],
              "commit_ms": m["go"] - m["restored"], "resume_ms": m["resumed"] - m["go"]}
        return {k: round(v / 1e6, 3) for k, v in ms.items()}


class Mover:
    """Front-end control messages of a handover -> Giver / Taker (one per front-end)."""

    def __init__(self, fe: "FrontEnd") -> None:
        self.fe = fe
        self.assembler = PackageAssembler()
        self.giver = Giver(fe)
        self.taker = Taker(fe)
        self._task: asyncio.Task[None] | None = None

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        uid = msg.get("uid")        # the upgrade attempt a request belongs to (echoed)
        if op == "pkg":
            pkg = self.assembler.feed(msg, fds)
            if pkg is not None:
                self.taker.packages.put_nowait(pkg)
        elif op == "handover_static":
            st, sfds = self.giver.static()
            send_package(self.fe.sup, "static", st, sfds, uid=uid)
        elif op == "handover_freeze":
            self._task = asyncio.ensure_future(self._freeze(uid))
        elif op == "handover_thaw":
            asyncio.ensure_future(self._thaw())
        elif op == "handover_release":
            self.giver.release()
        elif op == "handover_resume":
            self.taker.go.set()
        else:
            raise ValueError(f"unknown handover message {op!r}")

    async def _freeze(self, uid: Any) -> None:
        try:
            st, fds = await self.giver.freeze()
        except Exception as e:
            log.error("%s: freeze failed: %s", self.fe.spec.name, e or type(e).__name__)
            self.fe.tell({"op": "handover_failed", "name": self.fe.spec.name, "uid": uid,
                          "reason": f"freeze failed: {e or type(e).__name__}"})
            return
        send_package(self.fe.sup, "state", st, fds, uid=uid)

    async def _thaw(self) -> None:
        """A thaw that overtakes a freeze still running waits for it (no half freeze)."""
        t = self._task
        if t is not None and not t.done():
            await asyncio.wait([t])
        await self.giver.thaw()
