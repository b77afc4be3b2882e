"""Two namespaces on one controller, each addressed by its NSID (issue 16).

The controller gets NSID 7 (24 MiB, 4 KiB blocks) listed before NSID 3 (40 MiB, 512 B
blocks), each on its own backing file.  The guest (workload ``nsmark``) stamps block 0
of every namespace block device with the NSID Linux reports for it in sysfs, and asks
the controller for Identify Namespace *by NSID* (``nvme id-ns -n``).  The host then
checks, per NSID, that the block device Linux bound to it has that namespace's size and
block size, that Identify by NSID agrees, and that the stamp landed in the backing file
configured for that NSID - device names and their order are never assumed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(240)]

MB = 1 << 20
NAMESPACES = {7: (24 * MB, 4096), 3: (40 * MB, 512)}     # nsid -> (bytes, block size), file order


def test_two_namespaces_each_addressed_by_nsid(tmp_path: Path) -> None:
    rd = harness.short_tmpdir()
    try:
        files = {}
        toml = [f'run_dir = "{rd}/run"', "[[controllers]]", 'name = "nvme0"', f'socket = "{rd}/nvme0.sock"']
        for nsid, (size, bs) in NAMESPACES.items():
            files[nsid] = tmp_path / f"ns{nsid}.img"
            with open(files[nsid], "wb") as f:
                f.truncate(size)
            toml += ["[[controllers.namespaces]]", 'kind = "file"', f'path = "{files[nsid]}"',
                     f"nsid = {nsid}", f"block_size = {bs}"]
        cfg = tmp_path / "vnvmed.toml"
        cfg.write_text("\n".join(toml) + "\n")
        with harness.start_vnvmed(["--cores", "0", "--config", str(cfg)], run_dir=rd / "run",
                                  log_path=rd / "vnvmed.log") as daemon:
            res = harness.run_guest(devices=[rd / "nvme0.sock"], workload="nsmark", args={"nns": 2},
                                    workdir=tmp_path, daemon=daemon, timeout=180)
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    res.assert_ok()
    marks = {int(m.kv()["nsid"]): m for m in res.tagged("NSMARK")}
    res.expect(sorted(marks) == sorted(NAMESPACES), f"NSIDs the guest saw: {sorted(marks)}")
    for nsid, (size, bs) in NAMESPACES.items():
        kv = marks[nsid].kv()
        res.expect(int(kv["bytes"]) == size and int(kv["lbs"]) == bs,
                   f"NSID {nsid}: block device {marks[nsid].words()[0]} has {kv}, configured {size} B / {bs} B")
        (idns,) = res.json("id-ns-by-nsid", str(nsid))
        lbads = idns["lbafs"][idns["flbas"] & 0xF]["ds"]
        res.expect(idns["nsze"] << lbads == size and 1 << lbads == bs,
                   f"Identify NSID {nsid}: nsze={idns['nsze']} ds={lbads}")
        stamp = f"VNV-NSID={nsid};".encode()
        res.expect(kv["readback"] == stamp.decode(), f"NSID {nsid}: read back {kv['readback']!r}")
        head = files[nsid].read_bytes()[:len(stamp)]
        res.expect(head == stamp, f"backing file of NSID {nsid} starts with {head!r}, not {stamp!r}")
