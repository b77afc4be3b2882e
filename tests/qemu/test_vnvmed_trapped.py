"""A Linux guest on a controller in trapped-doorbell mode (`--doorbells NAME=trapped`).

BAR0 is not mmapped: every doorbell write the guest makes reaches vnvmed as a
vfio-user REGION_WRITE and wakes the worker, and Linux uses shadow doorbells +
EventIdx for its I/O queues, so it only traps when a sleeping worker asked for it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(300)]


def test_fio_verify_with_trapped_doorbells(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:64M"], extra=["--doorbells", "nvme0=trapped"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="fio",
                                args={"mb": 8, "rt": 10, "nns": 1},
                                workdir=tmp_path, daemon=daemon, timeout=180)
    iops = harness.expect_fio_verify_two_queues(res)
    print(f"vnvmed trapped doorbells, fio 4k randwrite, TCG guest: {iops} IOPS")
