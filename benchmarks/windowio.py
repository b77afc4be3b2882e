"""A Linux guest's I/O rate with the default message-write window and with none.

    python -m benchmarks.windowio [-n 3] [--runtime 10] [--json-out F]

Runs the real-guest `fio` workload (tests/qemu/guest/init: 2 jobs, one per vCPU,
4 KiB random writes at QD16 with crc32c verify reads, on a vnvmed ram namespace)
n times with `message_write_windows` at its default (0-1M) and n times with `none`,
alternating, and prints the median write IOPS and verify-read IOPS of each, their
ratio, and the commands that went by DMA message (Linux keeps its I/O above 1 MiB,
so this is 0 but for the one MBR read the kernel's EDD probe makes through the BIOS at
boot: the window costs a Linux guest one comparison per command).
TCG guests are CPU-bound and this machine is shared: read the spread, not one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.boottime import slow_commands  # noqa: E402
from tests.qemu import harness  # noqa: E402

MODES = {"default (0-1M)": [], "none": ["--message-write-windows", "nvme0=none"]}


def one_run(env: harness.GuestEnv, wd: Path, extra: list[str], runtime: int) -> dict[str, Any]:
    with harness.vnvmed_controller(["ram:128M"], extra=extra) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="fio", args={"mb": 32, "rt": runtime, "nns": 1},
                                workdir=wd, env=env, daemon=daemon, timeout=120 + 4 * runtime)
        slow = slow_commands(daemon)
    res.assert_ok()
    (doc,) = res.json("fio")
    job = doc["jobs"][0]
    return {"write_iops": round(job["write"]["iops"]), "verify_read_iops": round(job["read"]["iops"]),
            "slow_commands": slow}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--runtime", type=int, default=10, help="fio seconds of random writes per run")
    p.add_argument("--json-out")
    a = p.parse_args()
    env = harness.provision()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="vnv-windowio-") as tmp:
        for i in range(a.n):
            for mode, extra in MODES.items():
                r = one_run(env, Path(tmp) / f"{i}-{len(runs[mode])}-{'on' if not extra else 'off'}",
                            extra, a.runtime)
                runs[mode].append(r)
                print(f"run {i + 1} {mode:15s} write {r['write_iops']:6d} IOPS, verify read "
                      f"{r['verify_read_iops']:6d} IOPS, {r['slow_commands']} commands by message", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("write_iops", "verify_read_iops")}
           for m, rs in runs.items()}
    on, off = med["default (0-1M)"], med["none"]
    load = os.getloadavg()
    print(f"median write IOPS {on['write_iops']:.0f} (window) vs {off['write_iops']:.0f} (none), ratio "
          f"{on['write_iops'] / off['write_iops']:.2f}; verify reads {on['verify_read_iops']:.0f} vs "
          f"{off['verify_read_iops']:.0f}, ratio {on['verify_read_iops'] / off['verify_read_iops']:.2f}; "
          f"load average {load[0]:.1f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"runs": runs, "median": med, "loadavg": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
