"""Stopping a child process we started: SIGTERM, a grace period, then SIGKILL.

One copy for the benchmark peers and the test servers (nbdkit, Ceph daemons, SPDK's
target, vnvmed under a benchmark): each used to spell the same four steps.
"""
from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """Terminate `proc` (if it still runs), wait up to `grace` seconds, then kill it.

    Returns its exit status; it has always been reaped when this returns.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
