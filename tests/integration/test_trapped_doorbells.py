"""Trapped doorbells (`doorbells = "trapped"`): the real daemon, the host driver of
benchmarks/hostnvme.py with every doorbell write sent as a REGION_WRITE.

What must hold: BAR0 offers no mmap area; I/O works; an idle worker sleeps instead of
polling (it does not wake while an mmap-mode worker beside it wakes 20 times) and the
first command after the idle period is served because its kick woke the worker (these
tests raise the 1 s safety-net sleep out of reach, so a missed kick is a hang, caught by
the driver's deadline, not 1 s of latency a threshold would have to notice); with shadow
doorbells the host writes the real doorbell only when EventIdx asks, the worker leaves
EventIdx behind while busy and arms it before it sleeps, so I/O after idle still
completes.  No assertion here depends on how fast the machine is.
"""
from __future__ import annotations

import os
import time

import pytest

from benchmarks.hostnvme import HostNvme
from ops.ctl import RpcClient
from tests.daemon import Daemon
from tests.integration.conftest import Host, finish_daemon, start_daemon
from vfio_user.wire import RegionFlag

pytestmark = pytest.mark.timeout(90)

ARGS = ["--cores", "0", "--controller", "nvme0={run}/nvme0.sock", "--namespace", "nvme0=ram:16M"]
TRAPPED = ARGS + ["--doorbells", "nvme0=trapped"]
HANG = 30.0      # a bound for "never happens", not a latency figure
# The trapped worker's safety-net sleep, raised for these tests: a wake-up within a test is
# then a kick, never the 1 s timer (which would hide a missed kick behind 1 s of latency).
NO_SAFETY_NET = ("VNVMED_TRAPPED_SLEEP_US", str(600 * 10**6))


@pytest.fixture
def trapped(monkeypatch: pytest.MonkeyPatch) -> Daemon:
    monkeypatch.setenv(*NO_SAFETY_NET)
    d = start_daemon(TRAPPED)
    try:
        yield d
    finally:
        finish_daemon(d)


def _write_read(n: HostNvme, slba: int, fill: int) -> None:
    """One 4 KiB write and read back on queue 1 (each within the driver's deadline)."""
    buf = n.ram.alloc(4096)
    n.fill(buf, bytes([fill]) * 4096)
    assert n.rw(1, True, 1, slba, 8, buf) == 0
    n.fill(buf, bytes(4096))
    assert n.rw(1, False, 1, slba, 8, buf) == 0
    assert n.read(buf, 4096) == bytes([fill]) * 4096


def _worker(d: Daemon) -> dict:
    """The daemon's only worker's counters (polls, sleeps, ...), as `vnvmectl workers` shows them.
    Asking wakes the worker once (the question arrives on its control socket)."""
    with RpcClient(d.rpc, timeout=10) as rpc:
        (row,) = rpc.call("workers")
    return row


def _idle_host(d: Daemon, trapped: bool, shadow: bool = False) -> Host:
    h = Host(d.socket)
    n = h.nvme
    assert n is not None
    n.trapped = trapped
    n.enable()
    if shadow:
        n.enable_shadow()
    n.create_io_queue(1, 32)
    _write_read(n, 0, 0x11)
    return h


def _asleep(d: Daemon) -> dict:
    """Counters once the worker has gone to sleep after the last I/O (two pings apart: the
    first wakes it, so a second sleep count means it went back to sleep by itself)."""
    first = _worker(d)
    deadline = time.monotonic() + HANG
    while True:
        now = _worker(d)
        if now["sleeps"] >= first["sleeps"] + 2:
            return now
        assert time.monotonic() < deadline, f"worker never went to sleep: {now}"
        time.sleep(0.05)


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


def test_idle_trapped_worker_sleeps_until_kicked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Side by side, both idle with an I/O queue: while the mmap-mode worker wakes by itself
    20 times (it polls the doorbell page), the trapped-mode worker wakes only for our two
    questions; then one write is served: woken by its kick, as no timer is left to do it."""
    monkeypatch.setenv(*NO_SAFETY_NET)
    t = start_daemon(TRAPPED)
    m = start_daemon(ARGS)
    ht = hm = None
    try:
        ht, hm = _idle_host(t, trapped=True), _idle_host(m, trapped=False)
        t0 = _asleep(t)
        m0 = _asleep(m)
        deadline = time.monotonic() + HANG
        while (m1 := _worker(m))["sleeps"] < m0["sleeps"] + 20 + 10:   # 10: our own questions
            assert time.monotonic() < deadline, m1
            time.sleep(0.1)
        t1 = _worker(t)
        print(f"while the mmap worker slept {m1['sleeps'] - m0['sleeps']} times and polled "
              f"{m1['polls'] - m0['polls']} rounds, the trapped worker slept "
              f"{t1['sleeps'] - t0['sleeps']} times and polled {t1['polls'] - t0['polls']} rounds")
        assert t1["sleeps"] - t0["sleeps"] <= 1, (t0, t1)       # the one wake our question made
        assert t1["polls"] - t0["polls"] <= 2, (t0, t1)         # one wake, one look, asleep again
        assert ht.nvme is not None
        _write_read(ht.nvme, 8, 0x22)       # completes only if the kick woke the worker
    finally:
        for h in (ht, hm):
            if h is not None:
                h.close()
        finish_daemon(t)
        finish_daemon(m)


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
        # real (trapped) doorbell write that wakes it; with no safety timer left, a missed
        # arm would be a hang (the driver's deadline fails the test).
        _asleep(trapped)
        writes = n.doorbell_writes
        _write_read(n, 1024, 0x77)
        assert n.doorbell_writes > writes
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
