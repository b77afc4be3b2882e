"""(6) SeaBIOS boots from a vfio-user namespace served by vnvmed.

The provisioned FAT/syslinux disk image (kernel + busybox initramfs whose
init prints VNV-BOOT-OK) is copied into a file namespace; the vfio-user device
gets bootindex=0 and there is no -kernel: everything the guest runs was read
by the firmware through our controller.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(240)]


def test_seabios_boots_from_vnvmed_namespace(tmp_path: Path, guest_env: harness.GuestEnv) -> None:
    img = tmp_path / "boot.img"
    shutil.copyfile(guest_env.bootdisk, img)
    with harness.vnvmed_controller([f"file:{img}"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], boot_disk=True, workdir=tmp_path,
                                daemon=daemon, timeout=180)
    res.expect(res.tagged("BOOT-OK"), "no VNV-BOOT-OK: SeaBIOS did not boot from the vfio-user namespace")
    res.expect(not res.timed_out and res.returncode == 0, "guest did not power off")
