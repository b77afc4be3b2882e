"""vnvmed vs QEMU's NVMe emulation served over vfio-user, same client, one run.

    python -m benchmarks.compare [--qemu PATH] [-t 5] [--json-out FILE] [--only vnvmed]

For every workload (4 KiB randread QD1 and QD32, 4 KiB randwrite QD32, 128 KiB
sequential read QD8) and backend (null, ram) it starts a fresh target pinned to
core --target-core, runs `benchmarks.perf` pinned to --client-core against it, and
prints both results and the vnvmed/peer ratio (IOPS, and CPU per I/O of the target).

The peer is QEMU 7.2's x-remote machine with an `nvme` device exported by
`x-vfio-user-server` (libvfio-user), built by benchmarks/qemu_peer/build.sh.  It
serves one client and exits, so each workload gets a new one.  Its backends: null ->
`null-co` with read-zeroes; ram -> a raw file on tmpfs (/dev/shm) through QEMU's
page cache path (vnvmed's ram backend is POSIX shm, i.e. also tmpfs pages).
QEMU's server traps every BAR access (no sparse mmap), so each doorbell write is a
socket round trip: that is the peer as QEMU's own client would see it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.perf import format_table, run, spawn_vnvmed  # noqa: E402
from benchmarks.perfdrv import Workload  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QEMU = os.path.join(HERE, ".cache", "qemu-peer", "qemu-system-x86_64")
NS_SIZE = 1 << 30

WORKLOADS = [  # (label, pattern, io size, depth)
    ("4k-randread-qd1", "randread", 4096, 1),
    ("4k-randread-qd32", "randread", 4096, 32),
    ("4k-randwrite-qd32", "randwrite", 4096, 32),
    ("128k-read-qd8", "read", 131072, 8),
]


class QemuPeer:
    def __init__(self, qemu: str, backend: str, core: int, tmp: str) -> None:
        self.sock = os.path.join(tmp, "qemu-peer.sock")
        self.img: str | None = None
        if backend == "null":
            blk = f"driver=null-co,node-name=d0,size={NS_SIZE},read-zeroes=on"
        else:
            fd, self.img = tempfile.mkstemp(prefix="vnvmed-peer-", dir="/dev/shm")
            os.ftruncate(fd, NS_SIZE)
            os.close(fd)
            blk = f"driver=file,filename={self.img},node-name=d0,aio=threads,cache.direct=off"
        cmd = ["taskset", "-c", str(core), qemu, "-machine", "x-remote,vfio-user=on,auto-shutdown=on",
               "-nodefaults", "-nographic", "-display", "none", "-monitor", "none", "-serial", "none",
               "-blockdev", blk, "-device", "nvme,id=nvme0,serial=peer0,drive=d0",
               "-object", f"x-vfio-user-server,id=vfu0,type=unix,path={self.sock},device=nvme0"]
        self.log = os.path.join(tmp, "qemu-peer.log")
        libdir = os.path.join(os.path.dirname(os.path.abspath(qemu)), "lib")
        env = dict(os.environ)
        if os.path.isdir(libdir):   # libvfio-user.so from the peer build
            env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log) as f:
                    raise RuntimeError(f"QEMU peer did not start: {f.read()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.img:
            os.unlink(self.img)
            self.img = None


def one(target: str, qemu: str, backend: str, wl: Workload, tcore: int, ccore: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vnvmed-cmp-") as tmp:
        if target == "vnvmed":
            sp = spawn_vnvmed(f"{backend}:{NS_SIZE}", tcore)
            try:
                return run(sp.sock, wl, client_cores=[ccore], target_pid=sp.proc.pid)
            finally:
                sp.stop()
        peer = QemuPeer(qemu, backend, tcore, tmp)
        try:
            return run(peer.sock, wl, client_cores=[ccore], target_pid=peer.proc.pid)
        finally:
            peer.stop()


def cpu_us_per_io(rep: dict[str, Any]) -> float:
    cpu = sum(r["cpu_s"] for r in rep["target_cpu"])
    return 1e6 * cpu / rep["ios"] if rep["ios"] else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qemu", default=DEFAULT_QEMU)
    p.add_argument("-t", "--time", type=float, default=5.0)
    p.add_argument("--target-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--backends", default="null,ram")
    p.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    p.add_argument("--only", choices=("vnvmed", "peer"))
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per figure, alternating targets; the best IOPS is kept (other load on "
                        "the machine only ever makes a run slower)")
    p.add_argument("--json-out")
    a = p.parse_args()
    targets = [a.only] if a.only else ["vnvmed", "peer"]
    if "peer" in targets and not os.access(a.qemu, os.X_OK):
        print(f"no QEMU peer at {a.qemu}: run benchmarks/qemu_peer/build.sh", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for backend in a.backends.split(","):
        for label, pattern, size, depth in WORKLOADS:
            if label not in a.workloads.split(","):
                continue
            row: dict[str, Any] = {"backend": backend, "workload": label}
            for _ in range(a.repeat):
                for t in targets:
                    wl = Workload(pattern, size, depth, a.time)
                    try:
                        rep = one(t, a.qemu, backend, wl, a.target_core, a.client_core)
                    except Exception as e:   # report and go on with the next figure
                        print(f"{t} {backend} {label}: FAILED {e}", file=sys.stderr)
                        continue
                    print(f"--- {t} {backend}\n{format_table(rep)}", flush=True)
                    row.setdefault("runs", {}).setdefault(t, []).append(rep["iops"])
                    if t not in row or rep["iops"] > row[t]["iops"]:
                        row[t] = rep
            if "vnvmed" in row and "peer" in row and row["peer"]["iops"]:
                row["iops_ratio"] = round(row["vnvmed"]["iops"] / row["peer"]["iops"], 2)
                pc = cpu_us_per_io(row["peer"])
                row["cpu_per_io_ratio"] = round(cpu_us_per_io(row["vnvmed"]) / pc, 2) if pc else None
            rows.append(row)
    print()
    print(f"{'backend':8} {'workload':18} {'vnvmed IOPS':>12} {'peer IOPS':>10} {'ratio':>6}"
          f" {'vnvmed MiB/s':>12} {'vnvmed lat':>10} {'peer lat':>9} {'us CPU/IO v/p':>14}")
    for r in rows:
        v, q = r.get("vnvmed"), r.get("peer")
        print(f"{r['backend']:8} {r['workload']:18} {v['iops'] if v else '-':>12} {q['iops'] if q else '-':>10}"
              f" {r.get('iops_ratio', '-'):>6} {v['mib_s'] if v else '-':>12}"
              f" {v['lat_us']['mean'] if v else '-':>10} {q['lat_us']['mean'] if q else '-':>9}"
              f" {(f'{cpu_us_per_io(v):.1f}' if v else '-') + '/' + (f'{cpu_us_per_io(q):.1f}' if q else '-'):>14}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": os.uname().machine, "nproc": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
