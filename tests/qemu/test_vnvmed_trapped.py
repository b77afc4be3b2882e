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
ENV = harness.provision()


def test_fio_verify_with_trapped_doorbells(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:64M"], extra=["--doorbells", "nvme0=trapped"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="fio",
                                args={"mb": 8, "rt": 10, "nns": 1},
                                workdir=tmp_path, daemon=daemon, timeout=180)
    res.assert_ok()
    (doc,) = res.json("fio")
    job = doc["jobs"][0]
    res.expect(job["error"] == 0, f"fio error {job['error']}")
    res.expect(job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0,
               "fio did no write or no verify reads")
    delta = res.irq_delta()
    res.expect(delta.get("nvme0q1", 0) > 0 and delta.get("nvme0q2", 0) > 0,
               f"both I/O queues should complete I/O: {delta}")
    print(f"vnvmed trapped doorbells, fio 4k randwrite, TCG guest: "
          f"{res.first('FIO').kv()['write_iops']} IOPS")
