"""`rbd:` namespaces through the real daemon against a real single-node Ceph cluster.

The cluster (tests/cephcluster.py: one monitor, one memstore OSD, cephx, pool size 1,
loopback) is started once for this module and torn down after it.  Data byte for
byte through the vfio-user socket; a user with its own keyring; bad input at
start-up (missing image, wrong credentials, an image smaller than configured, an
unreachable cluster: exit 2, one line) and from `vnvmectl namespace add`.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

from benchmarks.hostnvme import HostNvme
from tests.cephcluster import CephCluster, missing
from tests.daemon import Daemon
from tests.integration.conftest import enabled_nvme, finish_daemon

_BINDING = None if importlib.util.find_spec("rbd") and importlib.util.find_spec("rados") else \
    "Ceph Python bindings not importable by this interpreter (run under scripts/setup's .venv)"

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow,
              pytest.mark.skipif(missing() is not None or _BINDING is not None,
                                 reason=str(missing() or _BINDING))]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BS = 512
# Data buffers in the test host's guest RAM (64 MiB), far above its rings (allocated from 1 MiB).
WBUF, RBUF, DSMBUF, BURST = 0x1000000, 0x1400000, 0x1800000, 0x2000000


@pytest.fixture(scope="module")
def ceph() -> Iterator[CephCluster]:
    with CephCluster() as c:
        c.create_image("disk", 32 << 20)
        c.create_image("small", 4 << 20)
        yield c


@pytest.fixture
def run_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vrbd-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _argv(run: str, *ns: str) -> list[str]:
    args = ["--cores", "0", "--run-dir", run, "--controller", f"nvme0={run}/nvme0.sock"]
    for spec in ns:
        args += ["--namespace", f"nvme0={spec}"]
    return args


def _roundtrip(h: HostNvme, qid: int, nsid: int, slba: int, nblk: int, rng: random.Random) -> bytes:
    data = rng.randbytes(nblk * BS)
    h.fill(WBUF, data)
    h.fill(RBUF, b"\x5a" * len(data))
    assert h.rw(qid, True, nsid, slba, nblk, WBUF) == 0
    assert h.rw(qid, False, nsid, slba, nblk, RBUF) == 0
    assert h.read(RBUF, len(data)) == data
    return data


def test_rbd_data_zeroes_flush(ceph: CephCluster, run_dir: str) -> None:
    keyring = ceph.add_user("vnvmed")
    d = Daemon(_argv(run_dir, f"rbd:{ceph.target('disk')}&id=vnvmed&keyring={keyring}", "ram:8M"),
               run_dir).start()
    try:
        rng = random.Random(3)
        with enabled_nvme(d.socket, (1, 2)) as h:
            for slba, nblk in ((0, 1), (9, 8), (4096, 64), ((32 << 20) // BS - 256, 256)):
                _roundtrip(h, 1, 1, slba, nblk, rng)
            h.fill(WBUF, b"\xff" * 8 * BS)
            assert h.rw(2, True, 1, 40, 8, WBUF) == 0
            assert h.io(2, 0x08, 1, 40, 4).status == 0                           # Write Zeroes
            h.fill(DSMBUF, bytes(4) + (4).to_bytes(4, "little") + (44).to_bytes(8, "little"))
            assert h.command(2, 0x09, 1, DSMBUF, 0, (0, 1 << 2, 0)).status == 0   # deallocate
            assert h.rw(2, False, 1, 40, 8, RBUF) == 0
            assert h.read(RBUF, 8 * BS) == bytes(8 * BS)
            assert h.command(2, 0x00, 1).status == 0                              # Flush
            data = _roundtrip(h, 1, 1, 8192, 8, rng)
            _roundtrip(h, 2, 2, 0, 8, rng)
    finally:
        finish_daemon(d)
    # What the guest wrote is in the image, read back through librbd directly.
    import rados
    import rbd as rbdmod
    with rados.Rados(conffile=ceph.conf) as cl, cl.open_ioctx("rbd") as io, rbdmod.Image(io, "disk") as img:
        assert img.read(8192 * BS, len(data)) == data


def _start(run: str, *ns: str) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "vnvmed"), "--log-level", "error",
                        *_argv(run, *ns)], capture_output=True, text=True, timeout=90, env=env)
    return r.returncode, (r.stdout + r.stderr).strip()


def test_bad_rbd_input_at_startup(ceph: CephCluster, run_dir: str) -> None:
    for spec, why in ((f"rbd:{ceph.target('nope')}", "image 'nope' does not exist"),
                      (f"rbd:{ceph.target('disk')}&id=bogus", "permission denied for client.bogus"),
                      (f"rbd:{ceph.target('small')},size=8M", "smaller than the configured 8388608"),
                      (f"rbd:nopool/disk?conf={ceph.conf}", "pool 'nopool' does not exist"),
                      ("rbd:rbd/disk?conf=/nonexistent.conf", "does not exist")):
        rc, out = _start(run_dir, spec)
        assert rc == 2 and len(out.splitlines()) == 1 and why in out, (spec, rc, out)


def test_namespace_add_rbd(ceph: CephCluster, run_dir: str) -> None:
    d = Daemon(_argv(run_dir, "ram:8M"), run_dir).start()
    try:
        def ctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "vnvmectl"),
                                   "--rpc", os.path.join(run_dir, "vnvmed.rpc"), *args],
                                  capture_output=True, text=True, timeout=60)
        r = ctl("namespace", "add", "nvme0", f"rbd:{ceph.target('disk')}&id=bogus")
        assert r.returncode == 1 and "permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = ctl("namespace", "add", "nvme0", f"rbd:{ceph.target('nope')}")
        assert r.returncode == 1 and "does not exist" in r.stderr
        r = ctl("namespace", "add", "nvme0", f"rbd:{ceph.target('small')}", "--nsid", "5")
        assert r.returncode == 0, r.stderr
        with enabled_nvme(d.socket, (1,)) as h:
            rng = random.Random(4)
            _roundtrip(h, 1, 5, 0, 16, rng)
            _roundtrip(h, 1, 1, 0, 16, rng)
    finally:
        finish_daemon(d)
