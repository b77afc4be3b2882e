"""The supervisor: the daemon's main process.

It owns the configuration, the namespaces' backends (it creates RAM namespaces in
shared memory and is the one that unlinks them), one worker process per core (pinned)
and one front-end process per controller, plus the management socket.  Children are
forked by the multiprocessing *forkserver* (a fresh single-threaded interpreter, so no
fork after threads) that preloads reactor/zygote.py; each gets a
SOCK_SEQPACKET control socket (reactor/ipc.py).  For every (front-end, worker) pair the
supervisor makes the socketpair their channel starts from.

Faults: a worker that dies is restarted on its core; every front-end gets a channel
to the new one and re-attaches the dead worker's queues from shared state
(reactor/recovery.py): the guest sees at most retried commands.  A front-end that dies
while a client is connected is replaced by one that takes over the same connection from
the rescue package it kept sending us (reactor/rescue.py, reactor/revive.py); without
one (no client, or take-overs failing) a fresh front-end serves the socket again.  SIGTERM: STOPPING=1, stop the front-ends (they close
their sockets and release the workers), stop the workers, destroy backends, exit 0.

Live upgrade (SIGUSR2, `vnvmectl upgrade`): reactor/upgrade.py hands every
controller to a new daemon started from the installed code, which runs
reactor/takeover.py instead of the normal start (`$VNVMED_HANDOVER_FD`).  After a
handover this process only stops its workers and exits: the controllers, their
sockets, the RAM namespaces and the management socket belong to the new one.
SIGHUP keeps its meaning: re-read the config file.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend, create_backend
from reactor import ipc
from ops import notify
from ops.config import ConfigError, ControllerSpec, DaemonConfig, NamespaceSpec
from ops.cores import parse_cores
from ops.mgmt.jsonrpc import MgmtError
from ops.mgmt.server import MgmtServer
from ops.mgmtapi import ManagementApiMixin
from reactor.upgrade import UpgradeMixin
from reactor.shm.names import cleanup_stale, instance_prefix

log = logging.getLogger("vnvmed")
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["reactor.zygote"])


RUN_DIR_MODE = 0o750      # as systemd's RuntimeDirectoryMode in contrib/systemd/vnvmed.service


def make_run_dir(path: str) -> None:
    """Create the run dir 0750 (exactly: not widened by the umask); an existing one is left alone."""
    try:
        os.makedirs(path, mode=RUN_DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, RUN_DIR_MODE)


class BackendConfigError(ValueError):
    """A namespace's backend cannot be opened as configured (start-up: one line, exit 2)."""


@dataclass
class WorkerProc:
    wid: int
    core: int
    proc: Any = None
    ctl: socket.socket | None = None
    restarts: int = 0


@dataclass
class FrontProc:
    spec: ControllerSpec
    backends: dict[int, Backend] = field(default_factory=dict)
    proc: Any = None
    ctl: socket.socket | None = None
    listening: asyncio.Future | None = None
    restarts: int = 0
    stopping: bool = False
    # Front-end crash recovery (reactor/rescue.py, reactor/revive.py): the newest rescue
    # package the front-end sent (we own its fds), and revivals failed in a row.
    rescue: Any = None
    assembler: Any = None
    revive_failures: int = 0
    revived: int = 0

    def drop_rescue(self) -> None:
        if self.rescue is not None:
            self.rescue.close()
            self.rescue = None


def _tell(sock: socket.socket | None, msg: dict[str, Any]) -> None:
    """Send a control message to a child that may have exited (then there is no one to tell)."""
    if sock is not None:
        try:
            ipc.send(sock, msg)
        except OSError:
            pass


class Supervisor(ManagementApiMixin, UpgradeMixin):
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.wprocs: dict[int, WorkerProc] = {}
        self.fronts: dict[str, FrontProc] = {}
        self.prefix = ""
        self.datapath = "python"     # resolved in run() (ops.preflight.datapath)
        self.stopping = False
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self._pongs: dict[int, asyncio.Future] = {}
        self.mgmt: MgmtServer | None = None
        self.done: asyncio.Event | None = None  # created in the loop
        self.handover: Any = None          # the running UpgradeSource / UpgradeTarget
        self.handed_over = False           # everything now belongs to a new daemon
        self.cores: list[int] = []

    # ------------------------------------------------------------------ set-up
    def _opts(self) -> dict[str, Any]:
        c = self.cfg
        return {"prefix": self.prefix, "log_level": c.log_level, "polling": str(c.polling.value),
                "spin_polls": 200, "idle_min_us": 50, "idle_max_us": int(c.poll_sleep_us),
                # The trapped-mode safety-net sleep; tests raise it to prove a wake-up was a kick.
                "trapped_sleep_us": int(os.environ.get("VNVMED_TRAPPED_SLEEP_US", 1_000_000)),
                "datapath": self.datapath,
                # Front-end crash recovery on the same connection (reactor/revive.py).
                "rescue": os.environ.get("VNVMED_FRONTEND_RECOVERY", "1") != "0"}

    def _cores(self) -> list[int]:
        allowed = os.sched_getaffinity(0)
        if self.cfg.cores is None:
            return sorted(allowed)
        return parse_cores(",".join(str(c) for c in self.cfg.cores), allowed)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        done = self.done = asyncio.Event()
        cores = self._cores()
        from ops.preflight import datapath
        self.datapath, why = datapath(self.cfg)
        log.info("data path: %s (%s)", self.datapath, why)
        make_run_dir(self.cfg.run_dir)
        from reactor.takeover import UpgradeTarget, handover_fd
        hfd = handover_fd()
        if hfd is None:   # a new daemon taking over must not sweep what the old one runs
            for name in cleanup_stale(self.cfg.run_dir):
                log.info("removed stale shared memory %s of a dead instance", name)
        self.prefix = instance_prefix(self.cfg.run_dir, os.getpid())
        self.cores = cores
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR2, lambda: asyncio.ensure_future(self.upgrade_signal()))
        try:
            if hfd is not None:
                self.handover = UpgradeTarget(self, hfd)
                await self.handover.start()
                self.handover = None
            else:
                self.start_workers()
                for spec in self.cfg.controllers:
                    await self._add_front(spec)
                self.mgmt = MgmtServer(self, self.cfg.rpc_socket)
                await self.mgmt.start()
        except BackendConfigError:
            await self._shutdown()
            raise             # ops.cli prints the one line and exits 2
        except Exception as e:
            log.error("start-up failed: %s", e)
            await self._shutdown()
            return 2
        socks = ", ".join(f"{f.spec.name}={f.spec.socket}" for f in self.fronts.values())
        log.info("vnvmed ready: %d controller(s) [%s], %d worker(s) on cores %s, rpc %s",
                 len(self.fronts), socks, len(self.wprocs), ",".join(map(str, cores)),
                 self.cfg.rpc_socket)
        notify.ready()
        notify.status(f"serving {len(self.fronts)} controller(s) on {len(self.wprocs)} worker(s)")
        wd = asyncio.ensure_future(self._watchdog())
        await done.wait()
        wd.cancel()
        if self.handed_over:
            await self._leave()
            return 0
        notify.stopping()
        log.info("stopping")
        await self._shutdown()
        log.info("stopped")
        return 0

    def start_workers(self) -> None:
        for wid, core in enumerate(self.cores):
            self.wprocs[wid] = WorkerProc(wid, core)
            self._start_worker(self.wprocs[wid])

    def request_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            assert self.done is not None
            self.done.set()

    async def _watchdog(self) -> None:
        interval = notify.watchdog_interval()
        if not interval:
            return
        while True:
            await asyncio.sleep(interval / 2)
            if await self._workers_responsive(timeout=interval / 4):
                notify.watchdog()

    async def _workers_responsive(self, timeout: float) -> bool:
        res = await asyncio.gather(*(self._ping(w, timeout) for w in self.wprocs.values()),
                                   return_exceptions=True)
        return all(isinstance(r, dict) for r in res)

    # ------------------------------------------------------------------ workers
    def _start_worker(self, w: WorkerProc) -> None:
        from workers.main import run as worker_run
        mine, theirs = ipc.pair()
        w.proc = CTX.Process(target=worker_run, args=(w.wid, w.core, theirs, self._opts()),
                             name=f"vnvmed-worker{w.wid}", daemon=False)
        w.proc.start()
        theirs.close()
        w.ctl = mine
        mine.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(mine.fileno(), self._worker_readable, w)
        loop.add_reader(w.proc.sentinel, self._worker_exited, w)

    def _worker_readable(self, w: WorkerProc) -> None:
        assert w.ctl is not None
        while True:
            try:
                msg, fds = ipc.recv(w.ctl)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            ipc.close_fds(fds)
            if msg is None:
                asyncio.get_running_loop().remove_reader(w.ctl.fileno())
                return
            if msg.get("op") == "pong":
                fut = self._pongs.pop(w.wid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def _ping(self, w: WorkerProc, timeout: float = 1.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._pongs[w.wid] = fut
        assert w.ctl is not None
        ipc.send(w.ctl, {"op": "ping"})
        return await asyncio.wait_for(fut, timeout)

    def _worker_exited(self, w: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.proc.sentinel)
        if w.ctl is not None:
            try:
                loop.remove_reader(w.ctl.fileno())
            except Exception:
                pass
            w.ctl.close()
            w.ctl = None
        if self.stopping:
            return
        log.error("worker %d (core %d, pid %d) died with exit code %s: restarting it", w.wid,
                  w.core, w.proc.pid, w.proc.exitcode)
        w.restarts += 1
        try:
            self._start_worker(w)
        except OSError as e:
            # The forkserver went down with it (a signal to the whole process group,
            # which also stops us in a moment): nothing to restart with.
            log.error("worker %d: cannot restart: %s", w.wid, e)
            return
        for f in self.fronts.values():
            if f.ctl is not None and not f.stopping:
                a, b = ipc.pair()
                assert w.ctl is not None
                try:
                    ipc.send(w.ctl, {"op": "channel", "name": f.spec.name}, [b.fileno()])
                    ipc.send(f.ctl, {"op": "worker", "wid": w.wid}, [a.fileno()])
                except OSError as e:
                    # That front-end (or the new worker) died meanwhile: its own exit
                    # handler restarts it, and a restarted front-end gets channels to
                    # every worker (found by the stress suite, issue 12).
                    log.info("new worker %d: no channel to %s: %s", w.wid, f.spec.name, e)
                finally:
                    a.close()
                    b.close()

    # ------------------------------------------------------------------ front-ends
    def _create_backends(self, spec: ControllerSpec) -> dict[int, Backend]:
        made: dict[int, Backend] = {}
        try:
            for ns in spec.namespaces:
                assert ns.nsid is not None
                made[ns.nsid] = create_backend(str(ns.kind.value), ns.arg,
                                               name_prefix=f"{self.prefix}-{spec.name}",
                                               read_only=ns.read_only, **ns.backend_options())
        except Exception as e:
            for b in made.values():
                b.destroy()
            if isinstance(e, (ValueError, OSError)):   # bad input: an unreachable server, a missing image...
                raise BackendConfigError(f"controller {spec.name}: namespace {ns.nsid} ({ns.kind.value}): {e}") from None
            raise
        return made

    @staticmethod
    def _ns_wire(ns: NamespaceSpec, b: Backend) -> dict[str, Any]:
        assert ns.nsid is not None
        return {"nsid": ns.nsid, "block_size": ns.block_size, "blocks": b.size // ns.block_size,
                "read_only": ns.read_only, "backend": b.spec(), "fingerprint": ns.fingerprint}

    async def _add_front(self, spec: ControllerSpec) -> FrontProc:
        f = FrontProc(spec)
        f.backends = self._create_backends(spec)
        self.fronts[spec.name] = f
        try:
            await self._start_front(f)
        except Exception:
            self.fronts.pop(spec.name, None)
            for b in f.backends.values():
                b.destroy()
            raise
        return f

    async def _start_front(self, f: FrontProc, adopt: bool | str = False) -> None:
        from reactor.frontend import run as front_run
        loop = asyncio.get_running_loop()
        worker_socks: dict[int, socket.socket] = {}
        for w in self.wprocs.values():
            a, b = ipc.pair()
            if w.ctl is not None:
                try:
                    ipc.send(w.ctl, {"op": "channel", "name": f.spec.name}, [b.fileno()])
                except OSError:
                    pass   # that worker just died: its restart brings the front-end a channel
            b.close()
            worker_socks[w.wid] = a
        mine, theirs = ipc.pair()
        nss = [self._ns_wire(ns, f.backends[ns.nsid]) for ns in f.spec.namespaces if ns.nsid is not None]
        f.proc = CTX.Process(target=front_run, args=(f.spec, nss, worker_socks, theirs,
                                                     dict(self._opts(), adopt=adopt)),
                             name=f"vnvmed-frontend-{f.spec.name}")
        f.proc.start()
        theirs.close()
        for s in worker_socks.values():
            s.close()
        f.ctl = mine
        mine.setblocking(False)
        loop.add_reader(mine.fileno(), self._front_readable, f)
        loop.add_reader(f.proc.sentinel, self._front_exited, f)
        if adopt:        # it binds nothing: reactor/takeover.py follows its progress
            f.listening = None
            return
        f.listening = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(f.listening), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"controller {f.spec.name}: front-end did not start listening") from None

    def _front_readable(self, f: FrontProc) -> None:
        assert f.ctl is not None
        while True:
            try:
                msg, fds = ipc.recv(f.ctl)
            except (BlockingIOError, InterruptedError, OSError):
                return
            if msg is None:
                asyncio.get_running_loop().remove_reader(f.ctl.fileno())
                return
            op = msg.get("op")
            if op == "pkg" and msg.get("kind") == "rescue":
                self._rescue_part(f, msg, fds)
                continue
            if op == "pkg" or str(op).startswith("handover_"):
                if self.handover is not None:
                    self.handover.from_front(f, msg, fds)
                else:
                    ipc.close_fds(fds)
                continue
            ipc.close_fds(fds)
            if op == "listening" and f.listening is not None and not f.listening.done():
                f.listening.set_result(True)
            elif op == "rescue_done":
                f.revive_failures = 0
                f.revived += 1
            elif op == "rescue_failed":
                # The next front-end tries again from the same package (a cause may be
                # passing: a worker busy draining); after 3 failures in a row a fresh
                # front-end starts and the client's connection goes with the package.
                log.error("front-end of %s: recovery failed (%s)%s", f.spec.name, msg.get("reason"),
                          "" if f.revive_failures < 3 else "; the client must reconnect")
            elif op == "reply":
                fut = self._calls.pop(msg.get("id", -1), None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(MgmtError(str(msg["error"])))
                    else:
                        fut.set_result(msg.get("result"))

    def _rescue_part(self, f: FrontProc, msg: dict[str, Any], fds: list[int]) -> None:
        from reactor.handover import PackageAssembler, PackageError
        if f.assembler is None:
            f.assembler = PackageAssembler()
        try:
            pkg = f.assembler.feed(msg, fds)
        except PackageError as e:
            log.error("front-end of %s: rescue package: %s", f.spec.name, e)
            return
        if pkg is not None:
            f.drop_rescue()         # the newest one counts (fds: ours until replaced)
            f.rescue = pkg

    def _front_exited(self, f: FrontProc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(f.proc.sentinel)
        if f.ctl is not None:
            self._front_readable(f)     # a package sent just before the death counts
            try:
                loop.remove_reader(f.ctl.fileno())
            except Exception:
                pass
            f.ctl.close()
            f.ctl = None
        if f.listening is not None and not f.listening.done():
            f.listening.set_exception(RuntimeError(
                f"controller {f.spec.name}: front-end exited with code {f.proc.exitcode} during start-up"))
            return
        self._sweep_shm(f"-ring-{f.spec.name}-", f"-{f.proc.pid}-")
        if f.assembler is not None:
            f.assembler.discard()
            f.assembler = None
        if self.stopping or f.stopping:
            f.drop_rescue()
            return
        for w in self.wprocs.values():
            _tell(w.ctl, {"op": "drop", "name": f.spec.name})
        f.restarts += 1
        revive = (f.rescue is not None and f.rescue.state.get("session") is not None
                  and f.revive_failures < 3)
        if revive:
            f.revive_failures += 1          # back to 0 when the new one reports rescue_done
            log.error("front-end of %s (pid %d) died with exit code %s: a new one takes over "
                      "its connection", f.spec.name, f.proc.pid, f.proc.exitcode)
        else:
            why = ("no client was connected" if f.rescue is not None else
                   "no rescue package" if f.revive_failures < 3 else "recovery failed 3 times")
            log.error("front-end of %s (pid %d) died with exit code %s: restarting it (%s)",
                      f.spec.name, f.proc.pid, f.proc.exitcode, why)
            f.drop_rescue()
        asyncio.ensure_future(self._restart_front(f, revive=revive))

    async def _restart_front(self, f: FrontProc, attempts: int = 5, revive: bool = False) -> None:
        """Start a dead front-end again; a start that fails is retried with a back-off
        (found by the stress suite: a restart racing a worker's death can fail), and a
        forkserver that is gone (the process group is being stopped) ends it quietly.
        `revive`: the new one takes over the connection from the rescue package."""
        from reactor.handover import forward_package
        for i in range(attempts):
            try:
                if revive and f.rescue is not None:
                    await self._start_front(f, adopt="rescue")
                    assert f.ctl is not None
                    forward_package(f.ctl, f.rescue)
                    return
                await self._start_front(f)
                return
            except Exception as e:
                if self.stopping or f.stopping or isinstance(e, ConnectionRefusedError):
                    return
                log.error("front-end of %s: restart attempt %d failed: %s", f.spec.name, i + 1, e)
                await asyncio.sleep(0.2 * 2 ** i)
        log.error("front-end of %s: giving up after %d restart attempts", f.spec.name, attempts)

    async def _call(self, f: FrontProc, method: str, params: dict[str, Any] | None = None,
                    timeout: float = 5.0) -> Any:
        if f.ctl is None:
            raise MgmtError(f"controller {f.spec.name} is restarting; try again")
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[i] = fut
        try:
            ipc.send(f.ctl, {"op": "call", "id": i, "method": method, "params": params or {}})
        except OSError:
            self._calls.pop(i, None)
            raise MgmtError(f"controller {f.spec.name} is restarting; try again") from None
        return await asyncio.wait_for(fut, timeout)

    async def _stop_front(self, f: FrontProc, timeout: float = 10.0) -> None:
        f.stopping = True
        f.drop_rescue()
        _tell(f.ctl, {"op": "stop"})
        deadline = time.monotonic() + timeout
        while f.proc is not None and f.proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if f.proc is not None and f.proc.is_alive():
            log.error("front-end of %s did not stop: killing it", f.spec.name)
            f.proc.kill()
        for w in self.wprocs.values():
            _tell(w.ctl, {"op": "drop", "name": f.spec.name})
        for b in f.backends.values():
            b.destroy()

    async def _shutdown(self) -> None:
        # A SIGTERM to the whole process group reaches the children too: any of them may
        # be gone already, so every message to a child tolerates a closed socket (_tell).
        self.stopping = True
        if self.mgmt is not None:
            await self.mgmt.close()
        await asyncio.gather(*(self._stop_front(f) for f in self.fronts.values()))
        await self._stop_workers()
        # Every child has ended: whatever of this instance is still in /dev/shm belongs to
        # a creator that died before it could unlink (SIGKILLed front-end).
        self._sweep_shm()

    async def _stop_workers(self) -> None:
        for w in self.wprocs.values():
            _tell(w.ctl, {"op": "stop"})
        deadline = time.monotonic() + 5
        for w in self.wprocs.values():
            while w.proc is not None and w.proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if w.proc is not None and w.proc.is_alive():
                w.proc.kill()

    def _sweep_shm(self, *parts: str, prefix: str | None = None) -> None:
        """Unlink this instance's segments whose names contain every part (creator died)."""
        try:
            names = os.listdir("/dev/shm")
        except OSError:
            return
        prefix = prefix or self.prefix
        for n in names:
            if n.startswith(prefix + "-") and all(p in n for p in parts):
                try:
                    os.unlink(os.path.join("/dev/shm", n))
                    log.info("removed shared memory %s left by a dead process", n)
                except OSError:
                    pass

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; add controllers that are new, remove those gone."""
        if not self.cfg.source:
            log.info("SIGHUP: no config file to reload")
            return
        from ops.config import load_toml
        try:
            new = load_toml(self.cfg.source)
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded: %s", e)
            return
        want = {c.name: c for c in new.controllers}
        for name in list(self.fronts):
            if name not in want:
                await self.controller_remove(name, force=True)
        for name, spec in want.items():
            if name not in self.fronts:
                try:
                    await self._add_front(spec)
                    self.cfg.controllers.append(spec)
                except Exception as e:
                    log.error("SIGHUP: controller %s not added: %s", name, e)
        log.info("SIGHUP: configuration reloaded")
