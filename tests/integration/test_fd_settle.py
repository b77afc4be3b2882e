"""The daemon's fds settle after a fault is cycled many times (issue 12, stress leak hunt).

Each test runs the real daemon and the stress suite's verified-I/O client
(tests/stress/client.py, a separate process), cycles one fault N times, and then
compares what every surviving daemon process has open (tests/daemon.fd_table: fds by
kind, from readlink) with what it had before: once the clients are gone and the
teardowns finished, every table must be back where it started.  A leak shows as the
kinds that grew (e.g. ``memfd:guest-ram``: DMA fds of a torn-down session).

- client kill -9 (with the controller enabled, queues busy, DMA storms and resets in
  progress): the front-end must close every DMA fd of the session.  It did not: the
  session's unmap runs while the admin queue still has views of its ring, so the
  mapping could only be parked, and nothing closed it until a garbage collection of
  the old session (1-5 guest-ram fds per front-end in a row of kills).
- front-end SIGKILL: the workers drop the dead front-end's channel, rings, doorbell
  and queue-table memfds and its client's DMA fds.
- worker SIGKILL: the front-end drops the dead worker's channel and rings.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.daemon import ROOT, Daemon, fd_table

pytestmark = pytest.mark.timeout(240)

ARGS = ["--cores", "0", "--controller", "s0={run}/s0.sock", "--namespace", "s0=ram:16M"]
SETTLE = 15.0           # generous: teardown + restart under load 10+ on 2 cores


def _kinds(pid: int) -> Counter[str] | None:
    """fd_table with the creator pid taken out of ring names (a restarted front-end
    makes rings of the same role under its own pid)."""
    t = fd_table(pid)
    if t is None:
        return None
    out: Counter[str] = Counter()
    for k, n in t.items():
        out[re.sub(r"(-ring-.*-w\d+)-\d+-", r"\1-PID-", k)] += n
    return out


def _persistent(d: Daemon, roles: tuple[str, ...]) -> dict[int, str]:
    kids = d.children()
    out = {d.pid: "supervisor"}
    out.update({p: c for p, c in kids.items() if any(r in c for r in roles)})
    return out


def _baseline(d: Daemon, roles: tuple[str, ...]) -> tuple[dict[int, str], dict[int, Counter[str] | None]]:
    """The processes to watch and their fd tables, once start-up has really finished.

    "vnvmed ready" comes when the sockets listen; under load a worker may still be
    unnamed (a fresh fork keeps the forkserver's title, so it was taken for the
    forkserver, with the forkserver's fds) or attaching the front-end's channel (its
    hello brings the doorbell and queue-table memfds and the namespace): the baseline
    was then a few fds short and the test failed 15 s after the kills (load 8-12).
    So: one process per role-name, every worker holding a controller's doorbell memfd,
    and two samples in a row alike."""
    deadline = time.monotonic() + SETTLE
    last: dict[int, Counter[str] | None] | None = None
    while True:
        procs = _persistent(d, roles)
        tables = {p: _kinds(p) for p in procs}
        named = list(procs.values())
        ok = (sum("forkserver" in c for c in named) == ("forkserver" in roles)
              and all(t is not None and (" worker" not in procs[p] or any(k.endswith("-bar0") for k in t))
                      for p, t in tables.items()))
        if ok and tables == last:
            return procs, tables
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not settle after start-up: {procs} {tables}")
        last = tables if ok else None
        time.sleep(0.2)


def _settled(pids: dict[int, str], before: dict[int, Counter[str] | None], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while True:
        diffs = {}
        for pid, role in pids.items():
            now = _kinds(pid)
            assert now is not None, f"{role} (pid {pid}) died"
            b = before[pid]
            assert b is not None
            if now != b:
                diffs[f"{role} (pid {pid})"] = {k: now[k] - b[k] for k in set(now) | set(b) if now[k] != b[k]}
        if not diffs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"fds did not settle within {timeout:.0f} s: {diffs}")
        time.sleep(0.1)


class Client:
    """tests/stress/client.py on the controller (reconnects by itself when the
    front-end dies)."""

    def __init__(self, d: Daemon, seed: int, storms: float = 0.0, resets: float = 0.0) -> None:
        self.err = os.path.join(d.run_dir, f"client-{seed}.err")
        with open(self.err, "w") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "tests.stress.client", d.socket, "--seed", str(seed),
                 "--queues", "2", "--depth", "16", "--storm-every", str(storms),
                 "--reset-every", str(resets)],
                cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=err,
                env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        self.p.wait(30)

    def alive(self) -> None:
        assert self.p.poll() is None, f"client exited with {self.p.returncode}: {open(self.err).read()[-2000:]}"


def _dma_fds(pid: int) -> int:
    t = fd_table(pid) or Counter()
    return t["memfd:guest-ram"]


def _wait(cond, what: str, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill_one(daemon: Daemon, role: str) -> None:
    """SIGKILL the (one) process of `role` and wait until the supervisor replaced it."""
    pids = daemon.pids_named(role)
    os.kill(pids[0], signal.SIGKILL)
    _wait(lambda: daemon.pids_named(role) not in ([], pids), f"the {role}'s restart")


@pytest.mark.daemon_args(ARGS)
def test_client_kill9_leaves_no_fds(daemon: Daemon) -> None:
    procs, before = _baseline(daemon, ("frontend", "worker", "forkserver"))
    fe = daemon.pids_named("frontend")[0]
    rng = random.Random(12)
    for i in range(12):
        c = Client(daemon, seed=i, storms=0.05, resets=0.2)
        # Killed once the session has memory mapped, at a random point of its I/O,
        # DMA storms and resets (the controller is enabled most of the time).
        _wait(lambda: _dma_fds(fe) > 0 or c.p.poll() is not None, "the client's DMA_MAP")
        time.sleep(rng.uniform(0.05, 0.5))
        c.alive()
        c.kill()
        _settled(procs, before)


@pytest.mark.daemon_args(ARGS)
def test_frontend_kills_leave_no_fds_in_workers(daemon: Daemon) -> None:
    procs, before = _baseline(daemon, ("worker", "forkserver"))
    c = Client(daemon, seed=1)
    try:
        for _ in range(8):
            _wait(lambda: any(_dma_fds(p) for p in daemon.pids_named("frontend")), "a served client")
            time.sleep(0.3)
            c.alive()
            _kill_one(daemon, "frontend")
        _wait(lambda: any(_dma_fds(p) for p in daemon.pids_named("frontend")), "a served client")
        c.alive()
    finally:
        c.kill(signal.SIGTERM)
    _settled(procs, before)


@pytest.mark.daemon_args(ARGS)
def test_worker_kills_leave_no_fds_in_the_frontend(daemon: Daemon) -> None:
    procs, before = _baseline(daemon, ("frontend", "forkserver"))
    c = Client(daemon, seed=2)
    try:
        fe = daemon.pids_named("frontend")[0]
        _wait(lambda: _dma_fds(fe) > 0, "a served client")
        for _ in range(8):
            _kill_one(daemon, "worker")
            time.sleep(0.3)
            c.alive()
    finally:
        c.kill(signal.SIGTERM)
    _settled(procs, before)
