"""A Linux guest runs fio with verify on an `nbd:` and on an `rbd:` namespace.

The guest's nvme driver does 4 KiB random writes then verifying reads on two I/O
queues (tests/qemu/guest, workload `fio`); every command reaches the NBD server
(nbdkit, memory plugin) or the Ceph cluster (tests/cephcluster.py) through the
worker's asynchronous backend.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.cephcluster import CephCluster
from tests.cephcluster import missing as ceph_missing
from tests.nbdserver import NbdServer
from tests.nbdserver import missing as nbd_missing
from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(420)]

_NO_RBD = ceph_missing() or (None if importlib.util.find_spec("rbd") else
                             "Ceph Python bindings not importable (run under scripts/setup's .venv)")


@pytest.mark.skipif(nbd_missing() is not None, reason=str(nbd_missing()))
def test_fio_verify_on_nbd(tmp_path: Path) -> None:
    d = harness.short_tmpdir("vnbd-")
    try:
        with NbdServer.nbdkit_memory("64M", sock=str(d / "nbd.sock")) as srv, \
                harness.vnvmed_controller([f"nbd:{srv.uri}"]) as (daemon, sock):
            res = harness.run_guest(devices=[sock], workload="fio", args={"mb": 8, "rt": 10, "nns": 1},
                                    workdir=tmp_path, daemon=daemon, timeout=240)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    iops = harness.expect_fio_verify_two_queues(res)
    print(f"vnvmed nbd: (nbdkit memory), fio 4k randwrite + verify, TCG guest: {iops} IOPS")


@pytest.mark.skipif(_NO_RBD is not None, reason=str(_NO_RBD))
def test_fio_verify_on_rbd(tmp_path: Path) -> None:
    with CephCluster() as c:
        c.create_image("guest", 64 << 20)
        with harness.vnvmed_controller([f"rbd:{c.target('guest')}"]) as (daemon, sock):
            res = harness.run_guest(devices=[sock], workload="fio", args={"mb": 8, "rt": 10, "nns": 1},
                                    workdir=tmp_path, daemon=daemon, timeout=240)
    iops = harness.expect_fio_verify_two_queues(res)
    print(f"vnvmed rbd: (one memstore OSD), fio 4k randwrite + verify, TCG guest: {iops} IOPS")
