"""The data path a daemon runs, through the real daemon: chosen with --datapath (default
native when built), said at start-up and by `vnvmectl workers`, and - with native - the C
loop really serves the I/O (its commands show in the worker's statistics) while what it
hands to Python (other opcodes, errors) still gets the Python path's answers.

The conftest's `datapath` fixture runs every other integration module on both data
paths; here it is replaced by one that leaves the choice to each test.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvme import native
from tests.daemon import ROOT
from tests.integration.conftest import enabled_nvme

VNVMECTL = str(ROOT / "bin" / "vnvmectl")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def datapath():
    """No --datapath added to the daemons of this module (see the module doc)."""
    yield None


def _ctl_json(d, *args: str):
    r = subprocess.run([sys.executable, VNVMECTL, "--rpc", d.rpc, *args, "--json"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("choice", ["python", "native"])
def test_datapath_chosen_reported_and_used(tmp_path, vnvmed, choice):
    if choice == "native" and not native.available:
        pytest.skip(f"native data path {native.why_not}")
    sock = f"{tmp_path}/c0.sock"
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={sock}",
               "--namespace", "c0=ram:16M", "--datapath", choice)
    try:
        assert f"data path: {choice} (asked for)" in d.log()
        (w,) = _ctl_json(d, "workers")
        assert w["datapath"] == choice
        with enabled_nvme(sock, qids=[1]) as n:
            buf = n.ram.alloc(8 * 4096)
            pattern = bytes(range(256)) * 128
            n.fill(buf, pattern)
            assert n.rw(1, True, 1, 64, 64, buf) == 0                     # 32 KiB, a PRP list
            n.fill(buf, bytes(len(pattern)))
            assert n.rw(1, False, 1, 64, 64, buf) == 0
            assert n.read(buf, len(pattern)) == pattern
            e = n.io(1, 0x02, 1, (16 << 20) // 512, 1, buf)              # past the end
            assert e.code == 0x80                                          # LBA Out of Range
            e = n.io(1, 0x7F, 1, 0, 1, buf)                                # no such opcode
            assert e.code == 0x01
            st = _ctl_json(d, "stats")["controllers"]["c0"]
            (ws,) = st["workers"].values()
            assert ws["datapath"] == choice
            assert st["controller"]["read_commands"] == 1 and st["controller"]["write_commands"] == 1
            # Both commands that moved data went through the C loop, and only those.
            assert ws["native_commands"] == (2 if choice == "native" else 0)
    finally:
        assert d.stop() == 0


def test_default_is_native_when_built(tmp_path, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock")
    try:
        want = "native (the default (built))" if native.available else "python (native "
        assert f"data path: {want}" in d.log()
    finally:
        assert d.stop() == 0
