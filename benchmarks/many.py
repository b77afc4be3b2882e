"""Many controllers: what each one costs, and whether they share the workers fairly.

    python -m benchmarks.many                        # 1, 16 and 64 controllers, table
    python -m benchmarks.many -n 64 --idle 10 --attach --json-out /tmp/many.json
    python -m benchmarks.many -n 16 --fair 16 -t 5   # 16 controllers doing I/O at once

For every controller count it starts `bin/vnvmed --cores 0-1` (the whole machine) with N
controllers, each with a null namespace, and reports:

* start-up: seconds from exec to the `ready` log line;
* memory: PSS and RSS (/proc/PID/smaps_rollup) per process kind (front-end, worker,
  supervisor, forkserver, ...), the front-ends' mean and max PSS, and the whole daemon's
  PSS divided by N (PSS splits every shared page among the processes mapping it, so the
  per-process figures add up to what the daemon really costs);
* idle CPU: CPU time (/proc/PID/schedstat, ns) and wake-ups (context switches) of every
  process over --idle seconds with no guest attached, as % of one core;
* with --attach: the same again while one client per controller has it enabled with an
  I/O queue pair and does nothing (a booted, idle VM), after the daemon's pollers have
  reached deep idle;
* with --attach --wake K: the first I/O after a pause: K times, a 4 KiB read on one
  controller (a different one each time) after --pause seconds without any I/O (the
  workers in deep idle), submission to completion seen by the client polling its CQ -
  bounded by the deep-idle sleep (40 ms);
* with --fair K: K client processes (one per controller) run 4 KiB randread QD --depth
  with per-command doorbells for -t seconds at once, each sleeping on its CQ's
  interrupt (eventfd) when nothing has completed, as a guest does; IOPS per controller,
  min/mean and max/mean (target: nobody below 0.5x the mean).  Clients are not pinned:
  they share the two cores with the daemon, as VMs would.

Figures only mean something next to the machine's load (printed with every run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops.perf import VNVMED, process_tree  # noqa: E402
from ops.perfdrv import Controller, QueueJob, Workload  # noqa: E402
from ops import subproc  # noqa: E402

MiB = 1024.0
PAGE = 4096


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def kind_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for word in ("frontend", "worker", "forkserver", "resource_tracker"):
        if word in name:
            return word
    return "supervisor" if "bin/vnvmed" in name else name[:24]


class Daemon:
    def __init__(self, n: int, cores: str, extra: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vnvmed-many-")
        self.socks = [os.path.join(self.tmp.name, f"c{i}.sock") for i in range(n)]
        args = [*VNVMED, "--cores", cores,
                "--log-level", "info", *extra]
        for i, s in enumerate(self.socks):
            args += ["--controller", f"c{i}={s}", "--namespace", f"c{i}=null:1G"]
        self.log = os.path.join(self.tmp.name, "vnvmed.log")
        with open(self.log, "wb") as f:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, VNVMED_RUN_DIR=self.tmp.name))
        deadline = t0 + 300
        while True:
            with open(self.log, "rb") as f:
                if b"vnvmed ready" in f.read():
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log) as f:
                    text = f.read()
                self.stop()
                raise RuntimeError(f"vnvmed did not come up:\n{text[-3000:]}")
            time.sleep(0.005)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        subproc.stop(self.proc, 30)
        self.tmp.cleanup()


def smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    out[parts[0].rstrip(":")] = int(parts[1])     # kB
    except OSError:
        pass
    return out


def memory(root: int, n: int) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {}
    fronts: list[int] = []
    total = 0
    for pid in process_tree(root):
        m = smaps(pid)
        k = kinds.setdefault(kind_of(pid), {"n": 0, "pss_kb": 0, "rss_kb": 0})
        k["n"] += 1
        k["pss_kb"] += m.get("Pss", 0)
        k["rss_kb"] += m.get("Rss", 0)
        total += m.get("Pss", 0)
        if kind_of(pid) == "frontend":
            fronts.append(m.get("Pss", 0))
    return {"kinds": kinds, "daemon_pss_mib": round(total / MiB, 1),
            "daemon_pss_per_controller_mib": round(total / MiB / n, 2),
            "frontend_pss_mean_mib": round(sum(fronts) / len(fronts) / MiB, 2) if fronts else 0,
            "frontend_pss_max_mib": round(max(fronts) / MiB, 2) if fronts else 0}


def _sched(pid: int) -> tuple[int, int]:
    """(CPU ns, context switches) of a process (all its threads' main one is enough here)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ns = int(f.read().split()[0])
        with open(f"/proc/{pid}/status") as f:
            cs = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        return ns, cs
    except (OSError, ValueError, IndexError):
        return 0, 0


def idle_cpu(root: int, seconds: float) -> dict[str, Any]:
    tree = process_tree(root)
    before = {pid: _sched(pid) for pid in tree}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    kinds: dict[str, dict[str, Any]] = {}
    total = 0
    for pid in tree:
        ns, cs = _sched(pid)
        d_ns, d_cs = ns - before[pid][0], cs - before[pid][1]
        k = kinds.setdefault(kind_of(pid), {"n": 0, "cpu_pct": 0.0, "wakeups_s": 0.0})
        k["n"] += 1
        k["cpu_pct"] += 100.0 * d_ns / 1e9 / wall
        k["wakeups_s"] += d_cs / wall
        total += d_ns
    for k in kinds.values():
        k["cpu_pct"] = round(k["cpu_pct"], 3)
        k["wakeups_s"] = round(k["wakeups_s"], 1)
    return {"seconds": round(wall, 2), "daemon_cpu_pct": round(100.0 * total / 1e9 / wall, 3),
            "kinds": kinds}


def attach_all(socks: list[str]) -> list[Controller]:
    """One idle 'guest' per controller: enabled, one I/O queue pair, no I/O."""
    ctls = []
    for s in socks:
        c = Controller(s, 1 << 20)
        ctls.append(c)
        c.enable()
        c.set_queue_count(1)
        c.create_queue(1, 8)
    return ctls


def wake_latency(ctls: list[Controller], k: int, pause: float) -> dict[str, Any]:
    """ms from one read's doorbell to its completion, each after `pause` s of no I/O."""
    lat = []
    for i in range(k):
        c = ctls[(i * 7) % len(ctls)]
        q = c.queues[0]
        buf = c.ram.alloc(PAGE)
        time.sleep(pause)
        cid = i & 0xFFFF
        c.ram.view(q.sq + q.tail * 64, 64)[:] = struct.pack(
            "<BBHIQQQQ6I", 0x02, 0, cid, 1, 0, 0, buf, 0, 0, 0, 0, 0, 0, 0)
        q.tail = (q.tail + 1) % q.size
        cq = c.ram.view(q.cq, q.size * 16).cast("I")
        t0 = time.perf_counter_ns()
        c.ring(2 * q.qid, q.tail)
        while (cq[q.head * 4 + 3] >> 16) & 1 != q.phase:
            if time.perf_counter_ns() - t0 > 5e9:
                raise TimeoutError("no completion in 5 s")
        lat.append((time.perf_counter_ns() - t0) / 1e6)
        cq.release()
        q.head += 1
        if q.head == q.size:
            q.head, q.phase = 0, q.phase ^ 1
        c.ring(2 * q.qid + 1, q.head)
    return {"samples": k, "pause_s": pause, "ms": [round(x, 2) for x in lat],
            "median_ms": round(statistics.median(lat), 2), "max_ms": round(max(lat), 2)}


def _client(sock: str, wl: Workload, start_r: int, out_w: int) -> None:
    code = 0
    try:
        ctl = Controller(sock, 8 << 20)
        ctl.enable()
        nblocks, bs = ctl.namespace(1)
        ctl.set_queue_count(1)
        job = QueueJob(ctl, ctl.create_queue(1, wl.depth, wl.entries(), irq=wl.wait == "irq"), wl, bs,
                       nblocks, 0)
        os.write(out_w, b"r")
        deadline = int.from_bytes(os.read(start_r, 8), "little")
        res = job.run(deadline)
        os.write(out_w, json.dumps({"ios": res.ios, "errors": res.errors,
                                    "seconds": res.seconds}).encode())
        ctl.disable()
        ctl.close()
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    os._exit(code)


def fairness(socks: list[str], k: int, seconds: float, depth: int) -> dict[str, Any]:
    # Clients sleep on their CQ's interrupt like a guest (16 spinning clients on 2 cores
    # would starve the workers and measure the scheduler, not the daemon).
    wl = Workload("randread", 4096, depth, seconds, doorbells="per-cmd", wait="irq")
    kids = []
    for sock in socks[:k]:
        start_r, start_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(start_w)
            os.close(out_r)
            _client(sock, wl, start_r, out_w)
        os.close(start_r)
        os.close(out_w)
        kids.append((pid, start_w, out_r))
    for _, _, out_r in kids:
        if os.read(out_r, 1) != b"r":
            raise RuntimeError("a client failed to set up")
    deadline = time.perf_counter_ns() + int(0.2e9) + int(seconds * 1e9)
    # The same deadline for all (CLOCK_MONOTONIC is system-wide); 0.2 s to get going.
    for _, start_w, _ in kids:
        os.write(start_w, deadline.to_bytes(8, "little"))
    iops: list[float] = []
    errors = 0
    for pid, start_w, out_r in kids:
        data = b""
        while True:
            chunk = os.read(out_r, 4096)
            if not chunk:
                break
            data += chunk
        os.waitpid(pid, 0)
        os.close(start_w)
        os.close(out_r)
        r = json.loads(data)
        errors += r["errors"]
        iops.append(r["ios"] / r["seconds"] if r["seconds"] else 0.0)
    mean = sum(iops) / len(iops)
    return {"controllers": k, "depth": depth, "seconds": seconds, "errors": errors,
            "iops": [round(x) for x in iops], "total_iops": round(sum(iops)),
            "min_over_mean": round(min(iops) / mean, 3) if mean else 0.0,
            "max_over_mean": round(max(iops) / mean, 3) if mean else 0.0}


def one(n: int, a: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"controllers": n, "load_before": loadavg()}
    d = Daemon(n, a.cores, a.extra.split() if a.extra else [])
    try:
        row["startup_s"] = round(d.startup_s, 2)
        time.sleep(a.settle)
        row["memory_no_guest"] = memory(d.proc.pid, n)
        row["idle_no_guest"] = idle_cpu(d.proc.pid, a.idle)
        if a.attach:
            ctls = attach_all(d.socks)
            try:
                time.sleep(a.settle)
                row["memory_guest"] = memory(d.proc.pid, n)
                row["idle_guest"] = idle_cpu(d.proc.pid, a.idle)
                if a.wake:
                    row["wake"] = wake_latency(ctls, a.wake, a.pause)
            finally:
                for c in ctls:
                    c.disable()
                    c.close()
        if a.fair:
            row["fairness"] = fairness(d.socks, min(a.fair, n), a.time, a.depth)
    finally:
        d.stop()
    row["load_after"] = loadavg()
    return row


def print_row(r: dict[str, Any]) -> None:
    m, i = r["memory_no_guest"], r["idle_no_guest"]
    print(f"\n== {r['controllers']} controller(s)  (load {r['load_before']} -> {r['load_after']})")
    print(f"start-up to 'ready': {r['startup_s']} s")
    print(f"PSS: front-end mean {m['frontend_pss_mean_mib']} MiB, max {m['frontend_pss_max_mib']} MiB;"
          f" whole daemon {m['daemon_pss_mib']} MiB = {m['daemon_pss_per_controller_mib']} MiB per controller")
    print(f"{'process':18} {'n':>3} {'PSS MiB':>8} {'RSS MiB':>8} {'idle %core':>10} {'wake/s':>7}")
    for k, v in sorted(m["kinds"].items()):
        c = i["kinds"].get(k, {})
        print(f"{k:18} {v['n']:>3} {v['pss_kb'] / MiB:>8.1f} {v['rss_kb'] / MiB:>8.1f}"
              f" {c.get('cpu_pct', 0):>10.3f} {c.get('wakeups_s', 0):>7.1f}")
    print(f"idle, no guest: daemon {i['daemon_cpu_pct']} % of a core over {i['seconds']} s")
    if "idle_guest" in r:
        g, mg = r["idle_guest"], r["memory_guest"]
        parts = ", ".join(f"{k} {v['cpu_pct']:.3f} % ({v['wakeups_s']}/s)" for k, v in sorted(g["kinds"].items()))
        print(f"idle, guests attached (enabled, 1 queue pair each): daemon {g['daemon_cpu_pct']} % of a core"
              f" [{parts}]; front-end PSS mean {mg['frontend_pss_mean_mib']} MiB,"
              f" daemon {mg['daemon_pss_per_controller_mib']} MiB per controller")
    if "wake" in r:
        w = r["wake"]
        print(f"first I/O after {w['pause_s']} s idle (x{w['samples']}): median {w['median_ms']} ms,"
              f" max {w['max_ms']} ms  {w['ms']}")
    if "fairness" in r:
        f = r["fairness"]
        print(f"fairness, {f['controllers']} controllers 4 KiB randread QD{f['depth']} per-cmd doorbells:"
              f" total {f['total_iops']:,} IOPS, min/mean {f['min_over_mean']}, max/mean {f['max_over_mean']},"
              f" errors {f['errors']}")
        print(f"  per controller: {f['iops']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--controllers", default="1,16,64", help="controller counts, comma separated")
    p.add_argument("--cores", default="0-1", help="--cores of the daemon")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before measuring (deep idle)")
    p.add_argument("--attach", action="store_true", help="also measure with an idle guest per controller")
    p.add_argument("--wake", type=int, default=0, help="with --attach: first-I/O-after-idle samples")
    p.add_argument("--pause", type=float, default=1.5, help="seconds without I/O before each --wake sample")
    p.add_argument("--fair", type=int, default=0, help="controllers doing I/O at once (0: no fairness run)")
    p.add_argument("-t", "--time", type=float, default=5.0, help="seconds of the fairness run")
    p.add_argument("-q", "--depth", type=int, default=8, help="queue depth per controller in the fairness run")
    p.add_argument("--extra", default="", help="extra vnvmed arguments (one string)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    rows = []
    for n in [int(x) for x in a.controllers.split(",")]:
        r = one(n, a)
        print_row(r)
        rows.append(r)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"nproc": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
