"""Live upgrade through the real daemon, driven by the project's own vfio-user client.

Every test runs bin/vnvmed, connects "VMs" (vfio_user.client + benchmarks.hostnvme with
memfd guest RAM) that keep doing verified I/O from threads, and upgrades the daemon
with `vnvmectl upgrade` (or SIGUSR2): a new daemon process started from this checkout
takes every controller over.  The VMs must see nothing but a pause: no error status,
no lost or duplicated completion, every block reads back what was written, the same
connection goes on.  Failures (the new daemon killed mid-handover, a snapshot format
it refuses, a new daemon that never answers) must roll back: vnvmectl exits 1 with
the reason and the old daemon keeps serving.  Nothing is mocked: the version skew and
crash cases run a real second build through `vnvmectl upgrade --exec` with a wrapper
that sets VNVMED_SNAPSHOT_FORMAT / VNVMED_TEST_TAKEOVER_CRASH for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

from tests.daemon import Daemon, become_subreaper, other_build
from tests.integration import conftest

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
BS = 512
IO_BLOCKS = 8                     # 4 KiB per command


class VerifiedIo(threading.Thread):
    """A VM's I/O: batches of QD writes of unique patterns and reads that check them.

    Every command rings its doorbell (as Linux does); any error status, timeout or
    mismatch stops the thread with `error` set.  `max_gap` is the longest time a batch
    waited for its completions (the blackout as the VM sees it)."""

    def __init__(self, host: conftest.Host, qids: list[int], blocks: int, qd: int = 8) -> None:
        super().__init__(daemon=True)
        self.h, self.qids, self.qd = host, qids, qd
        self.slots = blocks // IO_BLOCKS
        self.written: dict[int, bytes] = {}
        self.bufs = {q: [host.ram.alloc(IO_BLOCKS * BS) for _ in range(qd)] for q in qids}
        self.stop = threading.Event()
        self.error: str | None = None
        self.ios = 0
        self.max_gap = 0.0
        self.rng = random.Random(len(qids) * 1000 + blocks)
        self.gen = 0

    def _batch(self, qid: int, write: bool) -> None:
        n = self.h.nvme
        assert n is not None
        lbas = self.rng.sample(range(self.slots), self.qd) if write else \
            self.rng.sample(sorted(self.written), min(self.qd, len(self.written)))
        cids = {}
        for buf, slot in zip(self.bufs[qid], lbas):
            view = self.h.ram.view(buf, IO_BLOCKS * BS)
            if write:
                self.gen += 1
                data = struct.pack("<QQ", slot, self.gen) * (IO_BLOCKS * BS // 16)
                view[:] = data
                self.written[slot] = data
            else:
                view[:] = bytes(IO_BLOCKS * BS)
            cid = n.next_cid()
            prp1, prp2 = n.prps(buf, IO_BLOCKS * BS)
            n.submit(qid, n.sqe(0x01 if write else 0x02, cid, 1, prp1, prp2,
                                (slot * IO_BLOCKS, 0, IO_BLOCKS - 1)))
            cids[cid] = (buf, slot)
        t0 = time.monotonic()
        for e in n.reap_cqes(qid, len(cids), timeout=20):
            if e.cid not in cids:
                raise AssertionError(f"queue {qid}: completion for unknown or repeated CID {e.cid}")
            buf, slot = cids.pop(e.cid)
            if e.status:
                raise AssertionError(f"queue {qid}: status {e.status:#x} for LBA slot {slot}")
            if not write and bytes(self.h.ram.view(buf, IO_BLOCKS * BS)) != self.written[slot]:
                raise AssertionError(f"queue {qid}: slot {slot} reads back other data")
        self.max_gap = max(self.max_gap, time.monotonic() - t0)
        self.ios += len(lbas)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for q in self.qids:
                    self._batch(q, True)
                    self._batch(q, False)
        except Exception as e:      # reported by finish()
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "I/O thread hung"
        assert self.error is None, self.error
        assert self.ios > 0


@contextlib.contextmanager
def vm_doing_io(sock: str, qids: list[int], qd: int = 8) -> Iterator[VerifiedIo]:
    """A connected 'VM' (8 MiB RAM) with I/O queues `qids`, verified I/O running."""
    h = conftest.Host(sock, 8 * MiB)
    io = None
    try:
        assert h.nvme is not None
        h.nvme.enable()
        for q in qids:
            h.nvme.create_io_queue(q, 32)
        io = VerifiedIo(h, qids, 4 * MiB // BS, qd=qd)
        io.start()
        yield io
    finally:
        if io is not None:
            io.stop.set()
            io.join(30)
        h.close()


def start(run_dir: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
    d = Daemon(["--cores", "0", "--log-level", "info", "--run-dir", run_dir, *args], run_dir,
               env=env, cwd=run_dir)
    d.start(30)
    return d


def ctl(d: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return d.vnvmectl(*args, timeout=timeout)


def ctl_json(d: Daemon, *args: str) -> Any:
    r = ctl(d, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def finish(d: Daemon) -> None:
    rc = d.stop()
    left = d.shm_left()
    assert rc == 0, f"vnvmed exited with {rc}:\n{d.log()[-3000:]}"
    assert not left, f"shared memory left behind: {left}"


def wrapper(run_dir: str, **env: str) -> str:
    return other_build(run_dir, **env)


def titles(d: Daemon) -> dict[int, str]:
    return d.children()


# ------------------------------------------------------------------------------ tests
def test_upgrades_under_verified_io_keep_every_connection(run_dir: str) -> None:
    """Two VMs (mmap and trapped doorbells, MSI-X, an AER outstanding) do verified I/O
    on 2 queues each while the daemon is upgraded 5 times."""
    img = os.path.join(run_dir, "b.img")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", "a=ram:8M",
              "--controller", f"b={run_dir}/b.sock", "--namespace", f"b=file:{img}")
    ha = conftest.Host(f"{run_dir}/a.sock", 16 * MiB)
    hb = conftest.Host(f"{run_dir}/b.sock", 16 * MiB)
    ios: list[VerifiedIo] = []
    try:
        na, nb = ha.nvme, hb.nvme
        assert na is not None and nb is not None
        na.enable()
        nb.enable()
        irq = na.setup_msix(3)
        na.create_io_queue(1, 32, iv=1, ien=True)
        na.create_io_queue(2, 32, iv=2, ien=True)
        nb.create_io_queue(1, 32)
        nb.create_io_queue(2, 32)
        nb.trapped = True            # every doorbell through the socket from now on
        # AER outstanding across the upgrades: completes in the last daemon
        st, _ = na.admin(0x09, 0, 0, 0, (0x0B, 1 << 8))
        assert st == 0
        aer = na.submit_aer()
        ios = [VerifiedIo(ha, [1, 2], 8 * MiB // BS), VerifiedIo(hb, [1, 2], 8 * MiB // BS)]
        for t in ios:
            t.start()
        time.sleep(0.5)
        pids = [d.pid]
        for i in range(5):
            before = [t.ios for t in ios]
            r = d.upgrade()
            assert r.returncode == 0, f"upgrade {i}: {r.stderr}\n{d.log()[-4000:]}"
            res = json.loads(r.stdout)
            assert d.handed_over_rc == 0 and res["old_pid"] == pids[-1] and res["new_pid"] == d.pid
            assert set(res["controllers"]) == {"a", "b"}
            pids.append(d.pid)
            for t, b in zip(ios, before):       # I/O goes on after each
                wait_for_more_io(t, b, f"after upgrade {i}")
        for t in ios:
            t.finish()
        # the same connections, interrupts still routed, the AER still parked
        na.reg_read(0x1C)
        while na.wait_eventfd(irq[1], 0.01):
            pass
        assert na.rw(1, True, 1, 0, 8, ha.ram.alloc(4096)) == 0
        assert na.wait_eventfd(irq[1], 5) > 0
        assert ctl(d, "namespace", "add", "a", "ram:1M").returncode == 0
        (cid, status, dw0, _), = na.reap(0, 1, timeout=10)
        assert (cid, status, dw0 & 7) == (aer, 0, 2)
        # operators see the blackouts; titles and socket locations unchanged
        stats = ctl_json(d, "stats")["controllers"]
        for name in ("a", "b"):
            h = stats[name]["handover"]
            assert h["count"] == 5 and 0 < h["last_blackout_ms"] <= h["max_blackout_ms"]
        kids = titles(d)
        assert sorted(c for c in kids.values() if "frontend" in c) == ["vnvmed: frontend a", "vnvmed: frontend b"]
        assert [c for c in kids.values() if "worker" in c] == ["vnvmed: worker 0"]
        assert d.log().count("vnvmed ready") == 6
        assert all(not os.path.exists(f"/proc/{p}") for p in pids[:-1])
    finally:
        for t in ios:
            t.stop.set()
        ha.close()
        hb.close()
        finish(d)


def test_killed_new_daemon_rolls_back_and_the_old_one_serves(run_dir: str) -> None:
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", "a=ram:4M")
    try:
        with vm_doing_io(f"{run_dir}/a.sock", [1]) as io:
            old = d.pid
            for step in ("accepted", "prepared", "restoring"):
                n = io.ios
                r = d.upgrade("--exec", wrapper(run_dir, VNVMED_TEST_TAKEOVER_CRASH=step))
                assert r.returncode == 1, r.stdout
                assert "upgrade failed" in r.stderr and "exited" in r.stderr, r.stderr
                assert d.pid == old and d.alive()
                wait_for_more_io(io, n, f"after the rollback at {step}")
            assert "handover cancelled; serving on" in d.log()
            # and a real upgrade still works afterwards
            r = d.upgrade()
            assert r.returncode == 0, r.stderr
            wait_for_more_io(io, io.ios, "after the upgrade")
            io.finish()
        assert [c for c in ctl_json(d, "controller", "list") if c["name"] == "a"][0]["namespaces"]
    finally:
        finish(d)


def wait_for_more_io(io: VerifiedIo, n: int, when: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while io.ios <= n:
        assert io.error is None, io.error
        assert time.monotonic() < deadline, f"I/O did not go on {when}"
        time.sleep(0.05)


def test_version_skew(run_dir: str) -> None:
    """A build that reads only an older format refuses (nothing stops); one with a newer
    minor of the same major takes over."""
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", "a=ram:4M")
    try:
        with vm_doing_io(f"{run_dir}/a.sock", [1], qd=4) as io:
            old = d.pid
            r = d.upgrade("--exec", wrapper(run_dir, VNVMED_SNAPSHOT_FORMAT="0.9"))
            assert r.returncode == 1
            assert "refused" in r.stderr and "newer than this build's 0.9" in r.stderr, r.stderr
            assert d.pid == old and d.alive()
            wait_for_more_io(io, io.ios, "after the refusal")
            # the freeze never happened: no blackout at all
            assert "handover cancelled" not in d.log()
            r = d.upgrade("--exec", wrapper(run_dir, VNVMED_SNAPSHOT_FORMAT="1.7"))
            assert r.returncode == 0, r.stderr
            assert d.pid != old
            wait_for_more_io(io, io.ios, "after the upgrade")
            io.finish()
    finally:
        finish(d)


def test_a_new_daemon_that_never_answers_times_out_and_rolls_back(run_dir: str) -> None:
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", "a=ram:1M")
    try:
        hang = os.path.join(run_dir, "hang")
        with open(hang, "w") as f:
            f.write("#!/bin/sh\nexec sleep 60\n")
        os.chmod(hang, 0o755)
        t0 = time.monotonic()
        r = d.upgrade("--exec", hang, "--handover-timeout", "2")
        assert r.returncode == 1 and "timed out" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 15
        assert d.alive() and ctl(d, "controller", "list").returncode == 0
        c = conftest.Host(f"{run_dir}/a.sock", 4 * MiB)
        c.close()
    finally:
        finish(d)


def test_a_replaced_backing_file_refuses_the_upgrade(run_dir: str) -> None:
    img = os.path.join(run_dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 * MiB)
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", f"a=file:{img}")
    try:
        os.rename(img, img + ".old")            # the VM's disk is still the renamed file
        with open(img, "wb") as f:
            f.truncate(1 * MiB)
        old = d.pid
        r = d.upgrade()
        assert r.returncode == 1 and "no longer the file the running daemon serves" in r.stderr, r.stderr
        assert d.pid == old and d.alive()
        os.replace(img + ".old", img)
        assert d.upgrade().returncode == 0
    finally:
        finish(d)


def test_upgrade_without_clients_keeps_runtime_changes(run_dir: str) -> None:
    """Controllers and namespaces added or resized at run time, no VM connected, SIGUSR2."""
    d = start(run_dir, "--controller", f"a={run_dir}/a.sock", "--namespace", "a=ram:4M")
    try:
        assert ctl(d, "controller", "add", "x", "--socket", f"{run_dir}/x.sock").returncode == 0
        assert ctl(d, "namespace", "add", "x", "ram:2M").returncode == 0
        assert ctl(d, "namespace", "resize", "a", "1", "1M").returncode == 0
        become_subreaper()
        old = d.pid
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while f"pid {old} exits" not in d.log():
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.05)
        new = int(d.log().split("upgrade: pid ")[-1].split()[0])
        d.follow(new)
        assert d.handed_over_rc == 0
        ctrls = {c["name"]: c for c in ctl_json(d, "controller", "list")}
        assert set(ctrls) == {"a", "x"}
        assert [n["size"] for n in ctrls["a"]["namespaces"]] == [1 * MiB]
        assert [n["size"] for n in ctrls["x"]["namespaces"]] == [2 * MiB]
        h = conftest.Host(f"{run_dir}/x.sock", 4 * MiB)
        try:
            assert h.nvme is not None
            h.nvme.enable()
            h.nvme.create_io_queue(1, 8)
            buf = h.ram.alloc(4096)
            h.ram.view(buf, 4096)[:] = b"z" * 4096
            assert h.nvme.rw(1, True, 1, 0, 8, buf) == 0
            assert h.nvme.rw(1, True, 1, 4088, 8, buf) == 0     # the last 4 KiB of 2 MiB
        finally:
            h.close()
    finally:
        finish(d)


class NotifyCollector(threading.Thread):
    """A stand-in for systemd's notify socket: collects datagrams as they come (reading
    them at once also closes the pipe a BARRIER=1 carries, as systemd does)."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self.done = False

    def run(self) -> None:
        while not self.done:
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass

    def wait_for(self, want: str, after: int = 0, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = "".join(self.seen[after:])
            if want in text:
                return text
            assert time.monotonic() < deadline, f"no {want!r} in {self.seen[after:]}"
            time.sleep(0.02)

    def close(self) -> None:
        self.done = True
        self.join(2)
        self.sock.close()


def test_systemd_sees_the_main_pid_move(run_dir: str) -> None:
    nsock = os.path.join(run_dir, "notify")
    n = NotifyCollector(nsock)
    n.start()
    d = Daemon(["--cores", "0", "--run-dir", run_dir, "--controller", f"a={run_dir}/a.sock",
                "--namespace", "a=ram:1M"], run_dir, env={"NOTIFY_SOCKET": nsock}, cwd=run_dir)
    d.spawn()
    try:
        n.wait_for("READY=1", timeout=30)
        # a refused upgrade: RELOADING=1 ... READY=1, the main PID stays
        mark = len(n.seen)
        r = d.upgrade("--exec", wrapper(run_dir, VNVMED_SNAPSHOT_FORMAT="0.1"))
        assert r.returncode == 1
        text = n.wait_for("READY=1", mark)
        assert text.index("RELOADING=1") < text.index("READY=1") and "MAINPID" not in text
        mark = len(n.seen)
        old = d.pid
        t0 = time.monotonic()
        r = d.upgrade()
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 20
        new = json.loads(r.stdout)["new_pid"]
        text = n.wait_for("READY=1", mark)
        assert text.index("RELOADING=1") < text.index(f"MAINPID={new}\n") < text.index("BARRIER=1") \
            < text.index("READY=1")
        assert d.pid == new != old and d.handed_over_rc == 0
        mark = len(n.seen)
        assert d.stop() == 0
        n.wait_for("STOPPING=1", mark)
    finally:
        d.kill()
        n.close()
