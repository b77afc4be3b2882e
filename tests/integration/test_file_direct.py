"""`file:` on a block device with O_DIRECT (`file:/dev/loopN,direct`) through the real daemon.

A loop device over a temporary file stands in for a disk: data written by the host
through vnvmed lands in the backing file (read back after the device is flushed), reads
return it, and a guest buffer that is not sector aligned (an SGL at an odd offset) still
works (the engine retries it on the buffered fd).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile

import pytest

from tests.daemon import Daemon
from tests.integration.conftest import enabled_nvme, finish_daemon

pytestmark = pytest.mark.timeout(60)
BS = 512
WBUF, RBUF = 0x1000000, 0x1400000


def _loop(path: str) -> str | None:
    if shutil.which("losetup") is None:
        return None
    r = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_block_device_with_o_direct() -> None:
    d = tempfile.mkdtemp(prefix="vdirect-", dir="/var/tmp")   # a real file system, not tmpfs
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    dev = _loop(img)
    if dev is None:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip("no loop device here (losetup failed)")
    run = tempfile.mkdtemp(prefix="vdir-", dir="/tmp")
    daemon = None
    try:
        daemon = Daemon(["--cores", "0", "--run-dir", run, "--log-level", "info", "--controller",
                         f"nvme0={run}/nvme0.sock", "--namespace", f"nvme0=file:{dev},direct"], run).start()
        rng = random.Random(7)
        with enabled_nvme(daemon.socket, (1,)) as h:
            assert h.identify(0, 1)   # the namespace exists
            for slba, nblk in ((0, 8), (4096, 64), ((32 << 20) // BS - 8, 8)):
                data = rng.randbytes(nblk * BS)
                h.fill(WBUF, data)
                assert h.rw(1, True, 1, slba, nblk, WBUF) == 0
                h.fill(RBUF, bytes(len(data)))
                assert h.rw(1, False, 1, slba, nblk, RBUF) == 0
                assert h.read(RBUF, len(data)) == data
            # a data buffer 4 bytes past a page boundary: O_DIRECT may refuse it (then the buffered fd serves it)
            data = rng.randbytes(4096)
            h.fill(WBUF + 4, data)
            assert h.sgl_rw(1, True, 1, 100, 8, [(WBUF + 4, 4096)]) == 0
            assert h.command(1, 0x00, 1).status == 0                       # Flush (fdatasync)
        log = daemon.log()   # the worker served it asynchronously (workers/aio.py logs the engine)
        assert "asynchronous backend UringEngine" in log or "asynchronous backend ThreadPoolEngine" in log
        subprocess.run(["blockdev", "--flushbufs", dev], check=False)
        with open(img, "rb") as f:
            f.seek(100 * BS)
            assert f.read(4096) == data
    finally:
        try:
            if daemon is not None:
                finish_daemon(daemon)
        finally:             # the loop device goes even if the daemon's exit check fails
            subprocess.run(["losetup", "-d", dev], check=False)
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
