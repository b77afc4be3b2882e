"""Trapped doorbells (`doorbells = "trapped"`): the real daemon, the host driver of
benchmarks/hostnvme.py with every doorbell write sent as a REGION_WRITE.

What must hold: BAR0 offers no mmap area; I/O works; an idle worker sleeps instead of
polling (its wake-ups and CPU over 3 s, from /proc, are far below the mmap mode's) and
the first command after the idle period is served at once (a worker that missed its
kick would wait for its 1 s safety timeout); with shadow doorbells the host writes the
real doorbell only when EventIdx asks, the worker leaves EventIdx behind while busy
and arms it before it sleeps, so I/O after idle still completes at once.
"""
from __future__ import annotations

import os
import time

import pytest

from benchmarks.hostnvme import HostNvme
from tests.daemon import Daemon
from tests.integration.conftest import Host, finish_daemon, start_daemon
from vfio_user.wire import RegionFlag

pytestmark = pytest.mark.timeout(30)

ARGS = ["--cores", "0", "--controller", "nvme0={run}/nvme0.sock", "--namespace", "nvme0=ram:16M"]
TRAPPED = ARGS + ["--doorbells", "nvme0=trapped"]
QUICK = 0.5      # generous: "nothing waited for a timeout", not a latency figure


@pytest.fixture
def trapped() -> Daemon:
    d = start_daemon(TRAPPED)
    try:
        yield d
    finally:
        finish_daemon(d)


def _worker_usage(pid: int) -> tuple[int, int]:
    """(CPU ns, voluntary context switches) of a process so far."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            cpu = int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        ctx = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return cpu, ctx


def _write_read(n: HostNvme, slba: int, fill: int) -> float:
    """One 4 KiB write and read back on queue 1; returns the write's completion time."""
    buf = n.ram.alloc(4096)
    n.fill(buf, bytes([fill]) * 4096)
    t0 = time.monotonic()
    assert n.rw(1, True, 1, slba, 8, buf) == 0
    took = time.monotonic() - t0
    n.fill(buf, bytes(4096))
    assert n.rw(1, False, 1, slba, 8, buf) == 0
    assert n.read(buf, 4096) == bytes([fill]) * 4096
    return took


def _idle_then_io(d: Daemon, trapped: bool, shadow: bool = False) -> tuple[int, int, float]:
    """Worker CPU ns and wake-ups over 3 s of idle with an I/O queue, then one I/O's time."""
    (worker,) = d.pids_named("worker")
    h = Host(d.socket)
    try:
        n = h.nvme
        assert n is not None
        n.trapped = trapped
        n.enable()
        if shadow:
            n.enable_shadow()
        n.create_io_queue(1, 32)
        _write_read(n, 0, 0x11)
        time.sleep(0.3)                  # let the worker finish its spin and go idle
        cpu0, ctx0 = _worker_usage(worker)
        time.sleep(3.0)
        cpu1, ctx1 = _worker_usage(worker)
        took = _write_read(n, 8, 0x22)
        return cpu1 - cpu0, ctx1 - ctx0, took
    finally:
        h.close()


def test_region_info_has_no_mmap_area_in_trapped_mode(trapped) -> None:
    h = Host(trapped.socket)
    try:
        info, fd = h.client.get_region_info(0)
        assert info.size == 0x4000
        assert not info.flags & RegionFlag.MMAP
        assert info.flags & RegionFlag.READ and info.flags & RegionFlag.WRITE
        assert fd is None and not info.sparse
        assert h.nvme is not None and h.nvme.db is None   # the driver must trap every write
    finally:
        h.close()


def test_region_info_still_offers_the_doorbell_mmap_by_default() -> None:
    d = start_daemon(ARGS)
    try:
        h = Host(d.socket)
        try:
            info, fd = h.client.get_region_info(0)
            assert info.flags & RegionFlag.MMAP and fd is not None
            os.close(fd)
        finally:
            h.close()
    finally:
        finish_daemon(d)


def test_io_with_trapped_doorbells(trapped) -> None:
    h = Host(trapped.socket)
    try:
        n = h.nvme
        assert n is not None
        n.trapped = True
        n.enable()
        n.create_io_queue(1, 16)
        n.create_io_queue(2, 16)
        for i in range(40):              # wraps both rings
            _write_read(n, 16 * i, i)
        # queue depth > 1: a burst of submissions, one trapped tail write each
        bufs = [n.ram.alloc(4096) for _ in range(12)]
        cids = []
        for i, b in enumerate(bufs):
            n.fill(b, bytes([0x80 + i]) * 4096)
            cid = n.next_cid()
            prp1, prp2 = n.prps(b, 4096)
            n.submit(2, n.sqe(0x01, cid, 1, prp1, prp2, (1000 + 8 * i, 0, 7)))
            cids.append(cid)
        assert sorted(e.cid for e in n.reap_cqes(2, len(cids))) == sorted(cids)
        assert all(n.rw(1, False, 1, 1000 + 8 * i, 8, b) == 0 and n.read(b, 4096) == bytes([0x80 + i]) * 4096
                   for i, b in enumerate(bufs))
        assert n.doorbell_writes > 0 and n.doorbells_skipped == 0
    finally:
        h.close()


def test_idle_trapped_worker_sleeps_and_wakes_at_once() -> None:
    d = start_daemon(TRAPPED)
    try:
        t_cpu, t_wakes, t_took = _idle_then_io(d, trapped=True)
    finally:
        finish_daemon(d)
    d = start_daemon(ARGS)
    try:
        m_cpu, m_wakes, m_took = _idle_then_io(d, trapped=False)
    finally:
        finish_daemon(d)
    print(f"idle worker over 3 s: trapped {t_cpu / 1e6:.2f} ms CPU, {t_wakes} wake-ups; "
          f"mmap {m_cpu / 1e6:.2f} ms CPU, {m_wakes} wake-ups; first I/O after idle "
          f"{t_took * 1e3:.2f} ms (trapped), {m_took * 1e3:.2f} ms (mmap)")
    # mmap: 25 polls a second at least once idle; trapped: the 1 s safety net only.
    assert m_wakes >= 50
    assert t_wakes <= 10
    assert t_cpu < m_cpu
    assert t_took < QUICK


def test_shadow_doorbells_follow_eventidx_and_io_after_idle_completes(trapped) -> None:
    h = Host(trapped.socket)
    try:
        n = h.nvme
        assert n is not None
        n.trapped = True
        n.enable()
        n.enable_shadow()
        n.create_io_queue(1, 64)
        _write_read(n, 0, 1)
        # A burst: the worker, woken by the first tail write, polls the shadow tail and
        # leaves EventIdx behind, so the host skips (some of) the later doorbell writes.
        before = n.doorbells_skipped
        bufs = [n.ram.alloc(4096) for _ in range(32)]
        cids = []
        for i, b in enumerate(bufs):
            cid = n.next_cid()
            n.fill(b, bytes([i]) * 4096)
            prp1, prp2 = n.prps(b, 4096)
            n.submit(1, n.sqe(0x01, cid, 1, prp1, prp2, (8 * i, 0, 7)))
            cids.append(cid)
        assert sorted(e.cid for e in n.reap_cqes(1, len(cids))) == sorted(cids)
        assert n.doorbells_skipped > before
        for i in range(5):               # QD1 after the burst: each one completes
            _write_read(n, 512 + 8 * i, 0x40 + i)
        # Idle: the worker armed EventIdx before it slept, so the next tail write is a
        # real (trapped) doorbell write that wakes it; a missed arm would cost the 1 s
        # safety timeout (or a hang).
        time.sleep(2.0)
        writes = n.doorbell_writes
        took = _write_read(n, 1024, 0x77)
        assert n.doorbell_writes > writes
        assert took < QUICK
    finally:
        h.close()


def test_perf_driver_runs_against_trapped_doorbells() -> None:
    from ops.perf import run, spawn_vnvmed
    from ops.perfdrv import Workload
    sp = spawn_vnvmed("ram:16M", None, extra=["--doorbells", "nvme0=trapped"])
    try:
        rep = run(sp.sock, Workload("randrw", 4096, 4, 0.3, read_pct=50, span=16 << 20))
        assert rep["errors"] == 0 and rep["ios"] >= 4, rep
    finally:
        sp.stop()
