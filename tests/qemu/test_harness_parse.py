"""Fast checks of the harness's console parsing and QEMU argument building (no QEMU)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.qemu import harness


def result(console: str) -> harness.GuestResult:
    return harness.GuestResult(console=console, lines=harness.parse_console(console),
                               returncode=0, timed_out=False, elapsed=0.0, workdir=Path("."))


def test_marker_after_firmware_escape_junk_is_found() -> None:
    res = result("Probing EDD (edd=off to disable)... oc\x1b[?7l\x1b[2JVNV-BOOT-OK uptime=1.0\r\n")
    assert [(ln.tag, ln.kv()) for ln in res.lines] == [("BOOT-OK", {"uptime": "1.0"})]


def test_json_line_with_tool_warning_prefix_parses() -> None:
    res = result('VNV-JSON fio nvme0n1 fio: multiple writers may overwrite.{ "jobs" : [ {"error" : 0} ]}\n')
    assert res.json("fio", "nvme0n1") == [{"jobs": [{"error": 0}]}]
    assert res.json("fio", "nvme1n1") == []


def test_attrs_keep_spaces_and_irq_delta() -> None:
    res = result("VNV-ATTR nvme0 model=QEMU NVMe Ctrl\n"
                 "VNV-IRQ before queue=nvme0q1 count=3\nVNV-IRQ after queue=nvme0q1 count=10\n"
                 "VNV-IRQ after queue=nvme0q2 count=4\nVNV-RESULT wl=fio rc=0\nVNV-END\n")
    assert res.attrs() == {"nvme0": {"model": "QEMU NVMe Ctrl"}}
    assert res.irq_delta() == {"nvme0q1": 7, "nvme0q2": 4}
    assert res.workload_rc == 0


def test_failure_message_carries_console_tail_and_logs() -> None:
    res = result("line one\n" + "x" * 1000 + "\nVNV-RESULT wl=dd rc=1\nVNV-END\n")
    res.attached["vnvmed log"] = "daemon said hello"
    with pytest.raises(AssertionError) as exc:
        res.assert_ok()
    text = str(exc.value)
    assert "workload failed" in text and "VNV-RESULT wl=dd rc=1" in text
    assert "daemon said hello" in text and "[...]" in text


def test_cmdline_and_device_forms() -> None:
    assert harness.kernel_cmdline("dd", {"mb": 8}).endswith("vnv.wl=dd vnv.mb=8")
    with pytest.raises(ValueError):
        harness.kernel_cmdline("dd", {"Bad-Key": 1})
    with pytest.raises(ValueError):
        harness.kernel_cmdline("dd", {"mb": "8 init=/bin/sh"})
    dev = json.loads(harness.vfio_user_device("/tmp/a.sock", bootindex=0))
    assert dev == {"driver": "vfio-user-pci", "socket": {"path": "/tmp/a.sock", "type": "unix"},
                   "bootindex": 0}


def test_provision_and_init_scripts_parse() -> None:
    assert subprocess.run(["bash", "-n", str(harness.PROVISION)]).returncode == 0
    for init in ("init", "init-boot"):
        assert subprocess.run(["sh", "-n", str(harness.HERE / "guest" / init)]).returncode == 0
