"""Firmware boots from a vnvmed namespace, under TCG (issue 16).

- SeaBIOS, MBR disk: syslinux's MBR code runs at 0x7c00, moves itself to 0x600 and
  reads the active partition's boot sector over 0x7c00.  Under TCG that only works if
  the read reaches guest memory through QEMU (a DMA_WRITE message): a store into the
  shared memfd leaves TCG running the MBR it translated before.  The controller's
  message-write window (default: below 1 MiB) routes it so; the test checks that the
  slow path carried commands.
- SeaBIOS, GPT disk: syslinux's gptmbr.bin does the same from a protective MBR, finding
  the partition marked "legacy BIOS bootable".
- OVMF: the firmware's own NVMe driver finds the namespace (bootindex 0) and loads
  \\EFI\\BOOT\\BOOTX64.EFI (a unified kernel image) from its EFI system partition.

Every image holds the same kernel and a busybox initramfs whose init prints
VNV-BOOT-OK and powers off; nothing is passed with -kernel.  The boot time of each
run is printed (pytest -s); benchmarks/boottime.py compares with QEMU's own nvme.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def controller_stats(daemon: harness.Vnvmed) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "vnvmectl"), "--rpc", daemon.rpc,
                          "--json", "stats", "nvme0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["controllers"]["nvme0"]["controller"]


def boot(tmp_path: Path, image: str, *, uefi: bool = False, timeout: float = 240
         ) -> tuple[harness.GuestResult, dict]:
    img = tmp_path / "disk.img"
    shutil.copyfile(image, img)
    with harness.vnvmed_controller([f"file:{img}"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], boot_disk=True, uefi=uefi, workdir=tmp_path,
                                daemon=daemon, timeout=timeout)
        stats = controller_stats(daemon)
    res.expect(res.tagged("BOOT-OK"), "no VNV-BOOT-OK: the firmware did not boot the namespace")
    res.expect(not res.timed_out and res.returncode == 0, "guest did not power off")
    print(f"\n{Path(image).name}: powered off {res.elapsed:.1f} s after QEMU started "
          f"(kernel up at {res.first('BOOT-OK').kv()['uptime']} s), "
          f"slow-path commands {stats['slow_commands']}")
    return res, stats


def test_seabios_boots_mbr_partitioned_disk(tmp_path: Path, guest_env: harness.GuestEnv) -> None:
    res, stats = boot(tmp_path, guest_env.mbrdisk)
    # The MBR read the boot sector into 0x7c00, and syslinux reads everything through
    # real-mode buffers below 1 MiB: those commands ran on the message path.
    res.expect(stats["slow_commands"] > 0, f"no command went by DMA message: {stats}")


def test_seabios_boots_gpt_disk(tmp_path: Path, guest_env: harness.GuestEnv) -> None:
    res, stats = boot(tmp_path, guest_env.gptdisk)
    res.expect(stats["slow_commands"] > 0, f"no command went by DMA message: {stats}")


def test_ovmf_boots_from_vnvmed_namespace(tmp_path: Path, guest_env: harness.GuestEnv) -> None:
    res, _ = boot(tmp_path, guest_env.uefidisk, uefi=True)
    # OVMF's boot manager chose our controller's namespace by itself (bootindex 0).
    res.expect("UEFI vnvmed NVMe controller" in res.console,
               "OVMF did not name the vnvmed namespace as the boot option it started")
