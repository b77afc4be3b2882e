"""vnvmed vs its peers (SPDK's and QEMU's NVMe targets over vfio-user), same client, one run.

    SPDK_DIR=/work/spdk/src python -m benchmarks.compare --sq-doorbells per-cmd \\
        --clients py,spdk --repeat 3 -t 5 --json-out /tmp/compare.json

For every workload (4 KiB randread QD1 and QD32, 4 KiB randwrite QD32, 128 KiB
sequential read QD8) and backend (null, ram) it starts a fresh target pinned to core
--target-core, runs a client pinned to --client-core against it, and prints every
result and the ratios vnvmed/peer (IOPS; CPU per I/O of the target's process tree).
This script is the one source of ratios: every ratio comes from runs of one invocation,
alternating targets, best of --repeat (other load on the machine only ever slows a run
down; every run's IOPS and the load average are in the JSON).

Targets (--peers picks the peers; those not available are skipped with the reason):
* vnvmed: bin/vnvmed of this checkout (--vnvmed-args adds flags, e.g. "--polling busy").
* spdk: SPDK's nvmf_tgt with its VFIOUSER transport (benchmarks/spdkpeer.py), when
  SPDK_DIR points to an SPDK build with vfio-user (built by the user; never vendored).
  Backends: malloc bdev (ram), null bdev (null).
* qemu: QEMU 7.2's x-remote machine with an `nvme` device exported by
  `x-vfio-user-server` (libvfio-user), built by benchmarks/qemu_peer/build.sh (--qemu).
  It serves one client and exits, so each workload gets a new one.  Its backends: null
  -> `null-co` with read-zeroes; ram -> a raw file on tmpfs (/dev/shm).  QEMU's server
  traps every BAR access (no sparse mmap), so each doorbell write is a socket round trip.

Clients (--clients):
* py: ops/perf.py's driver (perfdrv.py); --sq-doorbells per-cmd makes it write
  the SQ tail for every command as Linux and SPDK do (the default, batch, writes it once
  per reaped batch - this client's original pattern, which hides per-poll costs).
* spdk: SPDK's spdk_nvme_perf (needs SPDK_DIR and free hugepages).  Its figures against
  SPDK's own target are the ceiling of the measurement: where the py client stays below
  them against the same target, the py client is the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops.perf import cpu_delta, format_table, process_tree, run, spawn_vnvmed  # noqa: E402
from ops.perfdrv import Workload  # noqa: E402
from ops import subproc  # noqa: E402
from benchmarks.spdkpeer import SUBNQN, SpdkTarget, spdk_dir, spdk_perf, spdk_perf_available  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QEMU = os.path.join(HERE, ".cache", "qemu-peer", "qemu-system-x86_64")
NS_SIZE = 1 << 30
VNVMED_NQN = "nqn.2024-01.io.vnvmed:nvme0"

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
        subproc.stop(self.proc, 10)
        if self.img:
            os.unlink(self.img)
            self.img = None


def _start(target: str, backend: str, a: argparse.Namespace, tmp: str, client: str
           ) -> tuple[str, int, str, Callable[[], None]]:
    """(socket, pid for CPU accounting, subsystem NQN, stop) of a fresh target."""
    if target == "vnvmed":
        sp = spawn_vnvmed(f"{backend}:{NS_SIZE}", a.target_core, a.polling,
                          a.vnvmed_args.split() if a.vnvmed_args else (),
                          sock_name="cntrl" if client == "spdk" else "nvme0.sock")
        return sp.sock, sp.proc.pid, VNVMED_NQN, sp.stop
    if target == "spdk":
        sd = spdk_dir()
        assert sd is not None
        st = SpdkTarget(sd, backend, a.target_core, tmp)
        return st.sock, st.proc.pid, SUBNQN, st.stop
    q = QemuPeer(a.qemu, backend, a.target_core, tmp)
    return q.sock, q.proc.pid, "", q.stop


def one(target: str, client: str, backend: str, wl: Workload, a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vnvmed-cmp-") as tmp:
        sock, pid, nqn, stop = _start(target, backend, a, tmp, client)
        try:
            load = os.getloadavg()
            if client == "py":
                rep = run(sock, wl, client_cores=[a.client_core], target_pid=pid)
            else:
                before = process_tree(pid)
                t0 = time.monotonic()
                rep = spdk_perf(os.path.dirname(sock), nqn, wl.pattern, wl.io_size, wl.depth,
                                wl.seconds, a.client_core)
                rep["target_cpu"] = cpu_delta(before, process_tree(pid), time.monotonic() - t0)
            rep["load"] = [round(x, 2) for x in load]
            return rep
        finally:
            stop()


def cpu_us_per_io(rep: dict[str, Any]) -> float:
    cpu = sum(r["cpu_s"] for r in rep["target_cpu"])
    return 1e6 * cpu / rep["ios"] if rep["ios"] else 0.0


def available(a: argparse.Namespace) -> tuple[list[str], list[str]]:
    targets = ["vnvmed"]
    for peer in [p for p in a.peers.split(",") if p]:
        if peer == "spdk":
            if spdk_dir() is None:
                print("peer spdk skipped: SPDK_DIR does not point to an SPDK build with vfio-user"
                      " (build/bin/nvmf_tgt)", file=sys.stderr)
                continue
        elif peer == "qemu":
            if not os.access(a.qemu, os.X_OK):
                print(f"peer qemu skipped: no QEMU peer at {a.qemu} (benchmarks/qemu_peer/build.sh)",
                      file=sys.stderr)
                continue
        else:
            raise SystemExit(f"unknown peer {peer!r}")
        targets.append(peer)
    clients = []
    for c in [c for c in a.clients.split(",") if c]:
        if c == "spdk":
            why = spdk_perf_available()
            if why:
                print(f"client spdk skipped: {why}", file=sys.stderr)
                continue
        elif c != "py":
            raise SystemExit(f"unknown client {c!r}")
        clients.append(c)
    if a.only:
        targets = [t for t in targets if t == a.only]
    return targets, clients


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qemu", default=DEFAULT_QEMU)
    p.add_argument("--peers", default="spdk,qemu", help="peers to run when available (spdk, qemu)")
    p.add_argument("--clients", default="py", help="py (ops.perf) and/or spdk (spdk_nvme_perf)")
    p.add_argument("-t", "--time", type=float, default=5.0)
    p.add_argument("--target-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--backends", default="null,ram")
    p.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    p.add_argument("--only", choices=("vnvmed", "spdk", "qemu"), help="run one target only")
    p.add_argument("--sq-doorbells", choices=("batch", "per-cmd"), default="batch",
                   help="py client: SQ tail once per reaped batch, or per command (real drivers)")
    p.add_argument("--polling", choices=("adaptive", "busy"), default="adaptive", help="vnvmed's polling")
    p.add_argument("--vnvmed-args", default="", help="extra bin/vnvmed arguments (one string)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per figure, alternating targets; the best IOPS is kept (other load on "
                        "the machine only ever makes a run slower)")
    p.add_argument("--json-out")
    a = p.parse_args()
    targets, clients = available(a)
    if not clients:
        return 2
    rows: list[dict[str, Any]] = []
    for backend in a.backends.split(","):
        for label, pattern, size, depth in WORKLOADS:
            if label not in a.workloads.split(","):
                continue
            for client in clients:
                row: dict[str, Any] = {"backend": backend, "workload": label, "client": client,
                                       "sq_doorbells": a.sq_doorbells if client == "py" else "per-cmd",
                                       "best": {}, "runs": {}}
                for _ in range(a.repeat):
                    for t in targets:
                        wl = Workload(pattern, size, depth, a.time, doorbells=a.sq_doorbells)
                        try:
                            rep = one(t, client, backend, wl, a)
                        except Exception as e:   # report and go on with the next figure
                            print(f"{t} {backend} {label} client {client}: FAILED {e}", file=sys.stderr)
                            continue
                        print(f"--- {t} {backend} client={client} load={rep['load']}\n{format_table(rep)}",
                              flush=True)
                        row["runs"].setdefault(t, []).append({"iops": rep["iops"], "load": rep["load"]})
                        if t not in row["best"] or rep["iops"] > row["best"][t]["iops"]:
                            row["best"][t] = rep
                v = row["best"].get("vnvmed")
                for t in targets[1:]:
                    q = row["best"].get(t)
                    if v and q and q["iops"]:
                        row[f"ratio_vs_{t}"] = round(v["iops"] / q["iops"], 2)
                        pc = cpu_us_per_io(q)
                        row[f"cpu_per_io_ratio_vs_{t}"] = round(cpu_us_per_io(v) / pc, 2) if pc else None
                rows.append(row)
    print_summary(rows, targets)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": os.uname().machine, "nproc": os.cpu_count(),
                       "argv": sys.argv[1:], "rows": rows}, f, indent=1)
    return 0


def print_summary(rows: list[dict[str, Any]], targets: list[str]) -> None:
    print()
    head = f"{'backend':7} {'workload':18} {'client':6}"
    for t in targets:
        head += f" {t + ' IOPS':>12} {'lat us':>8}"
    for t in targets[1:]:
        head += f" {'v/' + t:>7}"
    head += f" {'us CPU/IO ' + '/'.join(t[0] for t in targets):>18} {'load (1 min)':>14}"
    print(head)
    for r in rows:
        line = f"{r['backend']:7} {r['workload']:18} {r['client']:6}"
        cpus: list[str] = []
        loads: list[float] = []
        for t in targets:
            b = r["best"].get(t)
            line += f" {b['iops'] if b else '-':>12} {b['lat_us']['mean'] if b else '-':>8}"
            cpus.append(f"{cpu_us_per_io(b):.1f}" if b else "-")
            loads += [x["load"][0] for x in r["runs"].get(t, [])]
        for t in targets[1:]:
            line += f" {r.get(f'ratio_vs_{t}', '-'):>7}"
        span = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        line += f" {'/'.join(cpus):>18} {span:>14}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
