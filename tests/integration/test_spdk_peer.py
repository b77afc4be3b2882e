"""The SPDK peer of benchmarks/compare.py, for real: SPDK's vfio-user target served to our
benchmark client, and SPDK's spdk_nvme_perf driving vnvmed.  Needs an SPDK build with
vfio-user in $SPDK_DIR (never part of this repository, see benchmarks/README.md) and, for
spdk_nvme_perf, free hugepages; skipped with that reason otherwise.
"""
from __future__ import annotations

import tempfile

import pytest

from ops.perf import run, spawn_vnvmed
from ops.perfdrv import Workload
from benchmarks.spdkpeer import SpdkTarget, spdk_dir, spdk_perf, spdk_perf_available

pytestmark = pytest.mark.timeout(180)


@pytest.mark.skipif(spdk_dir() is None, reason="SPDK_DIR does not point to an SPDK build with vfio-user")
@pytest.mark.parametrize("doorbells", ["batch", "per-cmd"])
def test_py_client_against_spdk_target(doorbells):
    with tempfile.TemporaryDirectory() as tmp:
        t = SpdkTarget(spdk_dir(), "ram", 0, tmp)
        try:
            rep = run(t.sock, Workload("randrw", 4096, 8, 0.5, read_pct=50, span=64 << 20,
                                       doorbells=doorbells))
        finally:
            t.stop()
    assert rep["errors"] == 0 and rep["ios"] > 8


@pytest.mark.skipif(spdk_perf_available() is not None, reason=str(spdk_perf_available()))
def test_spdk_nvme_perf_against_vnvmed():
    sp = spawn_vnvmed("ram:64M", None, sock_name="cntrl")
    try:
        rep = spdk_perf(sp.tmp.name, "nqn.2024-01.io.vnvmed:nvme0", "randread", 4096, 4, 1, 1)
    finally:
        sp.stop()
    assert rep["iops"] > 0 and rep["lat_us"]["mean"] > 0
