"""Guest image and provisioning smoke test with QEMU's OWN emulated NVMe.

Independent of vnvmed: if these fail, the problem is the QEMU build, the guest
kernel/initramfs or the harness, not our server.  The same workloads then run
against vnvmed in the other test files.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(200)]

SERIAL = "vnvsmoke01"
DISK_BYTES = 64 << 20


def builtin_nvme(img: Path, serial: str = SERIAL, bootindex: int | None = None) -> list[str]:
    dev = f"nvme,serial={serial},drive=d0"
    if bootindex is not None:
        dev += f",bootindex={bootindex}"
    return ["-drive", f"file={img},if=none,id=d0,format=raw,aio=threads", "-device", dev]


def blank(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_BYTES)
    return img


def test_info_sees_builtin_controller(tmp_path: Path) -> None:
    res = harness.run_guest(workload="info", args={"nns": 1}, workdir=tmp_path,
                            extra=builtin_nvme(blank(tmp_path)), timeout=150)
    res.assert_ok()
    attrs = res.attrs().get("nvme0", {})
    res.expect(attrs.get("serial") == SERIAL, f"serial: {attrs}")
    res.expect(attrs.get("model") == "QEMU NVMe Ctrl", f"model: {attrs}")
    res.expect(attrs.get("state") == "live", f"state: {attrs}")
    ns = res.tagged("NS")
    res.expect(len(ns) == 1, f"namespaces: {ns}")
    res.expect(int(ns[0].kv()["bytes"]) == DISK_BYTES, f"namespace size: {ns[0]}")
    (ctrl,) = res.json("id-ctrl", "nvme0")
    res.expect(ctrl["sn"].strip() == SERIAL, f"id-ctrl sn {ctrl['sn']!r}")
    (idns,) = res.json("id-ns", "nvme0n1")
    lbads = idns["lbafs"][idns["flbas"] & 0xF]["ds"]
    res.expect(idns["nsze"] << lbads == DISK_BYTES, f"id-ns nsze={idns['nsze']} ds={lbads}")
    # Linux makes one I/O queue per vCPU: 2 I/O queues + the admin queue.
    queues = {ln.kv()["queue"] for ln in res.tagged("IRQ")}
    res.expect({"nvme0q0", "nvme0q1", "nvme0q2"} <= queues, f"queues {queues}")


def test_dd_direct_roundtrip_reaches_backing_file(tmp_path: Path) -> None:
    img = blank(tmp_path)
    res = harness.run_guest(workload="dd", args={"mb": 8, "nns": 1}, workdir=tmp_path,
                            extra=builtin_nvme(img), timeout=150)
    res.assert_ok()
    dds = res.tagged("DD")
    # Two regions: the start and the far end of the namespace.
    res.expect(len(dds) == 2 and all(d.kv()["ok"] == "1" for d in dds), f"dd lines {dds}")
    data = img.read_bytes()
    for d in dds:
        kv = d.kv()
        off, n = int(kv["seek_mib"]) << 20, int(kv["mib"]) << 20
        got = hashlib.sha256(data[off:off + n]).hexdigest()
        res.expect(got == kv["written"], f"host file at {off:#x} does not hold what the guest wrote")


def test_seabios_boots_bootdisk_from_builtin_nvme(tmp_path: Path, guest_env: harness.GuestEnv) -> None:
    img = tmp_path / "boot.img"
    shutil.copyfile(guest_env.bootdisk, img)
    res = harness.run_guest(boot_disk=True, workdir=tmp_path,
                            extra=builtin_nvme(img, bootindex=0), timeout=150)
    res.expect(res.tagged("BOOT-OK"), "no VNV-BOOT-OK marker")
    res.expect(not res.timed_out and res.returncode == 0, "guest did not power off")


def test_fio_verify_uses_two_io_queues(tmp_path: Path) -> None:
    res = harness.run_guest(workload="fio", args={"mb": 8, "rt": 10, "nns": 1}, workdir=tmp_path,
                            extra=builtin_nvme(blank(tmp_path)), timeout=150)
    res.assert_ok()
    (doc,) = res.json("fio")
    job = doc["jobs"][0]
    res.expect(job["error"] == 0 and job["write"]["iops"] > 0, f"fio job: error={job['error']}")
    res.expect(int(res.first("FIO").kv()["write_iops"]) > 0, "no IOPS reported")
    delta = res.irq_delta()
    res.expect(delta.get("nvme0q1", 0) > 0 and delta.get("nvme0q2", 0) > 0,
               f"both I/O queues should complete I/O: {delta}")


def test_reset_mid_workload_then_verify(tmp_path: Path) -> None:
    res = harness.run_guest(workload="reset", args={"mb": 8, "rate": 500, "nns": 1},
                            workdir=tmp_path, extra=builtin_nvme(blank(tmp_path)), timeout=150)
    res.assert_ok()
    kv = res.first("RESET").kv()
    res.expect(kv["rc"] == "0" and kv["busy"] == "1", f"reset during I/O: {kv}")
    res.expect(res.first("RESET-VERIFY").kv()["rc"] == "0", "verify pass after reset failed")


def test_clean_shutdown(tmp_path: Path) -> None:
    res = harness.run_guest(workload="shutdown", args={"nns": 1}, workdir=tmp_path,
                            extra=builtin_nvme(blank(tmp_path)), timeout=150)
    res.assert_ok()
    tail = res.after_end()
    res.expect("reboot: Power down" in tail, "guest did not power off")
    res.expect(not re.search(r"nvme.*(shutdown|timeout|abort)", tail, re.I),
               "nvme shutdown complained")
