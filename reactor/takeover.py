"""Live upgrade, the new daemon's side: take every controller over from the running one.

Theory of operation
-------------------
`bin/vnvmed` started with `$VNVMED_HANDOVER_FD` (by reactor/upgrade.py, which
describes the conversation) runs `UpgradeTarget.start()` instead of its normal
start-up: no stale-shm sweep (the running instance and those it adopted are alive),
no bind of any socket.  It reads the offer, checks the snapshot format (a newer major
is refused before anything starts), takes the controllers' specs from the offer (the
running daemon's, with every change made at run time, not the config file's), starts
its own workers (new code) and for each controller a front-end in adopt mode
(reactor/connmove.Taker) to which it relays the packages, and relays the front-ends'
progress back.  After `commit` it resumes every front-end, reports the blackouts,
waits for the old daemon to make it the main process, then takes ownership of the
RAM namespaces (it unlinks them at its own exit from now on) and serves the
management socket it was given.

Until the commit everything here is provisional: a failure exits (the old daemon
kills us anyway); our front-ends exit without side effects when we go; the RAM
namespaces were only attached, so nothing is unlinked.

`VNVMED_TEST_TAKEOVER_CRASH=accepted|prepared|restoring` makes this process SIGKILL
itself at that step: the rollback tests crash a real new daemon mid-handover.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from backends.base import Backend, open_backend
from ops import notify
from ops.config import ControllerSpec, NamespaceSpec
from reactor import ipc
from reactor.handover import (Package, PackageAssembler, PackageError, claimed_format, format_problem,
                              forward_package, read_all)
from reactor.upgrade import HANDOVER_ENV, TIMEOUT, file_identity, from_wire

if TYPE_CHECKING:
    from reactor.supervisor import FrontProc, Supervisor

log = logging.getLogger("vnvmed.upgrade")
CRASH_ENV = "VNVMED_TEST_TAKEOVER_CRASH"


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        log.warning("takeover: %s=%s: killing myself", CRASH_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


class TakeoverFailed(Exception):
    pass


def handover_fd(environ: dict[str, str] | None = None) -> int | None:
    env = os.environ if environ is None else environ
    v = env.get(HANDOVER_ENV)
    return int(v) if v else None


class UpgradeTarget:
    def __init__(self, sup: "Supervisor", fd: int, timeout: float = TIMEOUT) -> None:
        self.sup = sup
        self.sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        os.environ.pop(HANDOVER_ENV, None)
        self.timeout = timeout
        self.inbox: asyncio.Queue[tuple[str, dict[str, Any], Any]] = asyncio.Queue()
        self.asm = PackageAssembler()
        self.mgmt_fd: int | None = None
        self.old_pid = 0
        self.committed = False

    # -- plumbing ------------------------------------------------------------------
    def _readable(self) -> None:
        read_all(self.sock, self._message, lambda: self.inbox.put_nowait(("old", {"op": "eof"}, None)))

    def _message(self, msg: dict[str, Any], fds: list[int]) -> None:
        if msg.get("op") == "pkg":
            try:
                pkg = self.asm.feed(msg, fds)
            except PackageError as e:
                self.inbox.put_nowait(("old", {"op": "bad", "reason": str(e)}, None))
                return
            if pkg is not None:
                self.inbox.put_nowait(("old", {"op": "pkg"}, pkg))
            return
        if msg.get("op") == "offer" and fds:
            self.mgmt_fd = fds[0]
            ipc.close_fds(fds[1:])
        else:
            ipc.close_fds(fds)
        self.inbox.put_nowait(("old", msg, None))

    def from_front(self, f: "FrontProc", msg: dict[str, Any], fds: list[int]) -> None:
        ipc.close_fds(fds)
        self.inbox.put_nowait((f.spec.name, msg, None))

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            ipc.send(self.sock, msg)
        except OSError as e:
            raise TakeoverFailed(f"the old daemon is gone: {e}") from None

    async def _next(self, deadline: float) -> tuple[str, dict[str, Any], Any]:
        left = deadline - time.monotonic()
        try:
            src, msg, extra = await asyncio.wait_for(self.inbox.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            raise TakeoverFailed("timed out") from None
        if src == "old" and msg.get("op") == "eof" and not self.committed:
            raise TakeoverFailed("the old daemon closed the handover socket")
        if src == "old" and msg.get("op") == "bad":
            raise TakeoverFailed(str(msg.get("reason")))
        if src != "old" and msg.get("op") == "handover_failed":
            self._send({"op": "failed", "name": src, "reason": msg.get("reason")})
            raise TakeoverFailed(f"controller {src}: {msg.get('reason')}")
        return src, msg, extra

    # -- the procedure ---------------------------------------------------------------
    async def start(self) -> None:
        """Run the handover up to serving; raises TakeoverFailed (the caller exits)."""
        sup = self.sup
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)
        deadline = time.monotonic() + self.timeout
        src, offer, _ = await self._next(deadline)
        if offer.get("op") != "offer":
            raise TakeoverFailed(f"expected an offer, got {offer.get('op')!r}")
        self.old_pid = int(offer.get("pid", 0))
        problem = format_problem(offer.get("format"), claimed_format())
        if problem is not None:
            log.error("takeover from pid %d refused: %s", self.old_pid, problem)
            self._send({"op": "refuse", "reason": problem})
            raise TakeoverFailed(problem)
        try:
            fronts = self._fronts(offer.get("controllers") or [])
        except Exception as e:
            self._send({"op": "refuse", "reason": f"cannot take the controllers: {e}"})
            raise TakeoverFailed(str(e)) from None
        self._send({"op": "accept"})
        _crash_point("accepted")
        log.info("takeover: pid %d hands over %d controller(s), snapshot format %s",
                 self.old_pid, len(fronts), ".".join(map(str, offer.get("format") or ())))
        sup.start_workers()
        names = set(fronts)
        started: set[str] = set()
        prepared: set[str] = set()
        while prepared != names:           # static packages -> new front-ends, in any order
            src, msg, pkg = await self._next(deadline)
            name = (pkg.extra.get("name") if isinstance(pkg, Package) else None) or msg.get("name", "")
            if src == "old" and isinstance(pkg, Package) and pkg.kind == "static" and name in names:
                try:
                    f = fronts[name]
                    await sup.adopt_front(f)
                    assert f.ctl is not None
                    forward_package(f.ctl, pkg)
                finally:
                    pkg.close()
                started.add(name)
            elif src in names and msg.get("op") == "handover_prepared":
                prepared.add(src)
                proc = fronts[src].proc
                self._send({"op": "prepared", "name": src, "pid": proc.pid if proc else None})
                if prepared == names:
                    _crash_point("prepared")
            else:
                self._unexpected(src, msg, pkg)
        restored: set[str] = set()
        while True:                        # state packages -> front-ends; wait for commit
            src, msg, pkg = await self._next(deadline)
            name = pkg.extra.get("name") if isinstance(pkg, Package) else None
            if src == "old" and isinstance(pkg, Package) and pkg.kind == "state" and name in names:
                try:
                    f = fronts[name]
                    assert f.ctl is not None
                    forward_package(f.ctl, pkg)
                finally:
                    pkg.close()
                _crash_point("restoring")
            elif src in names and msg.get("op") == "handover_restored":
                restored.add(src)
                self._send({"op": "restored", "name": src})
            elif src == "old" and msg.get("op") == "commit" and restored == names:
                break
            else:
                self._unexpected(src, msg, pkg)
        self.committed = True
        await self._resume(fronts)

    def _unexpected(self, src: str, msg: dict[str, Any], pkg: Any) -> None:
        if isinstance(pkg, Package):
            pkg.close()
        log.warning("takeover: unexpected %r from %s", msg.get("op"), src)

    def _fronts(self, ctrls: list[dict[str, Any]]) -> dict[str, "FrontProc"]:
        """FrontProcs for the offered controllers, their backends attached (not owned)."""
        from ops.mgmtapi import _Shrunk
        from reactor.supervisor import FrontProc
        out: dict[str, FrontProc] = {}
        specs = []
        try:
            for c in ctrls:
                spec = from_wire(ControllerSpec, c["spec"], namespaces=NamespaceSpec)
                f = FrontProc(spec, restarts=int(c.get("restarts", 0)))
                out[spec.name] = f
                for nsid, bspec in (c.get("backends") or {}).items():
                    b: Backend = open_backend(bspec)
                    f.backends[int(nsid)] = b
                    want = (c.get("files") or {}).get(nsid)
                    if want is not None and file_identity(b) != list(want):
                        raise ValueError(f"controller {spec.name} namespace {nsid}: {bspec.get('path')} "
                                         f"is no longer the file the running daemon serves")
                    size = int((c.get("sizes") or {}).get(nsid, b.size))
                    f.backends[int(nsid)] = b if size == b.size else _Shrunk(b, size)  # type: ignore[assignment]
                specs.append(spec)
        except Exception:
            for f in out.values():
                for b in f.backends.values():
                    b.close()
            raise
        self.sup.cfg.controllers = specs
        return out

    async def _resume(self, fronts: dict[str, "FrontProc"]) -> None:
        sup = self.sup
        deadline = time.monotonic() + self.timeout
        for f in fronts.values():
            if f.ctl is not None:
                ipc.send(f.ctl, {"op": "handover_resume"})
        done: dict[str, dict[str, Any]] = {}
        while set(done) != set(fronts):
            try:
                src, msg, pkg = await self._next(deadline)
            except TakeoverFailed as e:
                log.error("takeover: after the commit: %s", e)
                break
            if src in fronts and msg.get("op") == "handover_resumed":
                done[src] = dict(msg.get("phases") or {},
                                 front_pid=fronts[src].proc.pid if fronts[src].proc else None)
            else:
                self._unexpected(src, msg, pkg)
        for f in fronts.values():
            f.stopping = False
            for b in f.backends.values():
                take = getattr(getattr(b, "inner", b), "take_ownership", None)
                if take is not None:
                    take()           # we unlink the RAM namespaces at our exit from now on
        self._send({"op": "committed", "controllers": done})
        try:                               # the old daemon makes us the main process
            while True:
                src, msg, pkg = await self._next(time.monotonic() + 5)
                if src == "old" and msg.get("op") in ("main", "eof"):
                    break
                self._unexpected(src, msg, pkg)
        except TakeoverFailed as e:
            log.warning("takeover: no word from the old daemon after the commit (%s)", e)
        try:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        except Exception:
            pass
        self.sock.close()
        if self.mgmt_fd is not None:
            await sup.adopt_mgmt(socket.socket(fileno=self.mgmt_fd))
        log.info("takeover from pid %d done: %s", self.old_pid,
                 ", ".join(f"{n} blackout {d.get('blackout_ms')} ms" for n, d in done.items()) or "no controllers")
        notify.status(f"took over from pid {self.old_pid}")
