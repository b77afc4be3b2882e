"""Live upgrade, the running daemon's side: start the new daemon, hand everything over.

Theory of operation
-------------------
`vnvmectl upgrade` (JSON-RPC `daemon.upgrade`), `systemctl reload` (ExecReload runs
vnvmectl upgrade) or SIGUSR2 start `UpgradeSource.run()` in the supervisor.  It
starts the installed `bin/vnvmed` again (the same command line, or `exec`) with one
end of a private SOCK_SEQPACKET socketpair in `$VNVMED_HANDOVER_FD`; the new
supervisor runs reactor/takeover.py instead of its normal start.  On that socket:

    old -> new   offer {format, controllers (specs, backends), pid} + management socket
    new -> old   accept | refuse {reason}            (format checked before anything runs)
    old -> new   static package per controller       (BAR memfd, listening socket)
    new -> old   prepared {name}                     (its front-end mapped BAR0, linked its
                                                      own new workers, paused them)
    --- blackout starts per controller: the old front-end freezes it (connmove.Giver)
    old -> new   state package per controller        (connection, fds, snapshot)
    new -> old   restored {name}                     (queues placed on paused workers)
    old          stops accepting on the management socket
    old -> new   commit                              (point of no return)
    new -> old   committed {blackouts}               (every controller runs in the new one)
    old          MAINPID=<new> + BARRIER to systemd, tells the new one it is main
    new          READY=1, the `vnvmed ready` log line, serves management requests
    old          its front-ends exit without touching shared state, its workers stop;
                 it answers vnvmectl and exits 0 (RAM namespaces now belong to the new one)

Before `commit` every failure - the new process refuses, crashes, times out, or one
controller cannot be frozen or restored - rolls back: the new process is killed (its
front-ends, still provisional, exit without side effects), every frozen controller is
thawed (connmove.Giver.thaw: the blackout ends, nothing was lost: bytes the client
sent wait in the socket buffer), RELOADING ends with READY=1, and vnvmectl gets the
error (exit status 1).  The freeze of the first controller to the commit is bounded
by `blackout_limit` (10 s, far below Linux's 30 s I/O timeout), the whole upgrade
by `timeout`.

Under systemd (NotifyAccess=main) the old main process announces the new main PID:
RELOADING=1 at the start, MAINPID=<new> after the commit (a barrier makes sure systemd
has read it before the old process exits), and the new one sends READY=1.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from ops import notify
from ops.mgmt.jsonrpc import MgmtError
from ops.mgmt.server import MgmtServer
from reactor import ipc
from reactor.shm.names import instance_prefix
from reactor.handover import (Package, PackageAssembler, PackageError, claimed_format,
                              forward_package, read_all)

if TYPE_CHECKING:
    from reactor.supervisor import FrontProc, Supervisor

log = logging.getLogger("vnvmed.upgrade")
HANDOVER_ENV = "VNVMED_HANDOVER_FD"
TIMEOUT = 45.0
BLACKOUT_LIMIT = 10.0
_uids = itertools.count(1)


class UpgradeFailed(Exception):
    pass


# ------------------------------------------------------------- specs on the wire
def to_wire(obj: Any) -> Any:
    """A config dataclass (ControllerSpec, NamespaceSpec) as plain msgpack-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_wire(x) for x in obj]
    return obj


def from_wire(cls: type, d: dict[str, Any], **nested: type) -> Any:
    """Rebuild `cls` from to_wire() output of maybe another version: unknown keys are
    dropped, missing ones take the dataclass default, enums are rebuilt from the
    default's type; `nested` names list fields of dataclasses (namespaces=NamespaceSpec)."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name in nested:
            v = [from_wire(nested[f.name], x) for x in v]
        elif isinstance(f.default, enum.Enum) and v is not None:
            v = type(f.default)(v)
        kw[f.name] = v
    obj = cls(**kw)
    for f in dataclasses.fields(cls):      # enum fields without a default (NamespaceSpec.kind)
        v = getattr(obj, f.name)
        if isinstance(f.type, str) and isinstance(v, str) and f.type in _ENUMS:
            setattr(obj, f.name, _ENUMS[f.type](v))
    return obj


def _enums() -> dict[str, type]:
    from ops.config import DoorbellMode, NamespaceKind, Polling
    return {"NamespaceKind": NamespaceKind, "DoorbellMode": DoorbellMode, "Polling": Polling}


_ENUMS = _enums()


def file_identity(b: Any) -> list[int] | None:
    """(st_dev, st_ino) of the file a file backend has open, else None.

    Every process opens a file namespace by path (workers too); the new daemon checks
    that the path still names the file the running daemon serves, so a replaced or
    deleted image refuses the upgrade instead of changing the disk under a VM.
    """
    fd = getattr(getattr(b, "inner", b), "_fd", None)
    if not isinstance(fd, int) or fd < 0:
        return None
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


# ------------------------------------------------------------------ the old side
class _Inbox:
    """Messages from the new daemon and from our front-ends, awaited with deadlines."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[tuple[str, dict[str, Any], Any]] = asyncio.Queue()

    def put(self, source: str, msg: dict[str, Any], extra: Any = None) -> None:
        self.q.put_nowait((source, msg, extra))

    async def get(self, deadline: float) -> tuple[str, dict[str, Any], Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self.q.get(), left)


class UpgradeSource:
    def __init__(self, sup: "Supervisor", exec_path: str | None = None, timeout: float = TIMEOUT,
                 blackout_limit: float = BLACKOUT_LIMIT) -> None:
        self.sup = sup
        self.exec_path = exec_path
        self.timeout = timeout
        self.blackout_limit = blackout_limit
        self.inbox = _Inbox()
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.front_asm: dict[str, PackageAssembler] = {}
        self.new_asm = PackageAssembler()
        self.frozen: set[str] = set()
        self.committed = False
        # Requests to our front-ends carry it and their answers echo it: an answer from
        # an earlier, rolled-back attempt (a freeze that ended late) is not ours.
        self.uid = next(_uids)
        self.taker_pids: list[int] = []      # the new daemon's front-ends (not our children)

    # -- plumbing ----------------------------------------------------------------
    def argv(self) -> list[str]:
        """The installed daemon with our own arguments (sys.orig_argv keeps interpreter flags)."""
        if self.exec_path:
            return [self.exec_path, *sys.argv[1:]]
        orig = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
        return [sys.executable, *orig[1:]]

    def _spawn(self) -> None:
        mine, theirs = ipc.pair()
        env = dict(os.environ)
        env[HANDOVER_ENV] = str(theirs.fileno())
        env.pop("WATCHDOG_PID", None)        # the watchdog is the new main process's job
        try:
            self.proc = subprocess.Popen(self.argv(), env=env, pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, cwd=os.getcwd())
        except OSError as e:
            mine.close()
            raise UpgradeFailed(f"cannot start {self.argv()[0]}: {e}") from None
        finally:
            theirs.close()
        self.sock = mine
        mine.setblocking(False)
        asyncio.get_running_loop().add_reader(mine.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        read_all(self.sock, self._message, lambda: self.inbox.put("new", {"op": "eof"}))

    def _message(self, msg: dict[str, Any], fds: list[int]) -> None:
        ipc.close_fds(fds)            # the new side sends no fds
        self.inbox.put("new", msg)

    def from_front(self, f: "FrontProc", msg: dict[str, Any], fds: list[int]) -> None:
        """A handover message from one of our front-ends (routed by the supervisor)."""
        if msg.get("uid") != self.uid:
            ipc.close_fds(fds)
            log.info("upgrade: dropped %r of an earlier attempt from %s", msg.get("op"), f.spec.name)
            return
        if msg.get("op") == "pkg":
            try:
                pkg = self.front_asm.setdefault(f.spec.name, PackageAssembler()).feed(msg, fds)
            except PackageError as e:
                self.inbox.put(f.spec.name, {"op": "handover_failed", "reason": str(e)})
                return
            if pkg is not None:
                self.inbox.put(f.spec.name, {"op": "pkg"}, pkg)
            return
        ipc.close_fds(fds)
        self.inbox.put(f.spec.name, msg)

    @staticmethod
    def _tell(f: "FrontProc", msg: dict[str, Any]) -> None:
        try:
            if f.ctl is None:
                raise OSError("it is restarting")
            ipc.send(f.ctl, msg)
        except OSError as e:
            raise UpgradeFailed(f"the front-end of {f.spec.name} is gone: {e}") from None

    def _gone(self, e: OSError) -> UpgradeFailed:
        """The new daemon's socket failed: say whether (and how) the process ended."""
        rc = None
        if self.proc is not None:
            try:
                rc = self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        if rc is not None:
            return UpgradeFailed(f"the new daemon exited (status {rc}) during the handover")
        return UpgradeFailed(f"the new daemon is unreachable: {e}")

    def _send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        assert self.sock is not None
        try:
            ipc.send(self.sock, msg, fds)
        except OSError as e:
            raise self._gone(e) from None

    async def _next(self, deadline: float, waiting_for: str) -> tuple[str, dict[str, Any], Any]:
        """The next message; failures from any side end the upgrade."""
        try:
            src, msg, extra = await self.inbox.get(deadline)
        except asyncio.TimeoutError:
            raise UpgradeFailed(f"timed out waiting for {waiting_for}") from None
        op = msg.get("op")
        if op == "eof":
            rc = self.proc.poll() if self.proc is not None else None
            if rc is None and self.proc is not None:
                await asyncio.sleep(0.05)
                rc = self.proc.poll()
            raise UpgradeFailed(f"the new daemon exited (status {rc}) during the handover"
                                if rc is not None else "the new daemon closed the handover socket")
        if op in ("refuse", "failed", "handover_failed"):
            if isinstance(extra, Package):
                extra.close()
            who = "the new daemon" if src == "new" else f"the front-end of {src}"
            what = f" (controller {msg['name']})" if src == "new" and msg.get("name") else ""
            raise UpgradeFailed(f"{who} refused{what}: {msg.get('reason')}")
        return src, msg, extra

    async def _gather(self, names: set[str], deadline: float, front_op: str, new_op: str) -> None:
        """Until every controller sent `front_op` (a package: forwarded to the new daemon
        as it comes) from its front-end and the new daemon said `new_op` for it; the two
        streams interleave freely."""
        fronts: set[str] = set()
        news: set[str] = set()
        while fronts != names or news != names:
            missing = sorted((names - fronts) | (names - news))
            src, msg, extra = await self._next(deadline, f"{front_op}/{new_op} ({', '.join(missing)})")
            op = msg.get("op")
            if src in names and src not in fronts and op == front_op:
                fronts.add(src)
                if isinstance(extra, Package):
                    self._forward(extra, src)
                continue
            name = msg.get("name", "")
            if src == "new" and op == new_op and name in names and name not in news:
                news.add(name)
                if isinstance(msg.get("pid"), int):
                    self.taker_pids.append(msg["pid"])
                continue
            if isinstance(extra, Package):
                extra.close()
            log.warning("upgrade: unexpected %r from %s while waiting for %s/%s", op, src, front_op, new_op)

    async def _expect(self, op: str, deadline: float) -> dict[str, Any]:
        """The next `op` from the new daemon itself."""
        while True:
            src, msg, extra = await self._next(deadline, f"{op} from the new daemon")
            if src == "new" and msg.get("op") == op:
                return msg
            if isinstance(extra, Package):
                extra.close()
            log.warning("upgrade: unexpected %r from %s while waiting for %s", msg.get("op"), src, op)

    # -- the procedure ---------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        sup = self.sup
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        notify.reloading()
        notify.status("live upgrade: starting the new daemon")
        fronts = dict(sup.fronts)
        try:
            for f in fronts.values():
                if f.ctl is None or f.proc is None or not f.proc.is_alive():
                    raise UpgradeFailed(f"controller {f.spec.name} is restarting; try again")
            self._spawn()
            assert self.proc is not None
            log.info("upgrade: started the new daemon, pid %d: %s", self.proc.pid, " ".join(self.argv()))
            self._offer(fronts)
            await self._expect("accept", deadline)
            names = set(fronts)
            for f in fronts.values():
                f.stopping = True               # no restarts while the handover runs
                self._tell(f, {"op": "handover_static", "uid": self.uid})
            await self._gather(names, deadline, "pkg", "prepared")
            # The blackout: from the first freeze until the new front-ends resume.
            blackout_deadline = min(deadline, time.monotonic() + self.blackout_limit)
            for f in fronts.values():
                self.frozen.add(f.spec.name)
                self._tell(f, {"op": "handover_freeze", "uid": self.uid})
            await self._gather(names, blackout_deadline, "pkg", "restored")
            if sup.mgmt is not None:
                sup.mgmt.stop_accepting()     # from now on the new daemon accepts
            self._send({"op": "commit"})
            self.committed = True
        except BaseException as e:
            reason = str(e) if isinstance(e, UpgradeFailed) else f"{type(e).__name__}: {e}"
            await self._rollback(fronts, reason)
            if isinstance(e, (UpgradeFailed, PackageError)):
                raise MgmtError(f"upgrade failed, the running daemon (pid {os.getpid()}) goes on: {reason}") from None
            raise
        return await self._finish(fronts, t0)

    def _offer(self, fronts: dict[str, "FrontProc"]) -> None:
        sup = self.sup
        ctrls = [{"spec": to_wire(f.spec), "restarts": f.restarts,
                  "backends": {str(nsid): b.spec() for nsid, b in f.backends.items()},
                  "sizes": {str(nsid): b.size for nsid, b in f.backends.items()},
                  "files": {str(nsid): ident for nsid, b in f.backends.items()
                            if (ident := file_identity(b)) is not None}}
                 for f in fronts.values()]
        fds = [sup.mgmt.listening_fd()] if sup.mgmt is not None else []
        self._send({"op": "offer", "format": list(claimed_format()), "pid": os.getpid(),
                    "controllers": ctrls, "mgmt": bool(fds)}, fds)

    def _forward(self, pkg: Package, name: str) -> None:
        assert self.sock is not None
        try:
            forward_package(self.sock, pkg, name=name)
        except OSError as e:
            raise self._gone(e) from None
        finally:
            pkg.close()

    async def _finish(self, fronts: dict[str, "FrontProc"], t0: float) -> dict[str, Any]:
        """After commit: learn the blackouts, make the new one the main process, leave."""
        sup = self.sup
        assert self.proc is not None
        result: dict[str, Any] = {"old_pid": os.getpid(), "new_pid": self.proc.pid,
                                  "format": ".".join(map(str, claimed_format()))}
        try:
            msg = await self._expect("committed", time.monotonic() + self.timeout)
            result["controllers"] = msg.get("controllers", {})
        except UpgradeFailed as e:
            # Past the point of no return: the new daemon owns the controllers now.
            log.error("upgrade: the new daemon failed after the commit: %s", e)
            result["error"] = str(e)
        notify.default().notify(MAINPID=self.proc.pid)
        notify.barrier()
        try:
            self._send({"op": "main"})
        except UpgradeFailed:
            pass
        for f in fronts.values():
            if f.ctl is not None:
                try:
                    ipc.send(f.ctl, {"op": "handover_release"})
                except OSError:
                    pass
        result["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        blackouts = ", ".join(f"{n} {c.get('blackout_ms')} ms" for n, c in result.get("controllers", {}).items())
        log.info("upgrade: pid %d took over in %.0f ms; blackout per controller: %s; pid %d exits",
                 self.proc.pid, result["duration_ms"], blackouts or "-", os.getpid())
        sup.handed_over = True
        asyncio.get_running_loop().call_soon(sup.request_stop)
        return result

    async def _rollback(self, fronts: dict[str, "FrontProc"], reason: str) -> None:
        log.error("upgrade failed: %s; rolling back", reason)
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        # The new front-ends map our controllers' BAR pages: none of them may run on
        # once ours resume (they also die with their forkserver: connmove.die_with_parent).
        await _kill_and_wait(self.taker_pids, "vnvmed: frontend")
        if self.proc is not None:
            for _ in range(200):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            self.sup.sweep_instance(self.proc.pid)
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except Exception:
                pass
            self.sock.close()
        for f in fronts.values():
            if f.ctl is not None and f.proc is not None and f.proc.is_alive():
                if f.spec.name in self.frozen:
                    ipc.send(f.ctl, {"op": "handover_thaw"})
                f.stopping = False
            else:
                f.stopping = False
                self.sup.restart_front(f)
        for asm in self.front_asm.values():
            asm.discard()
        if self.sup.mgmt is not None:
            await self.sup.mgmt.resume_accepting()
        notify.ready(f"upgrade failed: {reason}")


async def _kill_and_wait(pids: list[int], title: str, timeout: float = 5.0) -> None:
    """SIGKILL the processes (only if still titled `title`) and wait until each is gone or
    a zombie (a zombie runs nothing)."""
    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X") and cmd.startswith(title)
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class UpgradeMixin:
    """The supervisor's live-upgrade entry points (both sides); see the module doc.

    Everything the old side runs is imported when the daemon starts: by the time of an
    upgrade the files on disk are the new build's, and a lazy import would mix versions.

    Uses the supervisor's plumbing: `fronts`, `mgmt`, `cfg`, `handover`, `handed_over`,
    `stopping`, `_start_front`, `_stop_workers`, `_sweep_shm`.
    """

    async def upgrade(self, exec: str | None = None, timeout: float | None = None) -> dict:
        """JSON-RPC daemon.upgrade: the result, or MgmtError (nothing changed)."""
        s: Any = self
        if s.handover is not None or s.handed_over:
            raise MgmtError("an upgrade is already running")
        if s.stopping:
            raise MgmtError("vnvmed is stopping")
        s.handover = UpgradeSource(s, exec or None, float(timeout or TIMEOUT))
        try:
            return await s.handover.run()
        finally:
            s.handover = None

    async def upgrade_signal(self) -> None:
        log.info("SIGUSR2: live upgrade")
        try:
            await self.upgrade()
        except MgmtError as e:
            log.error("SIGUSR2: %s", e.message)

    async def adopt_front(self, f: "FrontProc") -> None:
        """Start a front-end that takes its controller over from another process."""
        s: Any = self
        f.stopping = True           # provisional: never restarted, never binds
        s.fronts[f.spec.name] = f
        await s._start_front(f, adopt=True)

    def restart_front(self, f: "FrontProc") -> None:
        asyncio.ensure_future(getattr(self, "_start_front")(f))

    async def adopt_mgmt(self, sock: socket.socket) -> None:
        s: Any = self
        s.mgmt = MgmtServer(s, s.cfg.rpc_socket)
        await s.mgmt.adopt(sock)

    def sweep_instance(self, pid: int) -> None:
        """Unlink what a process tree with supervisor `pid` left (a failed takeover)."""
        s: Any = self
        s._sweep_shm(prefix=instance_prefix(s.cfg.run_dir, pid))

    async def _leave(self) -> None:
        """After a handover: our front-ends exit on their own, the workers stop; nothing
        shared is destroyed, unlinked or reset - the new daemon runs it all."""
        s: Any = self
        if s.mgmt is not None:
            await s.mgmt.drain(2.0)
        deadline = time.monotonic() + 5
        for f in s.fronts.values():
            while f.proc is not None and f.proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if f.proc is not None and f.proc.is_alive():
                f.proc.kill()
        await s._stop_workers()
        s._sweep_shm("-ring-")
        log.info("handed over; pid %d exits", os.getpid())
