"""Guest image and provisioning smoke test with QEMU's OWN emulated NVMe.

Independent of vnvmed: if these fail, the problem is the QEMU build, the guest
kernel/initramfs or the harness, not our server.  The same workloads then run
against vnvmed in the other test files.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]
ENV = harness.provision()

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
                            extra=builtin_nvme(blank(tmp_path)), timeout=60)
    res.assert_ok()
    attrs = {ln.words()[0] + "." + ln.rest.split(" ", 1)[1].split("=", 1)[0]:
             ln.rest.split("=", 1)[1] for ln in res.tagged("ATTR")}
    res.expect(attrs.get("nvme0.serial") == SERIAL, f"serial: {attrs}")
    res.expect(attrs.get("nvme0.model") == "QEMU NVMe Ctrl", f"model: {attrs}")
    res.expect(attrs.get("nvme0.state") == "live", f"state: {attrs}")
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
                            extra=builtin_nvme(img), timeout=60)
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


def test_seabios_boots_bootdisk_from_builtin_nvme(tmp_path: Path) -> None:
    img = tmp_path / "boot.img"
    shutil.copyfile(ENV.bootdisk, img)
    res = harness.run_guest(boot_disk=True, workdir=tmp_path,
                            extra=builtin_nvme(img, bootindex=0), timeout=60)
    res.expect(res.tagged("BOOT-OK"), "no VNV-BOOT-OK marker")
    res.expect(not res.timed_out and res.returncode == 0, "guest did not power off")
