"""(2) Data integrity through vnvmed from a real guest.

O_DIRECT write / read back / sha256 compare on every namespace (ram and file,
at the start and the far end of each); for the file namespace the host file
must hold exactly what the guest wrote.  Then fio random writes with
verify=crc32c, one job per vCPU so both I/O queues carry I/O, IOPS reported.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(240)]


def test_dd_direct_every_namespace(tmp_path: Path) -> None:
    img = tmp_path / "ns2.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    with harness.vnvmed_controller(["ram:64M", f"file:{img}"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="dd", args={"mb": 8, "nns": 2},
                                workdir=tmp_path, daemon=daemon, timeout=180)
    res.assert_ok()
    dds = res.tagged("DD")
    by_nsid: dict[str, list[harness.VnvLine]] = {}
    for d in dds:
        by_nsid.setdefault(d.kv()["nsid"], []).append(d)
    res.expect(sorted(by_nsid) == ["1", "2"] and all(len(v) == 2 for v in by_nsid.values()),
               f"expected 2 regions on each of nsid 1 and 2: {dds}")
    res.expect(all(d.kv()["ok"] == "1" for d in dds), "read-back mismatch")
    data = img.read_bytes()
    for d in by_nsid["2"]:
        kv = d.kv()
        off, n = int(kv["seek_mib"]) << 20, int(kv["mib"]) << 20
        res.expect(hashlib.sha256(data[off:off + n]).hexdigest() == kv["written"],
                   f"backing file at {off:#x} does not hold the guest's data")


def test_fio_randwrite_verify_two_queues(tmp_path: Path) -> None:
    with harness.vnvmed_controller(["ram:64M"]) as (daemon, sock):
        res = harness.run_guest(devices=[sock], workload="fio",
                                args={"mb": 8, "rt": 20, "nns": 1},
                                workdir=tmp_path, daemon=daemon, timeout=180)
    iops = harness.expect_fio_verify_two_queues(res)
    print(f"vnvmed fio 4k randwrite, 2 jobs, TCG guest: {iops} IOPS")
