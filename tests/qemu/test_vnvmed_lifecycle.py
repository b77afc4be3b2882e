"""(3)(4)(5) Controller life cycle under a real guest.

(3) `nvme reset` while fio writes, then a full verify pass.
(4) Clean shutdown: the kernel's poweroff path writes CC.SHN and waits for
    CSTS.SHST; a controller that never reports it makes the driver log an
    error after its shutdown timeout, so the console after VNV-END must be
    free of nvme complaints.
(5) kill -9 of QEMU mid-I/O: vnvmed survives, and a new QEMU on the same
    socket works again.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(240)]


def test_reset_mid_workload(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:64M"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="reset",
                                args={"mb": 8, "rate": 300, "nns": 1},
                                workdir=tmp_path, daemon=daemon, timeout=180)
    res.assert_ok()
    kv = res.first("RESET").kv()
    res.expect(kv["rc"] == "0", f"nvme reset failed: {kv}")
    res.expect(kv["busy"] == "1", "fio had already finished when the reset was issued")
    res.expect(res.first("RESET-FIO").kv()["rc"] == "0", "fio across the reset failed")
    res.expect(res.first("RESET-VERIFY").kv()["rc"] == "0", "verify pass after the reset failed")


def test_clean_shutdown_reaches_shst(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:16M"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="shutdown", args={"nns": 1},
                                workdir=tmp_path, daemon=daemon, timeout=120)
        alive = daemon.proc.poll() is None
        log = daemon.log()
    res.assert_ok()
    res.expect("shutdown complete (CSTS.SHST=10b)" in log,
               "vnvmed never reported CSTS.SHST=10b for the guest's shutdown notification")
    tail = res.after_end()
    res.expect("reboot: Power down" in tail, "guest did not reach power-off")
    res.expect(not re.search(r"nvme.*(shutdown|timeout|abort|not ready)", tail, re.I),
               "nvme driver complained during shutdown (CSTS.SHST never reported?)")
    res.expect(alive, "vnvmed died when the guest shut its controller down")


@pytest.mark.timeout(420)
def test_kill9_qemu_then_new_qemu_same_socket(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:64M"]) as (daemon, sock):
        first = harness.start_guest(devices=[sock], workload="fio",
                                    args={"mb": 8, "rt": 60, "frate": 200, "nns": 1},
                                    workdir=tmp_path / "first", daemon=daemon)
        with first:
            first.wait_for("WL", timeout=120)
            time.sleep(2)  # let I/O be in flight
            first.kill()
        r1 = first.result()
        r1.expect(r1.returncode == -9, f"QEMU was not killed by SIGKILL (rc={r1.returncode})")
        r1.expect(daemon.proc.poll() is None, "vnvmed died with its client")
        res = harness.run_guest(devices=[sock], workload="dd", args={"mb": 4, "nns": 1},
                                workdir=tmp_path / "second", daemon=daemon, timeout=150)
        res.assert_ok()
        res.expect(res.tagged("DD") and all(d.kv()["ok"] == "1" for d in res.tagged("DD")),
                   "dd after reconnect failed")
        res.expect(daemon.proc.poll() is None, "vnvmed died")
