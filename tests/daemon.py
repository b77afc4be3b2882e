"""The one way tests run the real daemon: ``bin/vnvmed`` from this checkout as a child process.

Theory of operation
-------------------
`Daemon` wraps one ``bin/vnvmed`` child.  ``spawn()`` starts it with stdin closed,
stdout and stderr both in ``log_path`` (default ``<run_dir>/vnvmed.log``), and an
environment built from ours: ``VNVMED_RUN_DIR=<run_dir>``, ``PYTHONPATH`` = the
checkout, unbuffered output (so the log is current when a test reads it) and *no*
``NOTIFY_SOCKET`` inherited from whoever runs pytest (a test that wants sd_notify
passes its own in ``env``).  ``wait_ready()`` polls the log for the supervisor's
``vnvmed ready`` line, which it logs once every socket listens; ``start()`` is
spawn + wait_ready and stops the child again if it never gets ready, so a failed
start leaks no process.

Everything that ends the daemon goes to *its* PID: ``stop()`` sends SIGTERM, waits,
and falls back to SIGKILL (returning the negative signal number, which no test
mistakes for a clean exit 0).  ``shm_left()`` lists the ``/dev/shm`` objects
(segments and ``sem.`` semaphores) named with this instance's prefix, for the
"nothing left behind" checks after a stop.

After a live upgrade the daemon's main process is another one (started by the old
one, which exits): `upgrade()` runs ``vnvmectl upgrade`` and `follow()` switches to
the new main PID.  The test process makes itself a child subreaper first
(`become_subreaper`), so the new main process becomes our child when the old one exits
and `stop()` still gets its exit status.  `shm_left()` then covers every main PID the
daemon had (RAM namespaces keep the name their creator gave them).

Users: tests/integration/conftest.py (`start_daemon`, the `daemon` fixture),
test_reactor.py, test_slowpath.py, test_ops_daemon.py (adds vnvmectl helpers) and
tests/qemu/harness.py (`start_vnvmed`).
"""
from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from reactor.shm.names import SHM_DIR, instance_prefix

ROOT = Path(__file__).resolve().parents[1]
VNVMED = str(ROOT / "bin" / "vnvmed")
READY_MARK = "vnvmed ready"     # reactor/supervisor.py logs it once all sockets listen
# The data path every daemon started here runs ("python"/"native"; None: the daemon's
# default), unless its arguments name one: tests/integration/conftest.py runs each
# integration module once per data path.
DATAPATH: str | None = None
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


VNVMECTL = str(ROOT / "bin" / "vnvmectl")
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (a daemon's new main process after a live upgrade) become ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def other_build(directory: str | os.PathLike[str], **env: str) -> str:
    """An executable running this checkout's bin/vnvmed with `env` exported: a 'second
    build' for `vnvmectl upgrade --exec` (e.g. VNVMED_SNAPSHOT_FORMAT=0.9 claims an
    older snapshot format, VNVMED_TEST_TAKEOVER_CRASH=restoring crashes mid-handover)."""
    path = os.path.join(os.fspath(directory), "vnvmed-" + "-".join(f"{k}-{v}" for k, v in env.items()))
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{exports}exec {sys.executable} {VNVMED} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def fd_table(pid: int) -> collections.Counter[str] | None:
    """What the open fds of `pid` are, counted by kind (None: the process is gone).

    The kind is readlink() of /proc/PID/fd/N with the per-object part dropped where it
    only numbers the object (``socket:[123]`` -> ``socket``, ``pipe:[4]`` -> ``pipe``,
    ``/memfd:guest-ram (deleted)`` -> ``memfd:guest-ram``); files and shm names stay
    whole.  The leak checks compare two tables: what grew says what leaked."""
    out: collections.Counter[str] = collections.Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for n in names:
        try:
            t = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue            # closed meanwhile
        if t.startswith(("socket:", "pipe:")):
            t = t.split(":")[0]
        elif t.startswith("/memfd:"):
            t = "memfd:" + t[len("/memfd:"):].split(" ")[0]
        out[t] += 1
    return out


class DaemonNotReady(RuntimeError):
    """bin/vnvmed exited or stayed silent before logging that it is ready (log tail in str())."""


class Daemon:
    """bin/vnvmed ARGS as a child of the test; stopped by PID."""

    def __init__(self, args: Sequence[str], run_dir: str | os.PathLike[str], *,
                 log_path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None,
                 new_session: bool = False) -> None:
        self.args = list(args)
        self.run_dir = os.fspath(run_dir)
        self.log_path = os.fspath(log_path) if log_path is not None else os.path.join(self.run_dir, "vnvmed.log")
        self.env = dict(env or {})
        self.cwd = os.fspath(cwd) if cwd is not None else str(ROOT)
        # A new session keeps a terminal's Ctrl-C (sent to pytest's process group) away
        # from the daemon, so the test's own teardown decides how it ends.
        self.new_session = new_session
        self.img = ""                 # a backing image the starter made for it, if any
        self.proc: subprocess.Popen | None = None
        self.main: int | None = None  # main PID after a live upgrade (our adopted child)
        self.main_rc: int | None = None
        self.pids: list[int] = []     # every main PID it had

    # --- life cycle ---------------------------------------------------------------------
    def spawn(self) -> "Daemon":
        """Start the process and return at once (see wait_ready)."""
        os.makedirs(self.run_dir, exist_ok=True)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(VNVMED_RUN_DIR=self.run_dir, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env.update(self.env)
        with open(self.log_path, "wb") as log:   # the child keeps its own copy of the fd
            args = list(self.args)
            if DATAPATH is not None and "--datapath" not in args:
                args += ["--datapath", DATAPATH]
            self.proc = subprocess.Popen([sys.executable, VNVMED, *args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, start_new_session=self.new_session)
        self.pids = [self.proc.pid]
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the log says ready; DaemonNotReady if it exits or the time runs out."""
        proc = self._proc()
        deadline = time.monotonic() + timeout
        while READY_MARK not in self.log():
            rc = proc.poll()
            if rc is not None:
                raise DaemonNotReady(f"vnvmed exited with {rc} before it was ready; args={self.args}\n"
                                     f"--- vnvmed log ---\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise DaemonNotReady(f"vnvmed not ready after {timeout:.0f} s; args={self.args}\n"
                                     f"--- vnvmed log ---\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def start(self, timeout: float = READY_TIMEOUT) -> "Daemon":
        """spawn() + wait_ready(); a daemon that does not get ready is stopped again."""
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by PID and wait; SIGKILL after ``timeout`` s.  Returns the exit status."""
        proc = self._proc()
        if self.main is not None:
            return self._stop_main(timeout)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    # --- after a live upgrade --------------------------------------------------------
    def vnvmectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``vnvmectl --rpc <our socket> ARGS`` (output captured)."""
        return subprocess.run([sys.executable, VNVMECTL, "--rpc", self.rpc, *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.cwd)

    def upgrade(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``vnvmectl upgrade ARGS --json``; on success follow the new main process."""
        become_subreaper()
        r = self.vnvmectl("upgrade", *args, "--json", timeout=timeout)
        if r.returncode == 0:
            self.follow(int(json.loads(r.stdout)["new_pid"]))
        return r

    def follow(self, pid: int, timeout: float = 15.0) -> None:
        """The daemon's main process is now `pid`; the previous one is reaped (exit status
        in `handed_over_rc`: 0 for a clean handover)."""
        prev = self.pid
        deadline = time.monotonic() + timeout
        if self.main is None:
            self.handed_over_rc = self._proc().wait(timeout)
        else:
            self.handed_over_rc = self._wait_main(deadline)
        assert prev != pid
        self.main = pid
        self.main_rc = None
        self.pids.append(pid)

    handed_over_rc: int | None = None

    def _wait_main(self, deadline: float) -> int | None:
        """Reap the adopted main process (we are its subreaper once its parent exited)."""
        assert self.main is not None
        while True:
            try:
                pid, status = os.waitpid(self.main, os.WNOHANG)
            except ChildProcessError:       # not (yet) ours: its parent has not exited
                pid, status = 0, 0
                if not os.path.exists(f"/proc/{self.main}"):
                    return None
            if pid:
                self.main_rc = os.waitstatus_to_exitcode(status)
                return self.main_rc
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.main), 0)
            time.sleep(0.02)

    def _stop_main(self, timeout: float) -> int:
        assert self.main is not None
        if self.main_rc is not None:
            return self.main_rc
        try:
            os.kill(self.main, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            rc = self._wait_main(time.monotonic() + timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.main, signal.SIGKILL)
            rc = self._wait_main(time.monotonic() + 10)
        return -1 if rc is None else rc

    def kill(self) -> None:
        """SIGKILL by PID (a test's last-resort clean-up; no exit status check)."""
        if self.main is not None and self.main_rc is None:
            try:
                os.kill(self.main, signal.SIGKILL)
                self._wait_main(time.monotonic() + 10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it is and what it said ----------------------------------------------------
    def _proc(self) -> subprocess.Popen:
        if self.proc is None:
            raise RuntimeError("vnvmed was not started")
        return self.proc

    @property
    def pid(self) -> int:
        return self.main if self.main is not None else self._proc().pid

    def alive(self) -> bool:
        if self.main is not None:
            if self.main_rc is not None:
                return False
            try:
                pid, status = os.waitpid(self.main, os.WNOHANG)
            except ChildProcessError:
                return os.path.exists(f"/proc/{self.main}")
            if pid:
                self.main_rc = os.waitstatus_to_exitcode(status)
                return False
            return True
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    @property
    def sockets(self) -> dict[str, str]:
        """Controller name -> vfio-user socket, from the ``--controller NAME=PATH`` arguments.

        Without any, the daemon may serve its embedded default (``nvme0`` in the run
        dir); that one is reported once the log names its socket.
        """
        out: dict[str, str] = {}
        for flag, value in zip(self.args, self.args[1:]):
            if flag == "--controller":
                name, _, sock = value.partition("=")
                out[name] = sock if os.path.isabs(sock) else os.path.join(self.run_dir, sock)
        if not out and "nvme0.sock" in self.log():
            out["nvme0"] = os.path.join(self.run_dir, "nvme0.sock")
        return out

    @property
    def socket(self) -> str:
        """The first controller's socket."""
        for sock in self.sockets.values():
            return sock
        raise LookupError(f"no --controller argument in {self.args}")

    @property
    def rpc(self) -> str:
        """The management socket (the run dir's default)."""
        return os.path.join(self.run_dir, "vnvmed.rpc")

    def children(self) -> dict[int, str]:
        """pid -> command line of the daemon's descendants (workers and front-ends are
        forked by the daemon's forkserver, so they are its grandchildren)."""
        out = {}
        todo = [self.pid]
        while todo:
            parent = todo.pop()
            try:
                with open(f"/proc/{parent}/task/{parent}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):   # exited meanwhile
                continue
            for pid in kids:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        out[pid] = c.read().replace(b"\0", b" ").decode().strip()
                except (FileNotFoundError, ProcessLookupError):
                    # Exited between the two reads: open() may succeed and read() then
                    # fail with ESRCH (a SIGKILLed worker, seen in a CI dry run).
                    continue
                todo.append(pid)
        return out

    def pids_named(self, word: str) -> list[int]:
        return sorted(p for p, cmd in self.children().items() if word in cmd)

    def shm_left(self) -> list[str]:
        """/dev/shm objects (segments and semaphores) of this instance still present
        (every main PID it had: see the module doc)."""
        prefixes = tuple(instance_prefix(self.run_dir, p) + "-" for p in (self.pids or [self.pid]))
        try:
            names = os.listdir(SHM_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(prefixes) or n.startswith(tuple("sem." + p for p in prefixes)))
