"""Offline migration and debugging: `vnvmectl controller save NAME FILE` and a daemon
started with `--restore NAME=FILE` (or `restore = FILE` in its configuration).

The guest pauses (a saved VM), the source controller is saved and stays stopped, the
source client goes away; a new daemon starts from the file, the guest maps its RAM
there and runs on - same queues, verified I/O, nothing lost or doubled.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.daemon import ROOT, Daemon
from tests.migrig import (Guest, connect, controller_info, moved, start_host, start_hosts,
                          stop_hosts)

VNVMECTL = os.path.join(ROOT, "bin", "vnvmectl")


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, VNVMECTL, "--rpc", d.rpc, *args], capture_output=True,
                          text=True, timeout=60)


def test_save_then_start_another_daemon_from_the_file(tmp_path):
    daemons, img = start_hosts(1)
    g = None
    try:
        a = daemons[0]
        g = Guest.boot(a)
        aer = g.nvme.submit_aer()
        g.load.start()
        g.load.wait_completions(1500)
        g.load.pause()                                   # the VM is paused (savevm)
        snap = tmp_path / "nvme0.snap"
        r = ctl(a, "controller", "save", "nvme0", str(snap))
        assert r.returncode == 0, r.stderr
        assert snap.stat().st_size > 1000
        assert controller_info(a)["migration"]["held"] is True
        old_client = g.client
        b = start_host(img, extra=("--restore", f"nvme0={snap}"))
        daemons.append(b)
        g.client.close()                                 # the source VM is gone
        c = connect(b.socket, g.ram)                     # the restore happens at this DMA_MAP
        assert "resumed from" in b.log()
        new = moved(g.nvme, c)
        g.load.switch(new)
        old = g.nvme
        g.nvme, g.client, g.daemon = new, c, b
        old.close()
        g.load.resume()
        g.load.wait_completions(1500)
        g.nvme.db[(0x1000 + 8 * 50) >> 2] = 1            # an Error event: the AER completes
        assert g.nvme.wait_cid(0, aer, timeout=5).status == 0
        g.load.stop()
        assert not g.load.errors, g.load.errors[:10]
        assert old_client.sock is None
    finally:
        if g is not None:
            g.close()
        assert stop_hosts(daemons, img) == [0] * len(daemons)


def test_save_and_resume_in_place(tmp_path):
    daemons, img = start_hosts(1)
    g = None
    try:
        a = daemons[0]
        g = Guest.boot(a)
        g.load.start()
        g.load.wait_completions(1000)
        r = ctl(a, "controller", "save", "nvme0", str(tmp_path / "s"), "--resume")
        assert r.returncode == 0, r.stderr
        assert controller_info(a)["migration"]["held"] is False
        g.load.wait_completions(1000)                    # ran on under the save
        g.load.pause()
        assert ctl(a, "controller", "save", "nvme0", str(tmp_path / "s2")).returncode == 0
        assert controller_info(a)["migration"]["held"] is True
        r = ctl(a, "controller", "resume", "nvme0")
        assert r.returncode == 0, r.stderr
        r = ctl(a, "controller", "resume", "nvme0")       # not stopped by save any more
        assert r.returncode == 1 and "not stopped" in r.stderr
        g.load.resume()
        g.load.wait_completions(1000)
        g.load.stop()
        assert not g.load.errors, g.load.errors[:10]
        assert ctl(a, "controller", "save", "nosuch", str(tmp_path / "x")).returncode == 1
    finally:
        if g is not None:
            g.close()
        stop_hosts(daemons, img)


@pytest.mark.parametrize("content", [None, b"not a snapshot at all"])
def test_bad_restore_file_refused_at_start(tmp_path, content):
    path = tmp_path / "snap"
    if content is not None:
        path.write_bytes(content)
    run = tmp_path / "run"
    d = Daemon(["--controller", f"nvme0={run}/s.sock", "--namespace", "nvme0=null:16M",
                "--restore", f"nvme0={path}"], run)
    d.spawn()
    assert d.proc is not None and d.proc.wait(30) == 2
    lines = [ln for ln in d.log().splitlines() if "restore" in ln]
    assert lines and ("cannot read" in lines[0] or "not a vnvmed controller snapshot" in lines[0]), d.log()
