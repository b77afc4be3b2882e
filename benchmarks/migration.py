"""Live migration figures: blackout (median/p99/max, and per step), snapshot size.

    python -m benchmarks.migration --rounds 100 [--scheme v2|v1|both] [--no-precopy]
           [--no-dirty-log] [--queues 4] [--qd 32] [--json]

Two vnvmed daemons (as two hosts) share a file namespace; a guest with `--queues` I/O
queues at `--qd` of verified random 4 KiB I/O is migrated back and forth `--rounds`
times by the project's client acting as QEMU would (tests/migrig.py).  Blackout is
measured from sending the stop arc to the source until the destination's RUNNING
reply, with the guest's vCPUs stopped meanwhile (the load pauses); it includes the
final dirty-bitmap report on the source and the device data transfer.  The I/O is
verified throughout: the run fails loudly if a command completed twice, not at all,
or returned wrong data.  Prints the machine's load average before and after: on the
shared 2-core test machine other jobs inflate the tail.
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

from tests.migrig import Guest, migrate, percentile, start_hosts, stop_hosts  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2), "min": round(min(values), 2)}


def run(rounds: int, schemes: Sequence[str], precopy: bool, dirty_log: bool, queues: int,
        qd: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    daemons, img = start_hosts(2)
    a, b = daemons
    g = Guest.boot(a, nqueues=queues, qd=qd)
    load = g.load
    assert load is not None
    figs = []
    try:
        load.start()
        load.wait_completions(500)
        for i in range(rounds):
            f = migrate(g, b if g.daemon is a else a, schemes[i % len(schemes)], precopy=precopy,
                        dirty_log=dirty_log, check_regs=False)
            figs.append(f)
            load.wait_completions(100)
        load.stop()
        summary = load.summary()
        if load.errors:
            raise SystemExit(f"verification failed: {load.errors[:5]}")
    finally:
        g.close()
        stop_hosts(daemons, img)
    out: dict[str, Any] = {"rounds": rounds, "queues": queues, "qd": qd, "precopy": precopy,
                           "dirty_log": dirty_log, "io": summary,
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
            "steps_ms": {k: _stats(v) for k, v in steps.items()}}
    all_b = [f.blackout_ms for f in figs]
    out["blackout_ms"] = _stats(all_b)
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
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    schemes = ("v2", "v1") if a.scheme == "both" else (a.scheme,)
    t0 = time.monotonic()
    r = run(a.rounds, schemes, not a.no_precopy, not a.no_dirty_log, a.queues, a.qd)
    r["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(r, indent=1) if a.json else table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
