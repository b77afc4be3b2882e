"""The stress harness: a real daemon, verified I/O clients, faults, resource sampling.

Theory of operation
-------------------
`Stress(cfg)` starts ``bin/vnvmed`` (tests/daemon.py) with `cfg.controllers`
controllers, each with its own RAM namespace, and one client process per controller
(tests/stress/client.py: several queues of verified random I/O, plus the faults a
guest makes itself: DMA storms, CC.EN and DEVICE_RESET resets).  `run(seconds)` then
injects the outside faults on a random schedule (each fault has a mean period):

  client_kill    SIGKILL a client; a new one connects at once (the reconnect race)
  worker_kill    SIGKILL a worker process (the supervisor restarts it)
  frontend_kill  SIGKILL a controller's front-end (a new one takes over the client's
                 connection: reactor/revive.py; with frontend_recovery=False the
                 daemon runs with VNVMED_FRONTEND_RECOVERY=0 and the client reconnects)
  ns_churn       vnvmectl namespace add / resize / remove on a controller

and samples, every SAMPLE_EVERY seconds, the fds, RSS and threads of every daemon
process (keyed by role: supervisor, worker N, frontend NAME; a restarted process
starts a new series) and the instance's /dev/shm objects.  `finish()` stops the
clients (their final counters), lets the daemon settle, samples once more and
judges: mismatches, lost and doubled commands must be 0; no series may grow (fds,
threads beyond a small slack, RSS beyond 25 % + 32 MiB between its first and last
quarter); /dev/shm must hold as many objects as right after start-up.

Reuse: `Stress.faults` maps a name to (callable, mean period); add your own with
`add_fault(name, fn, every)` (the migration suite adds a back-and-forth migration),
or pass `faults={}` to run I/O only.  `summary()` gives the numbers, `table()` the
printed form (scripts/stress).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reactor.shm.names import cleanup_stale
from tests.daemon import Daemon, fd_table

ROOT = Path(__file__).resolve().parents[2]
VNVMECTL = str(ROOT / "bin" / "vnvmectl")
SAMPLE_EVERY = 2.0
# A process is sampled once it is this old: a front-end that is taking a connection over
# (or a worker joining) has not opened its device's fds yet, and a first sample taken
# then made the whole normal set look like growth ("frontend: fds 14 -> 39", the 10:20
# 61-min run: BAR, queue table, checkpoint, rings, guest RAM - one of each, nothing
# more).  Take-overs take 0.01-2.6 s here.
SETTLE_S = 8.0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class StressConfig:
    controllers: int = 2
    queues: int = 2
    depth: int = 16
    ns_size: str = "16M"
    ns_kind: str = "ram"            # "ram" (synchronous) or "file" (asynchronous engine: parks)
    cores: str = "0-1"
    trapped: bool = False           # every other controller with trapped doorbells
    storm_every: float = 3.0        # client-side faults (mean seconds; 0 = never)
    reset_every: float = 8.0
    faults: dict[str, float] = field(default_factory=lambda: {
        "client_kill": 6.0, "worker_kill": 10.0, "frontend_kill": 15.0, "ns_churn": 5.0})
    seed: int = 1
    max_iops: float = 0.0           # per client; 0 = as fast as it goes (long runs throttle)
    # Before transparent worker recovery a killed worker makes its controllers CFS
    # (the client resets); with it, a worker kill must not be seen at all.
    worker_kill_transparent: bool = False
    # Front-end crash recovery (issue 12): a killed front-end's client keeps its connection,
    # so any reconnect of a live client is a problem.  False: the old behaviour (the
    # daemon restarts a fresh front-end, the client reconnects).
    frontend_recovery: bool = True


@dataclass
class Series:
    role: str
    pid: int
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, fds, rss KiB, threads
    first_fds: Counter[str] | None = None     # fd kinds at the first and the last sample:
    last_fds: Counter[str] | None = None      # a leak report says what grew

    def fd_growth(self) -> dict[str, int]:
        a, b = self.first_fds or Counter(), self.last_fds or Counter()
        return {k: b[k] - a[k] for k in sorted(set(a) | set(b)) if b[k] > a[k]}


def _age_s(pid: int) -> float:
    """Seconds since `pid` started (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / _TICKS
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_sample(pid: int) -> tuple[int, int, int] | None:
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return fds, rss, threads
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class Stress:
    def __init__(self, cfg: StressConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.run_dir = tempfile.mkdtemp(prefix="vnst-", dir="/tmp")
        self.d: Daemon | None = None
        self.names = [f"s{i}" for i in range(cfg.controllers)]
        self.clients: dict[str, subprocess.Popen] = {}
        self.totals: dict[str, dict[str, int]] = {}      # finished client processes, summed
        self.last: dict[str, dict[str, Any]] = {}        # live client -> last report
        self.readers: dict[str, threading.Thread] = {}
        self.errlogs: list[str] = []
        self.series: dict[tuple[str, int], Series] = {}
        self.shm_start = 0
        self.shm_end = 0
        self.injected: dict[str, int] = {}
        self.fault_errors: list[str] = []
        self.client_deaths: list[str] = []
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._client_seq = 0
        self.faults: dict[str, tuple[Callable[[], None], float]] = {}
        builtin = {"client_kill": self.kill_client, "worker_kill": self.kill_worker,
                   "frontend_kill": self.kill_frontend, "ns_churn": self.ns_churn}
        for name, every in cfg.faults.items():
            self.add_fault(name, builtin[name], every)

    def add_fault(self, name: str, fn: Callable[[], None], every: float) -> None:
        self.faults[name] = (fn, every)
        self.injected.setdefault(name, 0)

    # -- daemon and clients ------------------------------------------------------------
    def start(self) -> None:
        args = ["--cores", self.cfg.cores, "--log-level", "info"]
        for i, name in enumerate(self.names):
            ns = f"ram:{self.cfg.ns_size}"
            if self.cfg.ns_kind == "file":
                img = os.path.join(self.run_dir, f"{name}.img")
                with open(img, "wb") as f:
                    f.truncate(int(self.cfg.ns_size.rstrip("M")) << 20)
                ns = f"file:{img}"
            args += ["--controller", f"{name}={self.run_dir}/{name}.sock", "--namespace", f"{name}={ns}"]
            if self.cfg.trapped and i % 2:
                args += ["--doorbells", f"{name}=trapped"]
        env = {} if self.cfg.frontend_recovery else {"VNVMED_FRONTEND_RECOVERY": "0"}
        self.d = Daemon(args, self.run_dir, env=env, new_session=True).start()
        time.sleep(0.5)
        self.shm_start = len(self.d.shm_left())
        for name in self.names:
            self.start_client(name)
        # Warm-up: the leak sampler's first samples must see every process at work
        # (a file engine starts its threads at the first I/O: "threads 1 -> 9").
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self._lock:
                if all(self.last.get(n, {}).get("completed", 0) > 0 for n in self.names):
                    break
            time.sleep(0.1)

    def start_client(self, name: str) -> None:
        assert self.d is not None
        self._client_seq += 1
        cfg = self.cfg
        argv = [sys.executable, "-m", "tests.stress.client", f"{self.run_dir}/{name}.sock",
                "--seed", str(cfg.seed * 1000 + self._client_seq), "--queues", str(cfg.queues),
                "--depth", str(cfg.depth), "--storm-every", str(cfg.storm_every),
                "--reset-every", str(cfg.reset_every), "--max-iops", str(cfg.max_iops)]
        if cfg.trapped and self.names.index(name) % 2:
            argv.append("--trapped")
        errlog = os.path.join(self.run_dir, f"client-{name}-{self._client_seq}.err")
        self.errlogs.append(errlog)
        p = subprocess.Popen(argv, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=open(errlog, "w"),
                             env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                             text=True)
        self.clients[name] = p
        t = threading.Thread(target=self._read_reports, args=(name, p), daemon=True)
        t.start()
        self.readers[name] = t

    def _read_reports(self, name: str, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        last: dict[str, Any] = {}
        for line in p.stdout:
            try:
                last = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if self.clients.get(name) is p:
                    self.last[name] = last
        p.wait()
        with self._lock:
            tot = self.totals.setdefault(name, {})
            for k, v in last.items():
                if isinstance(v, int) and not isinstance(v, bool) and k not in ("inflight", "known_blocks"):
                    tot[k] = tot.get(k, 0) + v
            if self.clients.get(name) is p:
                self.last.pop(name, None)

    # -- faults ------------------------------------------------------------------------
    def kill_client(self) -> None:
        name = self.rng.choice(self.names)
        p = self.clients[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        self.readers[name].join(5)
        self.start_client(name)          # at once: the previous session may still tear down

    def _pids(self, word: str) -> list[int]:
        assert self.d is not None
        return sorted(pid for pid, cmd in self.d.children().items() if word in cmd)

    def kill_worker(self) -> None:
        pids = self._pids("worker")
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)

    def kill_frontend(self) -> None:
        # One crash at a time: the previous kill's replacement must have taken over (or
        # restarted) first - a front-end killed while it takes over makes the client's
        # pending request wait for several take-overs in a row (its timeout is 10 s).
        assert self.d is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = self.d.log()
            if (log.count("recovered on the same connection") + log.count(": restarting it (")
                    >= self.injected.get("frontend_kill", 0)):
                break
            time.sleep(0.05)
        pids = self._pids("frontend")
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        assert self.d is not None
        return subprocess.run([sys.executable, VNVMECTL, "--rpc", self.d.rpc, *args],
                              capture_output=True, text=True, timeout=30, cwd=self.run_dir,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def ns_churn(self) -> None:
        name = self.rng.choice(self.names)
        r = self.ctl("namespace", "add", name, "ram:4M", "--json")
        if r.returncode != 0:
            if "restarting" not in r.stderr:
                self.fault_errors.append(f"namespace add on {name}: {r.stderr.strip()}")
            return
        m = re.search(r'"nsid":\s*(\d+)', r.stdout)
        if not m:
            self.fault_errors.append(f"namespace add on {name}: no nsid in {r.stdout!r}")
            return
        nsid = m.group(1)
        for step in (("namespace", "resize", name, nsid, "2M"), ("namespace", "remove", name, nsid)):
            r = self.ctl(*step)
            if r.returncode != 0 and "restarting" not in r.stderr:
                self.fault_errors.append(f"{' '.join(step)}: {r.stderr.strip()}")

    # -- sampling ----------------------------------------------------------------------
    def sample(self) -> None:
        assert self.d is not None
        now = time.monotonic()
        procs = {self.d.pid: "supervisor", **{p: c for p, c in self.d.children().items()}}
        for pid, cmd in procs.items():
            m = re.search(r"(worker \d+|frontend \S+|forkserver|supervisor)", cmd)
            role = m.group(1) if m else cmd[:40]
            if _age_s(pid) < SETTLE_S:
                continue
            s = _proc_sample(pid)
            if s is None:
                continue
            ser = self.series.setdefault((role, pid), Series(role, pid))
            ser.samples.append((now, *s))
            kinds = fd_table(pid)
            if kinds is not None:
                if ser.first_fds is None:
                    ser.first_fds = kinds
                ser.last_fds = kinds

    # -- the run -------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        t0 = time.monotonic()
        end = t0 + seconds
        due = {n: t0 + self.rng.expovariate(1 / e) for n, (_, e) in self.faults.items() if e > 0}
        next_sample = t0
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                self.sample()
                next_sample = now + SAMPLE_EVERY
            for cname, p in list(self.clients.items()):
                if p.poll() is not None:
                    # A client that died on its own is a finding (its traceback is in its
                    # error log, reported by _client_errors); start another so the run
                    # keeps its load.
                    self.client_deaths.append(f"client {cname} exited with {p.returncode}")
                    self.readers[cname].join(5)
                    self.start_client(cname)
            for name, when in list(due.items()):
                if now >= when:
                    fn, every = self.faults[name]
                    try:
                        fn()
                        self.injected[name] += 1
                    except Exception as e:          # a fault that could not be done is reported
                        self.fault_errors.append(f"{name}: {type(e).__name__}: {e}")
                    due[name] = time.monotonic() + self.rng.expovariate(1 / every)
            time.sleep(0.05)
        self.seconds += time.monotonic() - t0

    def finish(self) -> dict[str, Any]:
        for p in self.clients.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.clients.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                self.fault_errors.append(f"client {name} did not stop on SIGTERM")
            self.readers[name].join(10)
        time.sleep(2.0)                      # teardowns finish
        self.sample()
        assert self.d is not None
        self.shm_end = len(self.d.shm_left())
        return self.summary()

    def close(self, keep_log: str | None = None) -> None:
        if self.d is not None:
            self.d.stop()
            cleanup_stale(self.run_dir)
            if keep_log:
                shutil.copy(self.d.log_path, keep_log)
        for p in self.clients.values():
            if p.poll() is None:
                p.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- judging -------------------------------------------------------------------------
    def leaks(self) -> list[str]:
        out = []
        for ser in self.series.values():
            s = ser.samples
            if len(s) < 8:
                continue
            q = max(2, len(s) // 4)
            first, last = s[:q], s[-q:]
            fds0, fds1 = min(x[1] for x in first), min(x[1] for x in last)
            rss0, rss1 = min(x[2] for x in first), min(x[2] for x in last)
            # Threads: a file engine's pool grows and shrinks with demand (and starts
            # small again in a slot re-made after a front-end kill): only growth past the
            # first quarter's peak is a leak.
            th0, th1 = max(x[3] for x in first), min(x[3] for x in last)
            if fds1 > fds0 + 16:
                out.append(f"{ser.role} (pid {ser.pid}): fds {fds0} -> {fds1} (grew: {ser.fd_growth()})")
            if th1 > th0 + 4:
                out.append(f"{ser.role} (pid {ser.pid}): threads {th0} -> {th1}")
            if rss1 > rss0 * 1.25 + 32 * 1024:
                out.append(f"{ser.role} (pid {ser.pid}): RSS {rss0} -> {rss1} KiB")
        if self.shm_end > self.shm_start:
            out.append(f"/dev/shm objects {self.shm_start} -> {self.shm_end}")
        return out

    def summary(self) -> dict[str, Any]:
        tot: dict[str, int] = {}
        for per in self.totals.values():
            for k, v in per.items():
                tot[k] = tot.get(k, 0) + v
        assert self.d is not None
        log = self.d.log()
        return {"seconds": self.seconds, "clients": tot, "faults": dict(self.injected),
                "fault_errors": list(self.fault_errors), "leaks": self.leaks(),
                "series": len(self.series), "daemon_bug_lines": [
                    ln for ln in log.splitlines() if "Traceback" in ln or "internal error" in ln][:20],
                "worker_restarts": len(re.findall(r"worker \d+ \(core \d+, pid \d+\) died", log)),
                "frontend_restarts": len(re.findall(r"front-end of \S+ .* died", log)),
                "frontend_recovered": log.count("front-end recovered on the same connection"),
                "frontend_recovery_failed": log.count("recovery failed ("),
                "client_errors": self._client_errors(), "client_deaths": list(self.client_deaths)}

    def _client_errors(self) -> list[str]:
        out = []
        for path in self.errlogs:
            try:
                for line in open(path):
                    if line.startswith(("MISMATCH", "DOUBLED", "LOST", "ERROR")):
                        out.append(f"{os.path.basename(path)}: {line.strip()}")
                text = open(path).read()
                if "Traceback" in text:             # the whole story: the last frames
                    out.append(f"{os.path.basename(path)}: {text[text.index('Traceback'):][-1500:]}")
            except FileNotFoundError:
                pass
        return out[:40]

    def problems(self, s: dict[str, Any]) -> list[str]:
        c = s["clients"]
        out = []
        for k in ("mismatches", "lost", "doubled", "errors"):
            if c.get(k):
                out.append(f"{k}: {c[k]}")
        if self.cfg.worker_kill_transparent and c.get("cfs_resets"):
            out.append(f"cfs_resets: {c['cfs_resets']} (worker kills must be transparent)")
        if self.cfg.frontend_recovery and c.get("reconnects"):
            out.append(f"reconnects: {c['reconnects']} (a front-end kill must keep the connection)")
        out += [f"client died: {x}" for x in s["client_deaths"]]
        out += [f"leak: {x}" for x in s["leaks"]]
        out += [f"fault: {x}" for x in s["fault_errors"]]
        out += [f"daemon: {x}" for x in s["daemon_bug_lines"]]
        return out


def table(s: dict[str, Any]) -> str:
    c = s["clients"]
    rows = [("minutes run", f"{s['seconds'] / 60:.1f}"),
            ("commands submitted", c.get("submitted", 0)), ("commands completed", c.get("completed", 0)),
            ("verified reads / writes", f"{c.get('reads', 0)} / {c.get('writes', 0)}"),
            ("bytes verified", c.get("bytes_verified", 0)),
            ("mismatches", c.get("mismatches", 0)), ("lost", c.get("lost", 0)),
            ("doubled", c.get("doubled", 0)), ("unexpected error statuses", c.get("errors", 0)),
            ("retryable statuses (DNR clear)", c.get("retryable", 0)),
            ("aborted by reset/disconnect (spec)", c.get("aborted", 0)),
            ("DMA storms / transfer errors in them", f"{c.get('storms', 0)} / {c.get('storm_dte', 0)}"),
            ("CC.EN resets / DEVICE_RESETs", f"{c.get('cc_resets', 0)} / {c.get('device_resets', 0)}"),
            ("reconnects / sessions", f"{c.get('reconnects', 0)} / {c.get('sessions', 0)}"),
            ("controller-fatal resets", c.get("cfs_resets", 0))]
    rows += [(f"fault {k}", v) for k, v in sorted(s["faults"].items())]
    rows += [("worker / front-end restarts", f"{s['worker_restarts']} / {s['frontend_restarts']}"),
             ("front-ends recovered on the same connection", s.get("frontend_recovered", 0)),
             ("take-overs failed (tried again)", s.get("frontend_recovery_failed", 0)),
             ("process series sampled", s["series"]), ("leaks", len(s["leaks"])),
             ("fault errors", len(s["fault_errors"]))]
    w = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
