"""Firmware boot times from a vnvmed namespace next to QEMU's built-in nvme, same guest.

    python -m benchmarks.boottime [-n 3] [--images bootdisk,mbrdisk,gptdisk,uefidisk] [--json-out F]

Boots each provisioned disk image (tests/qemu/provision: SeaBIOS superfloppy, MBR and
GPT disks, OVMF EFI system partition; same kernel and busybox initramfs in all) under
TCG, alternately from a vnvmed controller (vfio-user-pci, bootindex 0) and from QEMU's
own `-device nvme` on a copy of the same image, n times each.  Printed per image and
device: median wall seconds from QEMU's start to the guest's VNV-BOOT-OK line, the
kernel's uptime at that line (so firmware + boot loader = the difference), and for
vnvmed the commands that went by DMA message (message-write windows).  Wall time is
disturbed by other load on the machine: runs alternate so both devices see the same.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.qemu import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("bootdisk", "mbrdisk", "gptdisk", "uefidisk")


def slow_commands(daemon: harness.Vnvmed) -> int:
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "vnvmectl"), "--rpc", daemon.rpc,
                          "--json", "stats", "nvme0"], capture_output=True, text=True, timeout=30)
    return int(json.loads(out.stdout)["controllers"]["nvme0"]["controller"]["slow_commands"])


def one_boot(env: harness.GuestEnv, wd: Path, uefi: bool, devices: list[Path],
             extra: list[str], daemon: harness.Vnvmed | None) -> tuple[float, float]:
    """(wall s to VNV-BOOT-OK, kernel uptime s at it)."""
    wd.mkdir(parents=True)
    t0 = time.monotonic()
    with harness.start_guest(devices=devices, boot_disk=True, uefi=uefi, workdir=wd, extra=extra,
                             env=env, daemon=daemon) as guest:
        line = guest.wait_for("BOOT-OK", timeout=300)
        wall = time.monotonic() - t0
        res = guest.wait(60)
    res.expect(not res.timed_out and res.returncode == 0, "guest did not power off")
    return wall, float(line.kv()["uptime"])


def bench(env: harness.GuestEnv, image: str, n: int, tmp: Path) -> dict[str, Any]:
    src = getattr(env, image)
    uefi = image == "uefidisk"
    ours, theirs = tmp / f"{image}-vnvmed.img", tmp / f"{image}-qemu.img"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    builtin = ["-drive", f"file={theirs},if=none,id=d0,format=raw,aio=threads",
               "-device", "nvme,serial=vnvboot,drive=d0,bootindex=0"]
    runs: dict[str, list[tuple[float, float]]] = {"vnvmed": [], "qemu-nvme": []}
    with harness.vnvmed_controller([f"file:{ours}"]) as (daemon, sock):
        for i in range(n):
            runs["vnvmed"].append(one_boot(env, tmp / f"{image}-v{i}", uefi, [sock], [], daemon))
            runs["qemu-nvme"].append(one_boot(env, tmp / f"{image}-q{i}", uefi, [], builtin, None))
        slow = slow_commands(daemon) // n
    out: dict[str, Any] = {"image": image, "slow_commands_per_boot": slow}
    for dev, rs in runs.items():
        out[dev] = {"wall_s": [round(w, 2) for w, _ in rs], "kernel_uptime_s": [k for _, k in rs],
                    "median_wall_s": round(statistics.median(w for w, _ in rs), 2),
                    "median_firmware_s": round(statistics.median(w - k for w, k in rs), 2)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=3, help="boots per image and device")
    p.add_argument("--images", default=",".join(IMAGES))
    p.add_argument("--json-out")
    a = p.parse_args()
    env = harness.provision()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vnv-boottime-") as tmp:
        for image in a.images.split(","):
            if image not in IMAGES:
                p.error(f"unknown image {image!r}: {', '.join(IMAGES)}")
            rows.append(bench(env, image, a.n, Path(tmp)))
            r = rows[-1]
            v, q = r["vnvmed"], r["qemu-nvme"]
            print(f"{image:9s} vnvmed {v['median_wall_s']:6.2f} s (firmware+loader {v['median_firmware_s']:5.2f} s, "
                  f"{r['slow_commands_per_boot']} commands by message)   qemu nvme {q['median_wall_s']:6.2f} s "
                  f"(firmware+loader {q['median_firmware_s']:5.2f} s)   ratio {v['median_wall_s'] / q['median_wall_s']:.2f}",
                  flush=True)
    load = os.getloadavg()
    print(f"(median of {a.n} alternating boots each; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"runs": rows, "n": a.n, "loadavg": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
