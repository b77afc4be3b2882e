"""When the real-guest tests provision, and what happens when they cannot (no QEMU needed).

Each case runs pytest in a child process with ``VNVMED_QEMU_CACHE`` pointing at a fresh
path: the provision script creates that directory (and its lock) first thing, so its
existence tells whether provisioning ran.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import harness

ONE_QEMU_TEST = "tests/qemu/test_vnvmed_data.py::test_dd_direct_every_namespace"


def run_pytest(args: list[str], cache: Path, required: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VNVMED_QEMU_CACHE=str(cache), VNVMED_QEMU_REQUIRED=required)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=harness.ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_collect_only_provisions_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "qemu-cache"
    res = run_pytest(["--collect-only", "tests/qemu"], cache, "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_fio_verify_with_trapped_doorbells" in res.stdout
    assert not cache.exists(), "--collect-only ran tests/qemu/provision"


def test_not_qemu_provisions_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "qemu-cache"
    res = run_pytest(["-m", "not qemu", "tests/qemu/test_harness_parse.py"], cache, "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not cache.exists(), "-m 'not qemu' ran tests/qemu/provision"


@pytest.mark.skipif(os.geteuid() != 0, reason="provisioning is attempted only as root")
def test_required_guest_that_cannot_be_provisioned_fails_not_skips(tmp_path: Path) -> None:
    # A regular file where the cache directory should be: the script's mkdir fails.
    cache = tmp_path / "not-a-dir"
    cache.write_text("")
    res = run_pytest([ONE_QEMU_TEST], cache, "1")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    # A failing session fixture reports the test as an error: red, never skipped.
    assert "1 error" in out and "skipped" not in out and "VNVMED_QEMU_REQUIRED=1" in out, out
    assert "provisioning FAILED" in out, out


@pytest.mark.skipif(os.geteuid() != 0, reason="provisioning is attempted only as root")
def test_optional_guest_that_cannot_be_provisioned_skips_with_reason(tmp_path: Path) -> None:
    cache = tmp_path / "not-a-dir"
    cache.write_text("")
    res = run_pytest(["-rs", ONE_QEMU_TEST], cache, "0")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "1 skipped" in out and "QEMU guest unavailable" in out, out
