"""The fuzz runner: every target for a time budget, one summary table.

    python -m fuzz.run --minutes 30                 # all targets, time split evenly
    python -m fuzz.run --seconds 20 --target nvme_io --target socket
    python -m fuzz.run --replay crash-FILE --target vfio_message

Atheris targets (fuzz/targets.py) run in child processes (`fuzz.atheris_main`) in
slices of at most SLICE seconds, each slice resuming the target's corpus in the work
dir; a slice that ends in a finding is classified from libFuzzer's output and the
next slice goes on.  The socket target (fuzz/sockfuzz.py) runs in this process
against its own daemon.  Findings:

  crash      an uncaught Python exception / broken invariant (atheris), a daemon
             process that died or a bug line in its log (socket)
  hang       a unit over -timeout (atheris), a liveness probe without answer (socket)
  guard hit  SIGSEGV (libFuzzer "deadly signal"): an access to a PROT_NONE guard
             page around guest memory or a namespace (fuzz/guarded.py)

Each finding's input is kept (libFuzzer artifact / case seed) under the work dir.
The exit status is 1 if anything was found, 0 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
SLICE = 600.0                 # longest single atheris process
UNIT_TIMEOUT = 10             # libFuzzer -timeout: one input may take this long
ALL = [*TARGETS, "socket"]


@dataclass
class Result:
    target: str
    seconds: float = 0.0
    steps: int = 0
    crashes: int = 0
    hangs: int = 0
    guard_hits: int = 0
    findings: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def default_workdir() -> str:
    return os.environ.get("VNVMED_FUZZ_DIR") or "/var/tmp/vnvmed-fuzz"


def seeds(target: str) -> list[bytes]:
    """A few valid inputs to start from (the corpus grows from them)."""
    from vfio_user.client import QEMU_VERSION_JSON
    from vfio_user.messages import DmaMap, RegionAccess, Version
    from vfio_user.wire import Command
    if target == "vfio_message":
        return [bytes([0, Command.VERSION]) + Version(0, 0, QEMU_VERSION_JSON).encode(),
                bytes([0, Command.DMA_MAP]) + DmaMap(32, 3, 0, 0, 1 << 20).encode(),
                bytes([0, Command.REGION_WRITE]) + RegionAccess(0x14, 0, 4, b"\x01\0\0\0").encode(),
                bytes([0, Command.REGION_READ]) + RegionAccess(0x1000, 0, 4).encode()]
    if target.startswith("selftest_"):
        return [b"seed", b"X"]
    if target in ("nvme_io", "nvme_admin"):
        import struct
        out = []
        for opc, cdw10 in ((0x02, 0), (0x01, 0), (0x06, 1), (0x02, 8), (0x09, 7), (0x7C, 0)):
            sqe = struct.pack("<BBHIQQQQ6I", opc, 0, 1, 1, 0, 0, 0x1000, 0x2000, cdw10, 0, 7, 0, 0, 0)
            out.append(bytes([0x15, 1]) + sqe + bytes(64))
        return out
    return []


def _classify(text: str, rc: int) -> str | None:
    if "deadly signal" in text or rc in (-11, -7, 139):
        return "guard_hits"
    if "libFuzzer: timeout" in text or "ALARM: working on the last Unit" in text:
        return "hangs"
    if "Uncaught Python exception" in text or rc != 0:
        return "crashes"
    return None


def _steps(text: str) -> int:
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    if m:
        return int(m.group(1))
    runs = re.findall(r"^#(\d+)\s", text, re.M)
    return int(runs[-1]) if runs else 0


def run_atheris(target: str, seconds: float, workdir: str, python: str = sys.executable,
                log: Callable[[str], None] = print, unit_timeout: int = UNIT_TIMEOUT) -> Result:
    res = Result(target)
    corpus = Path(workdir) / "corpus" / target
    artifacts = Path(workdir) / "findings" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, s in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(s)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left < 1:
            break
        budget = int(min(left, SLICE))
        t0 = time.monotonic()
        proc = subprocess.run(
            [python, "-m", "fuzz.atheris_main", target, f"-max_total_time={budget}",
             f"-timeout={unit_timeout}", "-rss_limit_mb=2048", "-print_final_stats=1",
             "-max_len=4096", f"-artifact_prefix={artifacts}/", str(corpus)],
            cwd=str(ROOT), env=env, capture_output=True, text=True, errors="replace",
            timeout=budget + 120)
        res.seconds += time.monotonic() - t0
        text = proc.stdout + proc.stderr
        res.steps += _steps(text)
        kind = _classify(text, proc.returncode)
        if kind is not None:
            setattr(res, kind, getattr(res, kind) + 1)
            tail = "\n".join(text.splitlines()[-40:])
            note = f"{target}: {kind[:-1].replace('_', ' ')} (rc {proc.returncode}); artifacts in {artifacts}"
            res.findings.append(note + "\n" + tail)
            log(note)
            (artifacts / f"log-{int(time.time())}.txt").write_text(text[-20000:])
    return res


def run_socket(seconds: float, workdir: str, log: Callable[[str], None] = print) -> Result:
    from .sockfuzz import run as sock_run
    t0 = time.monotonic()
    out = sock_run(seconds, os.path.join(workdir, "findings", "socket"), log=log)
    res = Result("socket", time.monotonic() - t0, out.steps, out.crashes, out.hangs, out.guard_hits,
                 list(out.notes))
    return res


def table(results: list[Result]) -> str:
    rows = [("target", "seconds", "steps", "steps/s", "crashes", "hangs", "guard hits")]
    for r in results:
        rows.append((r.target, f"{r.seconds:.0f}", str(r.steps), f"{r.rate:.0f}", str(r.crashes),
                     str(r.hangs), str(r.guard_hits)))
    tot = Result("total", sum(r.seconds for r in results), sum(r.steps for r in results),
                 sum(r.crashes for r in results), sum(r.hangs for r in results),
                 sum(r.guard_hits for r in results))
    rows.append((tot.target, f"{tot.seconds:.0f}", str(tot.steps), f"{tot.rate:.0f}",
                 str(tot.crashes), str(tot.hangs), str(tot.guard_hits)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="total budget, split evenly over the targets")
    g.add_argument("--seconds", type=float, help="total budget in seconds")
    p.add_argument("--target", action="append", choices=ALL, help="repeatable; default: all")
    p.add_argument("--workdir", default=default_workdir(), help="corpora and findings (default %(default)s)")
    p.add_argument("--replay", metavar="FILE", help="run one saved input through --target (atheris targets)")
    a = p.parse_args(argv)
    targets = a.target or ALL
    if a.replay:
        (t,) = [t for t in targets if t in TARGETS] or [None]
        if t is None:
            p.error("--replay needs exactly one atheris --target")
        return subprocess.call([sys.executable, "-m", "fuzz.atheris_main", t, a.replay], cwd=str(ROOT),
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    total = (a.minutes * 60 if a.minutes is not None else a.seconds if a.seconds is not None else 60.0)
    each = total / len(targets)
    results = []
    for t in targets:
        print(f"fuzz: {t} for {each:.0f} s", flush=True)
        r = run_socket(each, a.workdir) if t == "socket" else run_atheris(t, each, a.workdir)
        print(f"fuzz: {t}: {r.steps} steps, {r.rate:.0f}/s, {r.crashes} crashes, {r.hangs} hangs, "
              f"{r.guard_hits} guard hits", flush=True)
        results.append(r)
    print(table(results))
    found = [f for r in results for f in r.findings]
    for f in found:
        print("\n" + f)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
