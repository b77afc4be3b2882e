"""ops/perf.py (vnvmed-perf) against a real vnvmed: the benchmark driver itself must be right.

Short runs (a fraction of a second): these check that the numbers it prints come
from real completions (no errors, the read/write mix it was asked for, data really
moved), not how fast anything is.
"""
import os
import time

import pytest

from ops.perf import process_tree, run, spawn_vnvmed
from ops.perfdrv import Controller, QueueJob, Workload

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def daemon():
    sp = spawn_vnvmed("ram:64M", None)
    yield sp
    sp.stop()


def test_randrw_mix_single_process(daemon):
    wl = Workload("randrw", 8192, 4, 0.4, read_pct=70, span=64 << 20)
    rep = run(daemon.sock, wl, target_pid=daemon.proc.pid)
    assert rep["errors"] == 0
    assert rep["ios"] >= 4           # at least the first command of every CID
    assert rep["lat_us"]["p50"] <= rep["lat_us"]["p99"] <= rep["lat_us"]["p99.9"]
    names = " ".join(r["name"] for r in rep["target_cpu"])
    assert "vnvmed: worker 0" in names and "vnvmed: frontend" in names
    assert any(r["cpu_s"] > 0 for r in rep["target_cpu"])


def test_two_client_processes_share_the_controller(daemon):
    wl = Workload("randread", 4096, 2, 0.4, span=64 << 20)
    rep = run(daemon.sock, wl, processes=2)
    assert rep["errors"] == 0 and rep["ios"] >= 4, rep
    assert rep["workload"]["queues"] == 2


def test_writes_land_and_reads_return_them(daemon):
    """Sequential 128 KiB writes of a pattern, then reads into zeroed buffers."""
    ctl = Controller(daemon.sock, 16 << 20)
    try:
        ctl.enable()
        nblocks, bs = ctl.namespace(1)
        assert nblocks * bs == 64 << 20
        ctl.set_queue_count(1)
        q = ctl.create_queue(1, 2)
        wl = Workload("write", 131072, 2, 0.0, span=1 << 20)
        job = QueueJob(ctl, q, wl, bs, nblocks, 0)
        # Fill each CID's buffer with a byte pattern through its PRP1 template.
        bufs = []
        for cid, t in enumerate(job.templates[0]):
            buf = int.from_bytes(t[24:32], "little")
            ctl.ram.view(buf, 131072)[:] = bytes([cid + 1]) * 131072
            bufs.append(buf)
        res = job.run(0)                      # deadline passed: one command per CID
        assert res.ios == 2 and res.errors == 0 and res.reads == 0
        for b in bufs:
            ctl.ram.view(b, 131072)[:] = bytes(131072)
        # Same queue again: the ring position must carry over between runs.
        rd = QueueJob(ctl, q, Workload("read", 131072, 2, 0.0, span=1 << 20), bs, nblocks, 0)
        res = rd.run(0)
        assert res.ios == 2 and res.errors == 0 and res.reads == 2
        got = {bytes(ctl.ram.view(int.from_bytes(t[24:32], "little"), 131072))[:1]
               for t in rd.templates[1]}
        assert got == {b"\x01", b"\x02"}
    finally:
        ctl.close()


def test_process_tree_sees_children():
    tree = process_tree(os.getppid())
    assert os.getpid() in tree


def test_per_command_doorbells_write_the_sq_tail_for_every_command():
    """--sq-doorbells per-cmd: one SQ tail write per submitted command (as Linux and SPDK
    drivers do), the CQ head once per reaped batch; counted on the trapped path, where
    every doorbell write is a real REGION_WRITE message to the daemon."""
    sp = spawn_vnvmed("ram:16M", None, extra=["--doorbells", "nvme0=trapped"])
    try:
        counts = {}
        for pattern in ("batch", "per-cmd"):
            ctl = Controller(sp.sock, 16 << 20)
            try:
                assert ctl.trapped
                ctl.enable()
                nblocks, bs = ctl.namespace(1)
                ctl.set_queue_count(1)
                wl = Workload("randread", 4096, 4, 0.0, span=16 << 20, doorbells=pattern)
                q = ctl.create_queue(1, 4, wl.entries())
                assert q.size == (5 if pattern == "batch" else 256)   # spare CQ room with per-cmd
                job = QueueJob(ctl, q, wl, bs, nblocks, 0)
                sq = cq = 0
                real = ctl.ring

                def ring(word, value, real=real):
                    nonlocal sq, cq
                    if word == 2:
                        sq += 1
                    elif word == 3:
                        cq += 1
                    real(word, value)
                ctl.ring = ring
                res = job.run(time.perf_counter_ns() + 300_000_000)
                ctl.ring = real
                assert res.errors == 0 and res.ios > 8
                counts[pattern] = (sq, cq, res.ios)
                ctl.disable()
            finally:
                ctl.close()
        sq, cq, ios = counts["per-cmd"]
        assert sq == ios, counts          # every command submitted (and completed) rang once
        assert cq <= ios, counts          # the CQ head once per reaped batch
        bsq, bcq, bios = counts["batch"]
        assert bsq <= bcq < bios, counts   # one SQ write per reaped batch, not per command
    finally:
        sp.stop()


def test_installed_vnvmed_perf_spawns_the_installed_daemon(tmp_path):
    """The console script, run from a directory that is not the checkout, with no
    PYTHONPATH: it must find the daemon through the installed packages (it used to look
    for the checkout's bin/), and `benchmarks` is not an installed package."""
    import importlib.util
    import json
    import subprocess
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "vnvmed-perf")
    if not os.path.exists(exe):
        pytest.skip(f"vnvmed-perf is not installed beside {sys.executable} (scripts/setup installs it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('benchmarks'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "None", probe.stdout
    res = subprocess.run([exe, "--spawn", "null:64M", "-q", "4", "-t", "0.3", "--json"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["errors"] == 0 and rep["ios"] > 0, rep
    assert importlib.util.find_spec("ops.perf") is not None


def test_interrupt_driven_client_sleeps_on_the_cq_vector(daemon):
    """wait='irq': the client blocks on its CQ's MSI-X eventfd (as a guest does) and
    every completion still arrives - the daemon signals the vector."""
    ctl = Controller(daemon.sock, 16 << 20)
    try:
        ctl.enable()
        nblocks, bs = ctl.namespace(1)
        ctl.set_queue_count(1)
        wl = Workload("randread", 4096, 4, 0.0, span=16 << 20, doorbells="per-cmd", wait="irq")
        q = ctl.create_queue(1, 4, wl.entries(), irq=True)
        res = QueueJob(ctl, q, wl, bs, nblocks, 0).run(time.perf_counter_ns() + 300_000_000)
        assert res.errors == 0 and res.ios > 8
        saved, q.efd = q.efd, -1             # as if the queue had no interrupt vector
        try:
            with pytest.raises(ValueError, match="irq"):
                QueueJob(ctl, q, wl, bs, nblocks, 0).run(0)
        finally:
            q.efd = saved
        ctl.disable()
    finally:
        ctl.close()
