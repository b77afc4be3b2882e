"""contrib/systemd/vnvmed.service: systemd-analyze verify, plus the directives we promise.

systemd-analyze verify checks that ExecStart's binary exists, and /usr/local/bin/vnvmed is
not installed here, so we verify a copy whose ExecStart points at an existing executable.
verify exits 0 even for unknown keys and unparsable values (it only warns), so the test
also requires that it prints nothing at all.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "vnvmed.service"
pytestmark = pytest.mark.timeout(20)


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault(f"{section}.{k}", []).append(v)
    return out


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "vnvmed.service"
    unit.write_text(text)
    return subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=15)


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    true = shutil.which("true")
    assert true
    text = UNIT.read_text().replace("/usr/local/bin/vnvmectl", true).replace("/usr/local/bin/vnvmed", true)
    r = verify(text, tmp_path)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    # Guards the test above: a broken unit really is reported.
    true = shutil.which("true")
    assert true
    text = UNIT.read_text().replace("/usr/local/bin/vnvmectl", true).replace("/usr/local/bin/vnvmed", true) \
        .replace("[Service]\n", "[Service]\nBogus=1\n")
    r = verify(text, tmp_path)
    assert "Bogus" in r.stderr


def test_promised_directives() -> None:
    d = directives()
    assert d["Service.Type"] == ["notify"]
    assert d["Service.ExecStart"] == ["/usr/local/bin/vnvmed --config /etc/vnvmed/vnvmed.toml"]
    # reload = live upgrade (the old main process moves MAINPID; see reactor/upgrade.py)
    assert d["Service.ExecReload"] == ["/usr/local/bin/vnvmectl upgrade"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.RuntimeDirectory"] == ["vnvmed"] and d["Service.RuntimeDirectoryMode"] == ["0750"]
    assert d["Service.Restart"] == ["on-failure"] and d["Service.WatchdogSec"]
    assert d["Service.LimitMEMLOCK"] == ["infinity"] and d["Service.ProtectSystem"] == ["strict"]
    assert "/run/vnvmed" in d["Service.ReadWritePaths"][0].split()
    for k in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert d[f"Service.{k}"] == ["yes"], k
    # Things that would break vnvmed: pinning, memfd/eventfd, /dev/shm, AF_UNIX.
    assert "Service.RestrictRealtime" not in d and "Service.SystemCallFilter" not in d
    assert "Service.InaccessiblePaths" not in d and d.get("Service.PrivateDevices", ["no"]) == ["no"]
    assert "AF_UNIX" in d["Service.RestrictAddressFamilies"][0]
