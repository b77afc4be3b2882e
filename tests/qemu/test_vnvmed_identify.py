"""(1) A real Linux guest identifies a vnvmed controller as configured.

bin/vnvmed --cores 0 --controller nvme0=SOCK --namespace nvme0=ram:64M
--namespace nvme0=file:IMG, then QEMU's vfio-user-pci client and the guest's
nvme driver: serial, model, namespace count and sizes must be what vnvmed
was told (serial/model have no flags: the daemon's defaults apply; the
config-file test sets them explicitly).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(180)]

RAM_BYTES = 64 << 20
FILE_BYTES = 32 << 20


def default_identity(name: str) -> tuple[str, str]:
    """The serial/model vnvmed gives a controller configured by flags only."""
    from ops import config
    return config._default_serial(name), config.ControllerSpec(name, "").model


def check_namespaces(res: harness.GuestResult, expected: dict[int, tuple[int, int]]) -> None:
    """expected: nsid -> (bytes, logical block size), seen through sysfs and Identify Namespace."""
    seen = {int(ln.kv()["nsid"]): ln for ln in res.tagged("NS")}
    res.expect(sorted(seen) == sorted(expected), f"namespaces: got nsids {sorted(seen)}, want {sorted(expected)}")
    for nsid, (size, lbs) in expected.items():
        ln = seen[nsid]
        kv = ln.kv()
        res.expect(int(kv["bytes"]) == size, f"nsid {nsid}: {kv['bytes']} bytes, want {size}")
        res.expect(int(kv["lbs"]) == lbs, f"nsid {nsid}: block size {kv['lbs']}, want {lbs}")
        (idns,) = res.json("id-ns", ln.words()[0])
        ds = idns["lbafs"][idns["flbas"] & 0xF]["ds"]
        res.expect((idns["nsze"] << ds) == size and (1 << ds) == lbs,
                   f"nsid {nsid}: id-ns nsze={idns['nsze']} ds={ds}")


def test_identify_flags(tmp_path: Path) -> None:
    img = tmp_path / "ns2.img"
    with open(img, "wb") as f:
        f.truncate(FILE_BYTES)
    with harness.vnvmed_controller(["ram:64M", f"file:{img}"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="info", args={"nns": 2},
                                workdir=tmp_path, daemon=daemon, timeout=120)
    res.assert_ok()
    serial, model = default_identity("nvme0")
    attrs = res.attrs().get("nvme0", {})
    res.expect(attrs.get("serial") == serial, f"serial {attrs.get('serial')!r}, want {serial!r}")
    res.expect(attrs.get("model") == model, f"model {attrs.get('model')!r}, want {model!r}")
    res.expect(attrs.get("state") == "live", f"controller state {attrs.get('state')!r}")
    (ctrl,) = res.json("id-ctrl", "nvme0")
    res.expect(ctrl["sn"].rstrip() == serial and ctrl["mn"].rstrip() == model,
               f"id-ctrl sn={ctrl['sn']!r} mn={ctrl['mn']!r}")
    res.expect(ctrl["nn"] >= 2, f"id-ctrl nn={ctrl['nn']}")
    res.expect(any("Non-Volatile memory controller" in ln.rest for ln in res.tagged("LSPCI")),
               "lspci shows no NVMe function")
    check_namespaces(res, {1: (RAM_BYTES, 512), 2: (FILE_BYTES, 512)})


def test_identify_config_file(tmp_path: Path) -> None:
    rd = harness.short_tmpdir()
    sock = rd / "e2e.sock"
    cfg = rd / "vnvmed.toml"
    cfg.write_text(f'''
[[controllers]]
name = "e2e"
socket = "{sock}"
serial = "VNV-E2E-0042"
model = "vnvmed end-to-end model"

[[controllers.namespaces]]
kind = "ram"
size = "16M"
block_size = 4096
''')
    try:
        with harness.start_vnvmed(["--cores", "0", "--config", str(cfg)], run_dir=rd / "run",
                                  log_path=rd / "vnvmed.log") as daemon:
            res = harness.run_guest(devices=[sock], workload="info", args={"nns": 1},
                                    workdir=tmp_path, daemon=daemon, timeout=120)
    finally:
        import shutil
        shutil.rmtree(rd, ignore_errors=True)
    res.assert_ok()
    attrs = res.attrs().get("nvme0", {})
    res.expect(attrs.get("serial") == "VNV-E2E-0042", f"serial {attrs.get('serial')!r}")
    res.expect(attrs.get("model") == "vnvmed end-to-end model", f"model {attrs.get('model')!r}")
    check_namespaces(res, {1: (16 << 20, 4096)})
