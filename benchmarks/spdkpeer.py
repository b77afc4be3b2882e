"""SPDK as a benchmark peer: its vfio-user NVMe target, and spdk_nvme_perf as a client.

    SPDK_DIR=/work/spdk/src python -m benchmarks.compare --peers spdk ...

SPDK is never part of this repository: the user builds it from its public source with
vfio-user (`./configure --with-vfio-user ...; make`, see benchmarks/README.md) and points
SPDK_DIR at the tree (binaries in $SPDK_DIR/build/bin).

`SpdkTarget` starts `nvmf_tgt` on one core with a JSON config (no RPC round trips): a
VFIOUSER transport, one subsystem with one namespace - a malloc bdev for "ram", a null
bdev for "null", 1 GiB of 512-byte blocks like vnvmed's - and a listener whose socket is
DIR/cntrl.  Tracing is off (`--num-trace-entries 0`: no /dev/shm file to leak).  Its
memory comes from hugepages when a hugetlbfs mount has enough free pages, else
`--no-huge` (the target maps the client's memory from the client's fds either way).

`spdk_perf()` runs `spdk_nvme_perf` (SPDK's own driver: one SQ doorbell per command,
CQ head per reaped batch, polled) against any vfio-user NVMe server whose socket is
DIR/cntrl - vnvmed or SPDK's target - and parses its summary.  SPDK's vfio-user client
needs its memory to be shareable by fd, i.e. hugepages (`-g`, one file per segment
list): without a hugetlbfs mount with free pages it is not available.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from typing import Any

from ops import subproc

NS_BYTES = 1 << 30
BLOCK = 512
SUBNQN = "nqn.2019-07.io.spdk:cnode0"
TARGET_MEM_MB = 1400       # 1 GiB malloc bdev + transport buffers
CLIENT_MEM_MB = 256


def spdk_dir() -> str | None:
    d = os.environ.get("SPDK_DIR")
    if d and os.access(os.path.join(d, "build", "bin", "nvmf_tgt"), os.X_OK):
        return d
    return None


def hugetlbfs() -> tuple[str | None, int]:
    """(a hugetlbfs mount point, free MiB in the default pool) or (None, 0)."""
    mount = None
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "hugetlbfs":
                mount = parts[1]
                break
    free = size_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("Hugepagesize:"):
                size_kb = int(line.split()[1])
    return mount, free * size_kb // 1024


def _sweep_huge(mount: str | None, pid: int) -> None:
    """DPDK leaves its hugepage files (spdk_pid<PID>map_*) behind; they hold the pages."""
    if not mount:
        return
    for n in os.listdir(mount):
        if n.startswith(f"spdk_pid{pid}"):
            try:
                os.unlink(os.path.join(mount, n))
            except OSError:
                pass


def target_config(backend: str, listen_dir: str) -> dict[str, Any]:
    if backend == "ram":
        bdev = {"method": "bdev_malloc_create",
                "params": {"name": "D0", "num_blocks": NS_BYTES // BLOCK, "block_size": BLOCK}}
    elif backend == "null":
        bdev = {"method": "bdev_null_create",
                "params": {"name": "D0", "num_blocks": NS_BYTES // BLOCK, "block_size": BLOCK}}
    else:
        raise ValueError(f"no SPDK bdev for backend {backend!r}")
    return {"subsystems": [
        {"subsystem": "bdev", "config": [bdev]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "VFIOUSER"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": SUBNQN, "allow_any_host": True, "serial_number": "SPDK0"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": SUBNQN, "namespace": {"bdev_name": "D0"}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": SUBNQN, "listen_address": {"trtype": "VFIOUSER", "adrfam": "IPv4",
                                                          "traddr": listen_dir, "trsvcid": "0"}}},
        ]}]}


def _rpc(path: str, method: str, timeout: float = 10.0) -> Any:
    """One JSON-RPC call on SPDK's RPC socket; its result, or None if it is not up yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
            try:
                return json.loads(buf).get("result")
            except ValueError:
                continue            # not all of it yet
    except OSError:
        return None
    finally:
        s.close()


class SpdkTarget:
    """nvmf_tgt with a VFIOUSER listener at DIR/cntrl, pinned to `core`."""

    def __init__(self, spdk: str, backend: str, core: int, tmp: str) -> None:
        self.dir = os.path.join(tmp, "spdk-vfu")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "cntrl")
        cfg = os.path.join(tmp, "spdk-tgt.json")
        with open(cfg, "w") as f:
            json.dump(target_config(backend, self.dir), f)
        self.mount, free = hugetlbfs()
        mem = ["-s", str(TARGET_MEM_MB)]
        if self.mount is None or free < TARGET_MEM_MB + 64:
            mem.append("--no-huge")
            self.mount = None
        self.hugepages = self.mount is not None
        cmd = [os.path.join(spdk, "build", "bin", "nvmf_tgt"), "-m", f"[{core}]", *mem,
               "--disable-cpumask-locks", "--num-trace-entries", "0",
               "-r", os.path.join(tmp, "spdk.rpc"), "--json", cfg]
        self.log = os.path.join(tmp, "spdk-tgt.log")
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        # The listener's socket appears while the subsystem is still starting: a client
        # that connects then has its first DMA_MAP's quiesce refused (EBUSY) and the
        # controller failed.  framework_wait_init answers once initialisation is done.
        rpc = os.path.join(tmp, "spdk.rpc")
        deadline = time.monotonic() + 60
        while not (os.path.exists(self.sock) and _rpc(rpc, "framework_wait_init") is not None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log) as f:
                    raise RuntimeError(f"SPDK target did not start: {f.read()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        subproc.stop(self.proc, 15)        # freeing 1.4 GB can take a while
        _sweep_huge(self.mount, self.proc.pid)


_ROW = re.compile(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", re.M)


def spdk_perf_available() -> str | None:
    """Why spdk_nvme_perf cannot run here, or None if it can."""
    spdk = spdk_dir()
    if spdk is None:
        return "SPDK_DIR does not point to an SPDK build with build/bin/nvmf_tgt"
    if not os.access(os.path.join(spdk, "build", "bin", "spdk_nvme_perf"), os.X_OK):
        return "no build/bin/spdk_nvme_perf in SPDK_DIR"
    mount, free = hugetlbfs()
    if mount is None or free < CLIENT_MEM_MB:
        return (f"spdk_nvme_perf needs {CLIENT_MEM_MB} MiB of free hugepages on a hugetlbfs mount"
                " (its vfio-user client shares memory by fd)")
    return None


def spdk_perf(listen_dir: str, subnqn: str, pattern: str, io_size: int, depth: int,
              seconds: float, core: int) -> dict[str, Any]:
    """One spdk_nvme_perf run against DIR/cntrl; the same keys as ops.perf.report."""
    spdk = spdk_dir()
    assert spdk is not None
    mount, _ = hugetlbfs()
    cmd = [os.path.join(spdk, "build", "bin", "spdk_nvme_perf"),
           "-r", f"trtype:VFIOUSER traddr:{listen_dir} subnqn:{subnqn}",
           "-c", f"[{core}]", "-q", str(depth), "-o", str(io_size), "-w", pattern,
           "-t", str(max(1, round(seconds))), "-s", str(CLIENT_MEM_MB), "-g"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    finally:
        _sweep_huge(mount, proc.pid)
    text = out.decode(errors="replace")
    m = _ROW.search(text)
    if proc.returncode or m is None:
        raise RuntimeError(f"spdk_nvme_perf failed ({proc.returncode}): {text[-1500:]}")
    iops, mib_s, mean_us = float(m.group(1)), float(m.group(2)), float(m.group(3))
    secs = float(max(1, round(seconds)))
    return {"workload": {"pattern": pattern, "io_size": io_size, "depth": depth, "seconds": secs,
                         "processes": 1, "queues": 1, "client": "spdk_nvme_perf", "sq_doorbells": "per-cmd"},
            "ios": round(iops * secs), "errors": 0, "elapsed_s": secs, "iops": round(iops),
            "mib_s": mib_s, "lat_us": {"mean": mean_us, "min": float(m.group(4)), "max": float(m.group(5))},
            "target_cpu": [], "command": " ".join(cmd)}

