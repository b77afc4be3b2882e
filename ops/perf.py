"""vnvmed-perf: SPDK-perf-style load generator for an NVMe controller over vfio-user.

    python -m ops.perf -s SOCK -q 32 -o 4096 -w randread -t 5 [--target-pid PID]
    python -m ops.perf --spawn null:1G --target-core 0 -c 1 -q 32 -w randread

Either attaches to a running server's socket (`-s`), or spawns vnvmed itself
(`--spawn KIND:ARG`, pinned with --target-core) and stops it afterwards.  With a
target PID (given or spawned) it also reports the CPU time the target and each of its
descendant processes used during the measured interval (utime + stime from
/proc/PID/stat), so efficiency is visible, not just speed.

Output: a table on stdout, and JSON with --json (stdout) or --json-out FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops.perfdrv import Controller, QueueJob, Result, Workload  # noqa: E402
from ops import subproc  # noqa: E402

# The daemon this interpreter has: the installed one, or this checkout's when run from it
# (never a path into a checkout: an installed vnvmed-perf has none).
VNVMED = [sys.executable, "-m", "ops.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATTERNS = ("randread", "randwrite", "read", "write", "randrw", "rw")


# ------------------------------------------------------------------------ CPU accounting
def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, utime+stime ticks, comm) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    lp, rp = raw.find("("), raw.rfind(")")
    fields = raw[rp + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), raw[lp + 1:rp]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (cpu ticks, name) for root and all its descendants."""
    info: dict[int, tuple[int, int, str]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                info[int(d)] = st
    out: dict[int, tuple[int, str]] = {}
    todo = [root]
    while todo:
        p = todo.pop()
        if p in info and p not in out:
            out[p] = (info[p][1], _cmdline(p)[:48] or info[p][2])
            todo.extend(c for c, v in info.items() if v[0] == p)
    return out


def cpu_delta(before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]],
              seconds: float) -> list[dict[str, Any]]:
    rows = []
    for pid, (ticks, name) in sorted(after.items()):
        used = (ticks - before.get(pid, (0, ""))[0]) / CLK_TCK
        rows.append({"pid": pid, "name": name, "cpu_s": round(used, 3),
                     "cpu_pct": round(100.0 * used / seconds, 1) if seconds else 0.0})
    return rows


# ------------------------------------------------------------------------ the target
@dataclass
class Spawned:
    proc: subprocess.Popen[bytes]
    sock: str
    tmp: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        subproc.stop(self.proc, 10)
        self.tmp.cleanup()


def spawn_vnvmed(ns: str, core: int | None, polling: str = "adaptive",
                 extra: Sequence[str] = (), sock_name: str = "nvme0.sock") -> Spawned:
    """vnvmed (VNVMED) with one controller nvme0 (socket TMP/sock_name; SPDK's vfio-user
    client wants DIR/cntrl), pinned to `core` with its worker."""
    tmp = tempfile.TemporaryDirectory(prefix="vnvmed-perf-")
    sock = os.path.join(tmp.name, sock_name)
    env = dict(os.environ, VNVMED_RUN_DIR=tmp.name)
    cmd = [*VNVMED, "--cores", str(core if core is not None else 0),
           "--controller", f"nvme0={sock}", "--namespace", f"nvme0={ns}", "--polling", polling,
           "--log-level", "warning", *extra]
    pre = ["taskset", "-c", str(core)] if core is not None else []
    log = open(os.path.join(tmp.name, "vnvmed.log"), "wb")
    proc = subprocess.Popen(pre + cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(os.path.join(tmp.name, "vnvmed.log")) as f:
                text = f.read()
            Spawned(proc, sock, tmp).stop()
            raise RuntimeError(f"vnvmed did not come up:\n{text}")
        time.sleep(0.02)
    time.sleep(0.2)   # workers attach after the socket appears
    return Spawned(proc, sock, tmp)


# ------------------------------------------------------------------------ one run
def run(sock: str, wl: Workload, *, processes: int = 1, queues: int | None = None,
        client_cores: Sequence[int] = (), target_pid: int | None = None,
        ram_size: int | None = None, idle: bool = False, dirty_log: bool = False) -> dict[str, Any]:
    nq = queues or processes
    if nq != processes:
        raise ValueError("this driver runs exactly one queue per client process (-Q == -P)")
    per_q = wl.entries() * 80 + (wl.depth + 1) * ((wl.io_size + 4096) + 4096)
    ctl = Controller(sock, ram_size or max(16 << 20, nq * per_q + (4 << 20)))
    try:
        ctl.enable()
        nblocks, bsize = ctl.namespace(wl.nsid)
        got = ctl.set_queue_count(nq)
        if got < nq:
            raise RuntimeError(f"controller grants only {got} I/O queues")
        if processes > 1 and ctl.trapped:
            raise RuntimeError("several client processes need mmapped doorbells")
        irq = wl.wait == "irq"     # the CQ signals its MSI-X eventfd; the client sleeps on it
        jobs = [QueueJob(ctl, ctl.create_queue(i + 1, wl.depth, wl.entries(), irq=irq), wl, bsize, nblocks, i)
                for i in range(nq)]
        mig = None
        if dirty_log:
            # What a migration's pre-copy costs the guest: the device marks every page it
            # writes (read data, CQEs) while the client runs; one report at the end.
            from vfio_user.migdriver import V2Driver
            mig = V2Driver(ctl.c)
            mig.log_start(4096)
        before = process_tree(target_pid) if target_pid else {}
        t0 = time.monotonic()
        deadline = time.perf_counter_ns() + int(wl.seconds * 1e9)
        total = Result(hist=[])
        if idle:     # controller enabled, queues created, no I/O: what does waiting cost?
            time.sleep(wl.seconds)
            total.seconds = wl.seconds
        elif processes == 1:
            if client_cores:
                os.sched_setaffinity(0, {client_cores[0]})
            total.merge(jobs[0].run(deadline))
        else:
            total = _run_forked(jobs, deadline, client_cores)
        wall = time.monotonic() - t0
        after = process_tree(target_pid) if target_pid else {}
        dirty_pages = None
        if mig is not None:
            bm = mig.log_report(ctl.ram.base, ctl.ram.size)
            dirty_pages = bin(int.from_bytes(bm, "little")).count("1")
            mig.log_stop()
        ctl.disable()
    finally:
        ctl.close()
    rep = report(wl, total, processes, nq, cpu_delta(before, after, wall) if target_pid else [])
    if dirty_log:
        rep["dirty_log"] = {"pages_reported": dirty_pages}
    return rep


def _run_forked(jobs: list[QueueJob], deadline: int, cores: Sequence[int]) -> Result:
    kids: list[tuple[int, int]] = []
    for i, job in enumerate(jobs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # child: run one queue, send the result, leave without cleanup
            code = 0
            try:
                os.close(r)
                if cores:
                    os.sched_setaffinity(0, {cores[i % len(cores)]})
                data = json.dumps(job.run(deadline).to_wire()).encode()
                with os.fdopen(w, "wb") as f:
                    f.write(data)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        kids.append((pid, r))
    total = Result(hist=[])
    failed = 0
    for pid, r in kids:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if status or not data:
            failed += 1
            continue
        total.merge(Result.from_wire(json.loads(data)))
    if failed:
        raise RuntimeError(f"{failed} client process(es) failed")
    return total


def report(wl: Workload, r: Result, processes: int, queues: int,
           cpu: list[dict[str, Any]]) -> dict[str, Any]:
    secs = r.seconds or 1e-9
    return {
        "workload": {"pattern": wl.pattern, "io_size": wl.io_size, "depth": wl.depth,
                     "seconds": wl.seconds, "read_pct": wl.read_pct,
                     "processes": processes, "queues": queues, "sq_doorbells": wl.doorbells,
                     "queue_entries": wl.entries()},
        "ios": r.ios, "errors": r.errors, "elapsed_s": round(secs, 3),
        "iops": round(r.ios / secs),
        "mib_s": round(r.ios * wl.io_size / secs / (1 << 20), 1),
        "lat_us": {"mean": round(r.lat_sum_ns / r.ios / 1000, 2) if r.ios else 0.0,
                   "p50": round(r.percentile_us(50), 2), "p99": round(r.percentile_us(99), 2),
                   "p99.9": round(r.percentile_us(99.9), 2)},
        "target_cpu": cpu,
    }


def format_table(rep: dict[str, Any]) -> str:
    w = rep["workload"]
    lat = rep["lat_us"]
    lines = [
        f"{w['pattern']} {w['io_size']}B qd={w['depth']} queues={w['queues']} procs={w['processes']}"
        f" sq-doorbells={w.get('sq_doorbells', 'batch')}"
        f"{' dirty-log=on' if 'dirty_log' in rep else ''}"
        f" t={rep['elapsed_s']}s",
        f"{'IOPS':>12} {'MiB/s':>10} {'mean us':>9} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'errors':>7}",
        f"{rep['iops']:>12,} {rep['mib_s']:>10,.1f} {lat['mean']:>9.2f} {_us(lat, 'p50'):>8}"
        f" {_us(lat, 'p99'):>8} {_us(lat, 'p99.9'):>9} {rep['errors']:>7}",
    ]
    if rep["target_cpu"]:
        lines.append(f"  target CPU: {'pid':>7} {'cpu s':>7} {'% core':>7}  process")
        for row in rep["target_cpu"]:
            lines.append(f"              {row['pid']:>7} {row['cpu_s']:>7.2f} {row['cpu_pct']:>7.1f}  {row['name']}")
    return "\n".join(lines)


def _us(lat: dict[str, Any], key: str) -> str:
    """A latency figure, or '-' where the client does not report it (spdk_nvme_perf)."""
    v = lat.get(key)
    return "-" if v is None else f"{v:.2f}"


def parse_cores(text: str | None) -> list[int]:
    out: list[int] = []
    for part in (text or "").split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vnvmed-perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-s", "--socket", help="vfio-user socket of a running server")
    g.add_argument("--spawn", metavar="KIND:ARG", help="start vnvmed with this namespace")
    p.add_argument("-q", "--depth", type=int, default=32, help="queue depth per queue")
    p.add_argument("-o", "--io-size", type=int, default=4096, help="bytes per I/O")
    p.add_argument("-w", "--pattern", choices=PATTERNS, default="randread")
    p.add_argument("-M", "--mix", type=int, default=50, help="read %% for randrw/rw")
    p.add_argument("-t", "--time", type=float, default=5.0, help="seconds")
    p.add_argument("-P", "--processes", type=int, default=1, help="client processes")
    p.add_argument("-Q", "--queues", type=int, default=None, help="I/O queues (one per process)")
    p.add_argument("-c", "--client-cores", help="pin client processes, e.g. 1 or 0-1")
    p.add_argument("--target-core", type=int, default=None, help="core for a spawned vnvmed")
    p.add_argument("--target-pid", type=int, help="account CPU of this process tree")
    p.add_argument("--polling", choices=("adaptive", "busy"), default="adaptive")
    p.add_argument("--datapath", choices=("python", "native"),
                   help="data path of a spawned vnvmed (default: its own default)")
    p.add_argument("--doorbells", choices=("mmap", "trapped"), default="mmap",
                   help="doorbell mode of a spawned vnvmed (trapped: every write is a message)")
    p.add_argument("--sq-doorbells", choices=("batch", "per-cmd"), default="batch",
                   help="client access pattern: one SQ tail write per reaped batch, or one per "
                        "command as Linux/SPDK drivers do (CQ head: once per batch either way)")
    p.add_argument("--queue-entries", type=int, default=0,
                   help="entries per I/O queue (default: depth+1 with batch doorbells, 256 with per-cmd)")
    p.add_argument("--span", default="1G", help="bytes of the namespace to spread I/O over")
    p.add_argument("--nsid", type=int, default=1)
    p.add_argument("--idle", action="store_true", help="attach and create queues, then no I/O for -t s")
    p.add_argument("--dirty-log", action="store_true",
                   help="dirty-page logging on during the run (v2 DMA_LOGGING_START; one REPORT "
                        "at the end): compare with a run without to see what logging costs")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--json-out", help="also write JSON to this file")
    a = p.parse_args(argv)
    from backends.base import parse_size
    wl = Workload(a.pattern, a.io_size, a.depth, a.time, a.mix, a.nsid, parse_size(a.span),
                  doorbells=a.sq_doorbells, queue_entries=a.queue_entries)
    extra = ["--doorbells", f"nvme0={a.doorbells}"] if a.doorbells != "mmap" else []
    if a.datapath:
        extra += ["--datapath", a.datapath]
    spawned = spawn_vnvmed(a.spawn, a.target_core, a.polling, extra) if a.spawn else None
    try:
        sock = spawned.sock if spawned else a.socket
        pid = spawned.proc.pid if spawned else a.target_pid
        rep = run(sock, wl, processes=a.processes, queues=a.queues,
                  client_cores=parse_cores(a.client_cores), target_pid=pid, idle=a.idle,
                  dirty_log=a.dirty_log)
    finally:
        if spawned:
            spawned.stop()
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rep, f, indent=1)
    print(json.dumps(rep, indent=1) if a.json else format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
