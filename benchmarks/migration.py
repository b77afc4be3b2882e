"""Live migration figures: blackout (median/p99/max, and per step), snapshot size.

    python -m benchmarks.migration --rounds 100 [--scheme v2|v1|both] [--no-precopy]
           [--no-dirty-log] [--log-stop-inside] [--queues 4] [--qd 32] [--worst 3] [--json]

Two vnvmed daemons (as two hosts) share a file namespace; a guest with `--queues` I/O
queues at `--qd` of verified random 4 KiB I/O is migrated back and forth `--rounds`
times by the project's client acting as QEMU would (tests/migrig.py).  Blackout is
measured from sending the stop arc to the source until the destination's RUNNING
reply, with the guest's vCPUs stopped meanwhile (the load pauses); it includes the
final dirty-bitmap report on the source and the device data transfer; stopping dirty
logging comes after the destination runs, as in QEMU's migration cleanup
(`--log-stop-inside` measures it the rig's pre-2026-12-06 way).  The I/O is
verified throughout: the run fails loudly if a command completed twice, not at all,
or returned wrong data.  Prints the machine's load average before and after: on the
shared 2-core test machine other jobs inflate the tail.

Phase breakdown: the client, both front-ends and their workers stamp the moments they
see with CLOCK_MONOTONIC (migration/trace.py; the daemons' marks come from
`controller.list` -> migration.trace after each round).  Merged on one time line, each
gap between consecutive marks is charged to the mark that ends it ("src w0 quiesce rx"
= the source's worker 0 read the QUIESCE: the gap before it is the hop to that
worker); the table gives each phase's median / p99 per migration and its share of
the slowest rounds, and `--worst N` prints the N slowest rounds' time lines.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from migration.trace import format_phases, merge, phases, window  # noqa: E402
from ops.ctl import RpcClient  # noqa: E402
from tests.migrig import Figures, Guest, migrate, percentile, start_hosts, stop_hosts  # noqa: E402

# Marks after the RUNNING reply that still belong to the migration (the destination
# workers' first poll): kept if within this many ns of it.
AFTER_NS = 50_000_000


def _migration_info(rpc: str) -> dict[str, Any]:
    with RpcClient(rpc, timeout=30) as c:
        recs = c.call("controller.list")
    rec = next(r for r in recs if r["name"] == "nvme0")
    return rec.get("migration") or {}


def _daemon_marks(rpc: str) -> list:
    return _migration_info(rpc).get("trace") or []


def _drained(rpc: str) -> tuple[int, int]:
    """Commands the source's workers had in flight at the stop arc's QUIESCE (they finish
    them inside the blackout), and how many of those had not started on the backend."""
    info = _migration_info(rpc)
    return (sum((info.get("quiesce_inflight") or {}).values()),
            sum((info.get("quiesce_waiting") or {}).values()))


def timeline(f: Figures, src_rpc: str, dst_rpc: str) -> list[tuple[str, int]]:
    """The round's marks from the client and both daemons, on one time line."""
    t0, t1 = f.marks[0][1], f.marks[-1][1]
    return merge(f.marks, window(_daemon_marks(src_rpc), t0, t1 + AFTER_NS, "src "),
                 window(_daemon_marks(dst_rpc), t0, t1 + AFTER_NS, "dst "))


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2), "min": round(min(values), 2)}


def run(rounds: int, schemes: Sequence[str], precopy: bool, dirty_log: bool, queues: int,
        qd: int, worst: int = 3, log_stop_inside: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()
    daemons, img = start_hosts(2)
    a, b = daemons
    g = Guest.boot(a, nqueues=queues, qd=qd)
    load = g.load
    assert load is not None
    figs = []
    lines: list[list[tuple[str, int]]] = []
    drained: list[tuple[int, int]] = []
    try:
        load.start()
        load.wait_completions(500)
        for i in range(rounds):
            src = g.daemon
            assert src is not None
            dst = b if src is a else a
            f = migrate(g, dst, schemes[i % len(schemes)], precopy=precopy,
                        dirty_log=dirty_log, check_regs=False, log_stop_inside=log_stop_inside)
            figs.append(f)
            lines.append(timeline(f, src.rpc, dst.rpc))
            drained.append(_drained(src.rpc))
            load.wait_completions(100)
        load.stop()
        summary = load.summary()
        if load.errors:
            raise SystemExit(f"verification failed: {load.errors[:5]}")
    finally:
        g.close()
        stop_hosts(daemons, img)
    out: dict[str, Any] = {"rounds": rounds, "queues": queues, "qd": qd, "precopy": precopy,
                           "dirty_log": dirty_log, "log_stop_inside": log_stop_inside, "io": summary,
                           "loadavg_before": [round(x, 2) for x in load_before],
                           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "schemes": {}}
    for sc in schemes:
        fs = [f for f in figs if f.scheme == sc]
        steps: dict[str, list[float]] = {}
        for f in fs:
            for k, v in f.steps.items():
                steps.setdefault(k, []).append(v)
        out["schemes"][sc] = {
            "n": len(fs), "blackout_ms": _stats([f.blackout_ms for f in fs]),
            "snapshot_bytes": max(f.stream_bytes for f in fs),
            "precopy_bytes": max(f.precopy_bytes for f in fs),
            "steps_ms": {k: _stats(v) for k, v in steps.items()},
            "phases_ms": phase_stats([f for f in figs if f.scheme == sc],
                                     [ln for f, ln in zip(figs, lines) if f.scheme == sc])}
    all_b = [f.blackout_ms for f in figs]
    out["blackout_ms"] = _stats(all_b)
    out["drained"] = _stats([float(n) for n, _ in drained]) if drained else None
    out["drained_waiting"] = _stats([float(w) for _, w in drained]) if drained else None
    order = sorted(range(len(figs)), key=lambda i: -figs[i].blackout_ms)
    out["worst"] = [{"round": i, "scheme": figs[i].scheme, "blackout_ms": round(figs[i].blackout_ms, 2),
                     "timeline": [[n, t] for n, t in lines[i]]} for i in order[:max(worst, 0)]]
    return out


def _label(name: str) -> str:
    """Phase label: the mark's name, worker numbers and the client's step kept."""
    return name


def phase_stats(figs: list[Figures], lines: list[list[tuple[str, int]]]) -> dict[str, dict[str, float]]:
    """Per phase (the mark ending a gap): ms per migration (summed when a mark repeats
    in a round) as median / p99 / max, and its share of the slowest 5 % of rounds."""
    per: dict[str, list[float]] = {}
    order: dict[str, float] = {}
    n = len(figs)
    cut = sorted(f.blackout_ms for f in figs)[max(0, int(n * 0.95) - 1)] if n else 0.0
    tail: dict[str, float] = {}
    tail_total = 0.0
    for f, line in zip(figs, lines):
        sums: dict[str, float] = {}
        t0 = line[0][1] if line else 0
        for (name, dt), (_, t) in zip(phases(line), line[1:]):
            lab = _label(name)
            sums[lab] = sums.get(lab, 0.0) + dt
            order.setdefault(lab, (t - t0) / 1e6)
        for lab in sums:
            per.setdefault(lab, [])
        for lab, v in sums.items():
            per[lab].append(v)
        if f.blackout_ms >= cut:
            for lab, v in sums.items():
                tail[lab] = tail.get(lab, 0.0) + v
            tail_total += f.blackout_ms
    out = {}
    for lab in sorted(per, key=lambda k: order[k]):
        vals = per[lab] + [0.0] * (n - len(per[lab]))        # absent in a round: 0 ms
        out[lab] = {"median": round(statistics.median(vals), 3), "p99": round(percentile(vals, 99), 3),
                    "max": round(max(vals), 3),
                    "tail_share": round(tail.get(lab, 0.0) / tail_total, 3) if tail_total else 0.0}
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"{r['rounds']} migrations, {r['queues']} queues x QD {r['qd']}, pre-copy "
             f"{'on' if r['precopy'] else 'off'}, dirty log {'on' if r['dirty_log'] else 'off'}; "
             f"{r['io']['completed']} commands verified, 0 errors",
             f"load average before {r['loadavg_before']}, after {r['loadavg_after']}",
             f"{'scheme':>6} {'n':>4} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} {'snapshot B':>11}"]
    for sc, s in r["schemes"].items():
        b = s["blackout_ms"]
        lines.append(f"{sc:>6} {s['n']:>4} {b['median']:>10.2f} {b['p99']:>8.2f} {b['max']:>8.2f}"
                     f" {s['snapshot_bytes']:>11}")
    b = r["blackout_ms"]
    lines.append(f"{'all':>6} {r['rounds']:>4} {b['median']:>10.2f} {b['p99']:>8.2f} {b['max']:>8.2f}")
    for sc, s in r["schemes"].items():
        lines.append(f"  {sc} steps (median / p99 ms): " + ", ".join(
            f"{k} {v['median']:.2f}/{v['p99']:.2f}" for k, v in s["steps_ms"].items()))
    if r.get("drained"):
        d = r["drained"]
        w = r["drained_waiting"]
        lines.append(f"commands in flight at the source's QUIESCE (drained in the blackout): "
                     f"median {d['median']:.0f}, max {d['max']:.0f}; of them not yet started on "
                     f"the backend: median {w['median']:.0f}, max {w['max']:.0f}")
    for sc, s in r["schemes"].items():
        lines.append(f"{sc} phases (gap ending at the mark; ms per migration; share of the slowest 5 %):")
        lines.append(f"  {'median':>7} {'p99':>7} {'max':>7} {'tail%':>6}  mark")
        for k, v in s["phases_ms"].items():
            lines.append(f"  {v['median']:7.3f} {v['p99']:7.3f} {v['max']:7.3f} {v['tail_share'] * 100:6.1f}  {k}")
    for w in r["worst"]:
        lines.append(f"slow round {w['round']} ({w['scheme']}, {w['blackout_ms']:.2f} ms):")
        lines.append(format_phases([(n, t) for n, t in w["timeline"]]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.migration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--scheme", choices=("v2", "v1", "both"), default="both")
    p.add_argument("--no-precopy", action="store_true")
    p.add_argument("--no-dirty-log", action="store_true")
    p.add_argument("--queues", type=int, default=4)
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--log-stop-inside", action="store_true",
                   help="stop dirty logging inside the blackout (this rig before 2026-12-06; "
                        "QEMU stops it in its cleanup, after the destination runs)")
    p.add_argument("--worst", type=int, default=3, help="print the N slowest rounds' time lines")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    schemes = ("v2", "v1") if a.scheme == "both" else (a.scheme,)
    t0 = time.monotonic()
    r = run(a.rounds, schemes, not a.no_precopy, not a.no_dirty_log, a.queues, a.qd, a.worst,
            a.log_stop_inside)
    r["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(r, indent=1) if a.json else table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
