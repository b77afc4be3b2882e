"""Who may connect: world-connectable sockets need a force flag; the run dir is 0750 (issue 12).

Found from outside: `--socket-mode 0666` (any local user could attach to a guest's
disks) was accepted without a word, and the run dir the daemon created was 0755.
Through the real daemon: bin/vnvmed with a config file, bin/vnvmectl controller add.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.daemon import Daemon
from tests.integration.test_ops_daemon import CtlDaemon, ROOT

pytestmark = pytest.mark.timeout(60)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_world_socket_refused_then_forced_and_logged(run_dir: str) -> None:
    sub = os.path.join(run_dir, "rd")          # the daemon creates its run dir
    d = CtlDaemon.__new__(CtlDaemon)           # as CtlDaemon, but the log lives outside `sub`
    Daemon.__init__(d, ["--cores", "0", "--run-dir", sub, "--controller", f"base={sub}/base.sock",
                        "--namespace", "base=ram:4M"], run_dir, log_path=os.path.join(run_dir, "log"))
    d.spawn()
    d.run_dir = sub                            # vnvmectl's --rpc and cwd
    try:
        d.wait_ready(20)
        assert _mode(sub) == 0o750
        assert _mode(f"{sub}/base.sock") == 0o600
        err = d.refused("controller", "add", "open", "--socket", f"{sub}/open.sock", "--socket-mode", "0666")
        assert "allow_world_socket" in err and "0666" in err
        assert not os.path.exists(f"{sub}/open.sock")
        r = d.ctl("controller", "add", "grp", "--socket", f"{sub}/grp.sock", "--socket-mode", "0660")
        assert r.returncode == 0, r.stderr
        assert _mode(f"{sub}/grp.sock") == 0o660
        assert "world-connectable" not in d.log()
        r = d.ctl("controller", "add", "open", "--socket", f"{sub}/open.sock", "--socket-mode", "0666",
                  "--allow-world-socket")
        assert r.returncode == 0, r.stderr
        assert _mode(f"{sub}/open.sock") == 0o666
        d.wait_for_log("world-connectable")
        assert d.log().count("world-connectable") == 1
        # vnvmectl's --doorbells reaches the daemon (the RPC used to refuse the parameter)
        r = d.ctl("controller", "add", "tr", "--socket", f"{sub}/tr.sock", "--doorbells", "trapped")
        assert r.returncode == 0, r.stderr
    finally:
        d.stop()


def test_config_with_world_socket_is_a_startup_error(run_dir: str) -> None:
    cfg = os.path.join(run_dir, "vnvmed.toml")
    with open(cfg, "w") as f:
        f.write(f'run_dir = "{run_dir}"\n[[controllers]]\nname = "c"\nsocket = "c.sock"\n'
                'socket_mode = "0666"\n[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\n')
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "vnvmed"), "--config", cfg, "--cores", "0"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "socket_mode" in lines[0] and "allow_world_socket" in lines[0], r.stderr
    assert not os.path.exists(os.path.join(run_dir, "c.sock"))
