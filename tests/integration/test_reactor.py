"""The multi-process reactor with real processes: pinning, quiesce under I/O, faults, shutdown."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from benchmarks.hostnvme import HostNvme
from tests.integration.conftest import close_guest
from vfio_user.client import GuestRam, VfioUserClient

MB = 1 << 20


def _host(sock: str, ram_size: int = 32 * MB) -> tuple[VfioUserClient, GuestRam, HostNvme]:
    c = VfioUserClient(sock)
    c.negotiate()
    ram = GuestRam(ram_size)
    c.dma_map(0, ram_size, ram.fd, 0)
    h = HostNvme(c, ram)
    h.enable()
    return c, ram, h


def test_workers_pinned_and_named(tmp_path, vnvmed):
    ncpu = len(os.sched_getaffinity(0))
    cores = "0-1" if ncpu >= 2 else "0"
    d = vnvmed(tmp_path / "run", "--cores", cores, "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=null:16M")
    try:
        workers = d.pids_named("worker")
        assert len(workers) == (2 if ncpu >= 2 else 1)
        seen = []
        for pid in workers:
            status = open(f"/proc/{pid}/status").read()
            allowed = [l.split(":")[1].strip() for l in status.splitlines() if l.startswith("Cpus_allowed_list")]
            seen.append(allowed[0])
            assert "worker" in open(f"/proc/{pid}/comm").read()
        assert sorted(seen) == (["0", "1"] if ncpu >= 2 else ["0"])
        assert len(d.pids_named("frontend")) == 1
    finally:
        assert d.stop() == 0
    assert d.shm_left() == []


@pytest.mark.parametrize("cores,why", [("0-", "syntax"), ("3-1", "descending"), ("999", "unavailable")])
def test_bad_core_list_is_a_clear_startup_error(tmp_path, vnvmed, cores, why):
    with pytest.raises(RuntimeError) as e:
        vnvmed(tmp_path / "run", "--cores", cores, "--controller", f"c0={tmp_path}/c0.sock", timeout=15)
    assert "exited with 2" in str(e.value) and "core" in str(e.value).lower()


def test_io_verified_while_dma_map_unmap_storm(tmp_path, vnvmed):
    """Quiesce under load: no mismatch, no lost/duplicated completion, no touch after unmap.

    Each round maps a second region R, puts reads into it (data from the disk lands in R)
    and writes on every queue, and unmaps R while they are in flight.  The unmap reply is
    the line: a read that completed with success wrote R before it (R's content equals
    what the disk holds), one that was fetched after it fails with an error status, and
    after the reply nothing writes R again - a canary put there right after the reply is
    intact once every completion of the round is in.  Counted in rounds, not seconds.
    """
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=ram:16M")
    c, ram, h = _host(f"{tmp_path}/c0.sock")
    try:
        qids = [1, 2, 3, 4]
        for q in qids:
            h.create_io_queue(q, 32)
        rng = random.Random(1)
        expect: dict[int, bytes] = {}
        iova_r = 0x4000_0000
        # Known data for the reads into R: LBA block 4096+8*i holds page i.
        src = [os.urandom(4096) for _ in qids]
        wbuf = ram.alloc(4096)
        for i, data in enumerate(src):
            ram.view(wbuf, 4096)[:] = data
            assert h.rw(1, True, 1, 4096 + 8 * i, 8, wbuf) == 0
        bufs = {q: ram.alloc(4096) for q in qids}
        read_ok = read_refused = 0
        for rnd in range(50):
            with GuestRam(64 * 1024, base=iova_r) as r:
                c.dma_map(iova_r, 64 * 1024, r.fd, 0)
                r.view(iova_r, 64 * 1024)[:] = bytes(64 * 1024)
                pending: dict[int, tuple[int, int, bytes]] = {}
                reads: dict[int, tuple[int, int]] = {}
                # distinct LBAs within a round: two in-flight writes to one LBA have no order
                lbas = [8 * i for i in rng.sample(range(4096 // 8), len(qids))]
                for i, (q, lba) in enumerate(zip(qids, lbas)):
                    data = os.urandom(4096)
                    ram.view(bufs[q], 4096)[:] = data
                    cid = h.next_cid()
                    h.submit(q, h.sqe(0x01, cid, 1, bufs[q], 0, (lba, 0, 7)))
                    pending[q] = (cid, lba, data)
                    rcid = h.next_cid()             # a read into R, page i
                    h.submit(q, h.sqe(0x02, rcid, 1, iova_r + i * 4096, 0, (4096 + 8 * i, 0, 7)))
                    reads[q] = (rcid, i)
                # map/unmap (an fd-less one, then R itself) while the commands are in flight
                c.dma_map(iova_r + 0x100000, 4096, None, 0)
                c.dma_unmap(iova_r + 0x100000, 4096)
                c.dma_unmap(iova_r, 64 * 1024)
                seen = bytes(r.view(iova_r, 64 * 1024))
                r.view(iova_r, 64 * 1024)[:] = b"\xee" * (64 * 1024)     # the canary
                for q in qids:
                    got = {cid: st for cid, st, _, _ in h.reap(q, 2)}
                    cid, lba, data = pending[q]
                    assert got[cid] == 0, f"round {rnd}: write on q{q} failed {got[cid]:#x}"
                    expect[lba] = data
                    rcid, i = reads[q]
                    if got[rcid] == 0:
                        read_ok += 1
                        assert seen[i * 4096:(i + 1) * 4096] == src[i], f"round {rnd}: read {i} lost"
                    else:
                        read_refused += 1
                assert bytes(r.view(iova_r, 64 * 1024)) == b"\xee" * (64 * 1024), \
                    f"round {rnd}: R written after its unmap reply"
        # read everything back through the queues
        for i, (lba, data) in enumerate(expect.items()):
            q = qids[i % len(qids)]
            buf = bufs[q]
            ram.view(buf, 4096)[:] = bytes(4096)
            assert h.rw(q, False, 1, lba, 8, buf) == 0
            assert bytes(ram.view(buf, 4096)) == data, f"lba {lba} mismatch"
        assert read_ok > 0, "no read into R completed before its unmap: the test tests nothing"
        assert "died" not in d.log()
        assert h.reg_read(0x1C) & 2 == 0, "controller went fatal"
    finally:
        try:
            close_guest(c, ram, h)
        finally:
            assert d.stop() == 0
    assert d.shm_left() == []


def test_killed_worker_is_replaced_without_the_host_noticing(tmp_path, vnvmed):
    """Issue 12: the supervisor restarts the worker and the front-end re-attaches its
    queues from the queue table: no CSTS.CFS, the same I/O queue goes on, data written
    before the kill reads back (tests/integration/test_worker_recovery.py does it under
    load)."""
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=ram:8M")
    c, ram, h = _host(f"{tmp_path}/c0.sock")
    try:
        h.create_io_queue(1, 16)
        buf = ram.alloc(4096)
        ram.view(buf, 4096)[:] = b"\xa5" * 4096
        assert h.rw(1, True, 1, 0, 8, buf) == 0
        (worker,) = d.pids_named("worker")
        os.kill(worker, signal.SIGKILL)
        d.wait_for_log("worker 0 replaced")
        assert h.reg_read(0x1C) & 3 == 1                 # RDY, no CFS
        ram.view(buf, 4096)[:] = b"\x5a" * 4096
        assert h.rw(1, True, 1, 8, 8, buf) == 0          # the same queue, no reset
        ram.view(buf, 4096)[:] = bytes(4096)
        assert h.rw(1, False, 1, 0, 8, buf) == 0
        assert bytes(ram.view(buf, 4096)) == b"\xa5" * 4096
        assert h.rw(1, False, 1, 8, 8, buf) == 0
        assert bytes(ram.view(buf, 4096)) == b"\x5a" * 4096
        assert "controller fatal" not in d.log()
    finally:
        try:
            close_guest(c, ram, h)
        finally:
            assert d.stop() == 0
    assert d.shm_left() == []


def test_killed_frontend_is_restarted_and_serves_its_socket(tmp_path, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=ram:8M")
    try:
        (fe,) = d.pids_named("frontend")
        os.kill(fe, signal.SIGKILL)
        d.wait_for_log("restarting it")
        deadline = time.monotonic() + 15
        while True:
            try:
                c, ram, h = _host(f"{tmp_path}/c0.sock")
                break
            except (OSError, TimeoutError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        try:
            h.create_io_queue(1, 16)
            buf = ram.alloc(4096)
            assert h.rw(1, True, 1, 0, 8, buf) == 0
        finally:
            close_guest(c, ram, h)
    finally:
        assert d.stop() == 0
    assert d.shm_left() == []


def test_two_controllers_quiescing_one_does_not_stall_the_other(tmp_path, vnvmed):
    cores = "0-1" if len(os.sched_getaffinity(0)) >= 2 else "0"
    d = vnvmed(tmp_path / "run", "--cores", cores,
               "--controller", f"a={tmp_path}/a.sock", "--namespace", "a=ram:8M",
               "--controller", f"b={tmp_path}/b.sock", "--namespace", "b=ram:8M")
    ca, rama, ha = _host(f"{tmp_path}/a.sock")
    cb, ramb, hb = _host(f"{tmp_path}/b.sock")
    try:
        ha.create_io_queue(1, 16)
        hb.create_io_queue(1, 16)
        if cores == "0-1":
            # fewest queues first across controllers: a's queue pair and b's land on
            # different workers
            from ops.ctl import RpcClient
            with RpcClient(os.path.join(str(tmp_path / "run"), "vnvmed.rpc")) as rpc:
                rows = {r["name"]: r for r in rpc.call("controller.list")}
            placed = {n: {q["sqid"]: q["worker"] for q in rows[n]["queues"]} for n in "ab"}
            assert placed["a"][1] != placed["b"][1], rows
        stop = threading.Event()
        maps = [0]

        def storm() -> None:
            # controller a: a continuous stream of DMA map/unmap (each one a quiesce)
            i = 0
            while not stop.is_set():
                ca.dma_map(0x8000_0000 + i * 4096, 4096, None, 0)
                ca.dma_unmap(0x8000_0000 + i * 4096, 4096)
                i = (i + 1) % 256
                maps[0] += 1

        t = threading.Thread(target=storm)
        t.start()
        done = 0
        try:
            buf = ramb.alloc(4096)
            # b's I/O runs until a has quiesced 100 times; every one of b's commands
            # completes within hb.rw's own deadline (a stall fails there), none waits for a.
            while (maps[0] < 100 or done < 100) and t.is_alive():
                assert hb.rw(1, done % 2 == 0, 1, (done % 64) * 8, 8, buf) == 0
                done += 1
        finally:
            stop.set()
            t.join(10)
        assert maps[0] >= 100 and done >= 100, (maps, done)
        # and controller a still works after its quiesce storm
        bufa = rama.alloc(4096)
        assert ha.rw(1, True, 1, 0, 8, bufa) == 0
    finally:
        try:
            close_guest(ca, rama, ha)
            close_guest(cb, ramb, hb)
        finally:
            assert d.stop() == 0
    assert d.shm_left() == []
