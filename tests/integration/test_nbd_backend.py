"""`nbd:` namespaces through the real daemon against real servers (nbdkit, qemu-nbd).

Data byte for byte through the vfio-user socket and guest RAM; the server killed
under I/O (retryable status, DNR clear; the controller and a RAM namespace keep
working; I/O resumes once the server is back); bad input at start-up (exit 2, one
line) and from `vnvmectl namespace add` (refused, nothing else disturbed).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import site
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

from benchmarks.hostnvme import HostNvme
from nvme.status import Status
from tests.daemon import Daemon
from tests.integration.conftest import enabled_nvme, finish_daemon
from tests.nbdserver import NbdServer, missing

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(missing() is not None or missing("qemu-nbd") is not None,
                                 reason=str(missing() or missing("qemu-nbd")))]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VNVMECTL = os.path.join(ROOT, "bin", "vnvmectl")
BS = 512
# Data buffers in the test host's guest RAM (64 MiB), far above its rings (allocated from 1 MiB).
WBUF, RBUF, DSMBUF, BURST = 0x1000000, 0x1400000, 0x1800000, 0x2000000
DNR_BIT = 0x4000          # in HostNvme's Cqe.status (the 15 bits above the phase)
EXPORT = 16 << 20


@pytest.fixture
def run_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vnbd-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _daemon(run: str, *ns: str) -> Daemon:
    args = ["--cores", "0", "--run-dir", run, "--controller", f"nvme0={run}/nvme0.sock"]
    for spec in ns:
        args += ["--namespace", f"nvme0={spec}"]
    return Daemon(args, run).start()


def _roundtrip(h: HostNvme, qid: int, nsid: int, slba: int, nblk: int, rng: random.Random) -> None:
    data = rng.randbytes(nblk * BS)
    h.fill(WBUF, data)
    h.fill(RBUF, b"\x5a" * len(data))
    assert h.rw(qid, True, nsid, slba, nblk, WBUF) == 0
    assert h.rw(qid, False, nsid, slba, nblk, RBUF) == 0
    assert h.read(RBUF, len(data)) == data


def test_nbdkit_and_qemu_nbd_data(run_dir: str) -> None:
    img = os.path.join(run_dir, "q.img")
    with open(img, "wb") as f:
        f.truncate(EXPORT)
    kit = NbdServer.nbdkit_memory("16M", sock=os.path.join(run_dir, "kit.sock")).start()
    qn = NbdServer.qemu_nbd(img, os.path.join(run_dir, "qn.sock")).start()
    d = _daemon(run_dir, f"nbd:{kit.uri}", f"nbd:{qn.uri}")
    try:
        rng = random.Random(15)
        with enabled_nvme(d.socket, (1, 2)) as h:
            for nsid in (1, 2):
                for slba, nblk in ((0, 1), (7, 8), (1000, 64), (EXPORT // BS - 256, 256)):
                    _roundtrip(h, 1 + nsid % 2, nsid, slba, nblk, rng)
                # Write Zeroes and Deallocate map to NBD_CMD_WRITE_ZEROES: blocks read back as zero.
                h.fill(WBUF, b"\xff" * 8 * BS)
                assert h.rw(1, True, nsid, 16, 8, WBUF) == 0
                assert h.io(1, 0x08, nsid, 16, 4).status == 0                       # Write Zeroes
                rng_buf = DSMBUF
                h.fill(rng_buf, bytes(4) + (4).to_bytes(4, "little") + (20).to_bytes(8, "little"))
                assert h.command(1, 0x09, nsid, rng_buf, 0, (0, 1 << 2, 0)).status == 0  # DSM deallocate
                assert h.rw(1, False, nsid, 16, 8, RBUF) == 0
                assert h.read(RBUF, 8 * BS) == bytes(8 * BS)
                assert h.command(1, 0x00, nsid).status == 0                          # Flush
            # qemu-nbd wrote through to its image file: the data is really on the server.
            data = rng.randbytes(4096)
            h.fill(WBUF, data)
            assert h.rw(1, True, 2, 2048, 8, WBUF) == 0
            assert h.command(1, 0x00, 2).status == 0
            with open(img, "rb") as f:
                f.seek(2048 * BS)
                assert f.read(4096) == data
    finally:
        try:
            finish_daemon(d)
        finally:             # the servers go even if the daemon's exit check fails
            kit.stop()
            qn.stop()


def test_server_killed_under_io_then_restarted(run_dir: str) -> None:
    kit = NbdServer.nbdkit_memory("16M", sock=os.path.join(run_dir, "kit.sock")).start()
    d = _daemon(run_dir, f"nbd:{kit.uri}", "ram:16M")
    try:
        with enabled_nvme(d.socket, (1, 2)) as h:
            rng = random.Random(1)
            _roundtrip(h, 1, 1, 0, 8, rng)
            # A burst in flight, then the server dies: each command completes, either
            # before the kill (success) or with a retryable status.
            cids = []
            for i in range(16):
                cid = h.next_cid()
                prp = BURST + i * 4096
                h.submit(1, h.sqe(0x02, cid, 1, prp, 0, (i * 8, 0, 7)), ring=False)
                cids.append(cid)
            h.ring(1, h.queues[1].tail)
            kit.kill()
            got = h.reap_cqes(1, 16, timeout=10)
            assert sorted(c.cid for c in got) == sorted(cids)
            for c in got:
                assert c.status == 0 or (c.code == Status.NAMESPACE_NOT_READY and not c.status & DNR_BIT), c
            # Server down: a retryable status (DNR clear), never a hang.
            c = h.io(1, 0x02, 1, 0, 8, WBUF)
            assert c.code == Status.NAMESPACE_NOT_READY and not c.status & DNR_BIT, c
            # The controller and the other namespace keep working meanwhile.
            _roundtrip(h, 2, 2, 100, 16, rng)
            kit.start()
            deadline = time.monotonic() + 10
            while True:           # the host retries, as Linux does for a status without DNR
                c = h.io(1, 0x02, 1, 0, 8, WBUF)
                if c.status == 0 or time.monotonic() > deadline:
                    break
                assert c.code == Status.NAMESPACE_NOT_READY and not c.status & DNR_BIT, c
                time.sleep(0.1)
            assert c.status == 0, c
            _roundtrip(h, 1, 1, 64, 16, rng)
    finally:
        try:
            finish_daemon(d)
        finally:
            kit.stop()


def _start_fails(run: str, *ns: str) -> tuple[int, str]:
    args = [sys.executable, os.path.join(ROOT, "bin", "vnvmed"), "--cores", "0", "--run-dir", run,
            "--log-level", "error", "--controller", f"nvme0={run}/nvme0.sock"]
    for spec in ns:
        args += ["--namespace", f"nvme0={spec}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    return r.returncode, (r.stdout + r.stderr).strip()


def test_bad_nbd_input_at_startup(run_dir: str) -> None:
    rc, out = _start_fails(run_dir, f"nbd:nbd+unix:///?socket={run_dir}/nobody.sock")
    assert rc == 2 and len(out.splitlines()) == 1, out
    assert "namespace 1 (nbd)" in out and "No such file" in out, out
    port_server = NbdServer.nbdkit_memory("1M").start()     # loopback TCP
    try:
        rc, out = _start_fails(run_dir, f"nbd:{port_server.uri},size=2M")
        assert rc == 2 and len(out.splitlines()) == 1, out
        assert "smaller than the configured 2097152" in out, out
    finally:
        port_server.stop()
    rc, out = _start_fails(run_dir, "nbd:http://example/x")
    assert rc == 2 and "is not an NBD URI" in out and len(out.splitlines()) == 1, out


def test_namespace_add_refuses_bad_exports(run_dir: str) -> None:
    kit = NbdServer.nbdkit_memory("4M", sock=os.path.join(run_dir, "kit.sock")).start()
    d = _daemon(run_dir, "ram:8M")
    try:
        def ctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, VNVMECTL, "--rpc", os.path.join(run_dir, "vnvmed.rpc"), *args],
                                  capture_output=True, text=True, timeout=30)
        with enabled_nvme(d.socket, (1,)) as h:
            rng = random.Random(2)
            r = ctl("namespace", "add", "nvme0", f"nbd:nbd+unix:///?socket={run_dir}/nobody.sock")
            assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            r = ctl("namespace", "add", "nvme0", f"nbd:{kit.uri},size=8M")
            assert r.returncode == 1 and "smaller than the configured" in r.stderr, r.stderr
            _roundtrip(h, 1, 1, 0, 8, rng)                    # nothing else disturbed
            r = ctl("namespace", "add", "nvme0", f"nbd:{kit.uri}", "--nsid", "2")
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 5
            while h.io(1, 0x02, 2, 0, 1, WBUF).code == Status.INVALID_NAMESPACE:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            _roundtrip(h, 1, 2, 0, 8, rng)
            _roundtrip(h, 1, 1, 8, 8, rng)
    finally:
        try:
            finish_daemon(d)
        finally:
            kit.stop()


def test_backend_availability_is_reported(run_dir: str) -> None:
    # A Python that cannot see Debian's bindings says so in --help: this interpreter's own
    # site-packages (the project's deps) without Debian's dist-packages (-S, PYTHONPATH).
    own = [p for p in site.getsitepackages() if "dist-packages" not in p]
    r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "bin", "vnvmed"), "--help"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *own])))
    assert r.returncode == 0, r.stderr
    assert f"backends on this host ({sys.executable})" in r.stdout
    assert "nbd   NO   libnbd Python binding not importable" in r.stdout
    assert "rbd   NO   Ceph Python bindings not importable" in r.stdout
    # ... and a daemon that can serve them says so through vnvmectl.
    d = _daemon(run_dir, "ram:8M")
    try:
        r = subprocess.run([sys.executable, VNVMECTL, "--rpc", os.path.join(run_dir, "vnvmed.rpc"), "backends"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
        assert set(rows) >= {"ram", "null", "file", "nbd", "rbd"}
        assert rows["nbd"].split()[1] == "yes" and "asynchronous" in rows["nbd"]
        assert ("io_uring" in rows["file"]) or ("thread pool" in rows["file"])
    finally:
        finish_daemon(d)


def _burst(h: HostNvme, qid: int, nsid: int, n: int, base: int = BURST) -> list[int]:
    """n reads submitted with one doorbell, not waited for; their CIDs."""
    cids = []
    for i in range(n):
        cid = h.next_cid()
        h.submit(qid, h.sqe(0x02, cid, nsid, base + i * 4096, 0, (i * 8, 0, 7)), ring=False)
        cids.append(cid)
    h.ring(qid, h.queues[qid].tail)
    return cids


def test_stalled_server_does_not_stall_the_worker(run_dir: str) -> None:
    """Two controllers on ONE worker: nvme1's NBD server stops (SIGSTOP) with 16 reads on it;
    nvme0 keeps doing I/O meanwhile; the reads complete once the server continues."""
    kit = NbdServer.nbdkit_memory("16M", sock=os.path.join(run_dir, "kit.sock")).start()
    args = ["--cores", "0", "--run-dir", run_dir, "--controller", f"nvme0={run_dir}/nvme0.sock",
            "--namespace", "nvme0=ram:16M", "--controller", f"nvme1={run_dir}/nvme1.sock",
            "--namespace", f"nvme1=nbd:{kit.uri}"]
    d = Daemon(args, run_dir).start()
    try:
        rng = random.Random(5)
        with enabled_nvme(d.socket, (1,)) as h0, \
                enabled_nvme(os.path.join(run_dir, "nvme1.sock"), (1,)) as h1:
            _roundtrip(h1, 1, 1, 0, 8, rng)
            kit.pause()
            cids = _burst(h1, 1, 1, 16)
            for i in range(200):                          # the other controller is served meanwhile
                _roundtrip(h0, 1, 1, (i * 8) % 32000, 8, rng)
            assert h1.poll_cqe(1) is None                 # still waiting for the stopped server
            # ... and the operator sees them outstanding on that namespace's engine
            r = subprocess.run([sys.executable, VNVMECTL, "--rpc", os.path.join(run_dir, "vnvmed.rpc"),
                                "stats", "nvme1", "--json"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            (w,) = json.loads(r.stdout)["controllers"]["nvme1"]["workers"].values()
            assert w["backends"]["1"]["engine"] == "NbdEngine" and w["backends"]["1"]["outstanding"] == 16, w
            kit.resume()
            got = h1.reap_cqes(1, 16, timeout=10)
            assert sorted(c.cid for c in got) == sorted(cids) and all(c.status == 0 for c in got)
    finally:
        try:
            finish_daemon(d)
        finally:
            kit.stop()


def test_quiesce_waits_for_backend_requests(run_dir: str) -> None:
    """A DMA map quiesces the controller: commands parked on a slow NBD server (300 ms per
    read) finish before the map is answered, none is lost or completed twice."""
    kit = NbdServer.nbdkit_memory("16M", sock=os.path.join(run_dir, "kit.sock"),
                                  extra=("--filter=delay",))
    kit.argv.append("rdelay=300ms")
    kit.start()
    d = _daemon(run_dir, f"nbd:{kit.uri}")
    try:
        with enabled_nvme(d.socket, (1,)) as h:
            cids = _burst(h, 1, 1, 8)
            t0 = time.monotonic()
            h.add_region(1 << 32, 1 << 20)                # DMA_MAP: quiesce, map, resume
            took = time.monotonic() - t0
            assert took >= 0.25, f"DMA_MAP answered after {took:.3f} s, before the reads finished"
            got = h.reap_cqes(1, 8, timeout=1)            # already posted
            assert sorted(c.cid for c in got) == sorted(cids) and all(c.status == 0 for c in got)
            assert h.poll_cqe(1) is None                  # exactly once
            assert h.rw(1, False, 1, 0, 8, WBUF) == 0  # and the controller goes on
    finally:
        try:
            finish_daemon(d)
        finally:
            kit.stop()
