"""nvme/fence.py: where the one fence holds, and that the daemon refuses to start elsewhere."""
from __future__ import annotations

import os
import subprocess
import sys

from nvme import fence
from tests.daemon import ROOT, VNVMED


def test_supported_here_and_refused_elsewhere() -> None:
    assert fence.unsupported_reason("x86_64", "semaphore") is None
    for machine in ("aarch64", "ppc64le", "riscv64", "armv7l"):
        reason = fence.unsupported_reason(machine, "semaphore")
        assert reason is not None and machine in reason and "x86_64" in reason
    assert "semaphore" in (fence.unsupported_reason("x86_64", "mutex+cond") or "")
    fence.full_barrier()


def test_daemon_refuses_an_unsupported_architecture_in_one_line(tmp_path) -> None:
    """bin/vnvmed's own start-up path, with the CPU reported as aarch64."""
    code = ("import platform, runpy, sys; platform.machine = lambda: 'aarch64'; "
            f"sys.argv = [{VNVMED!r}, '--cores', '0']; runpy.run_path({VNVMED!r}, run_name='__main__')")
    env = dict(os.environ, VNVMED_RUN_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "aarch64" in lines[0] and "x86" in lines[0], res.stderr
    assert os.listdir(tmp_path) == []     # nothing created, nothing bound
