"""ops.notify: real AF_UNIX datagram sockets stand in for systemd."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from ops import notify
from ops.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()


def recv(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_stopping_over_path(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving 2 controllers")
    assert recv(s) == {"READY": "1", "STATUS": "serving 2 controllers"}
    assert n.status("line1\nline2")
    assert recv(s) == {"STATUS": "line1 line2"}
    assert n.stopping()
    assert recv(s) == {"STOPPING": "1"}
    assert n.reloading()
    msg = recv(s)
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0


def test_abstract_socket() -> None:
    name = f"vnvmed-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(s) == {"READY": "1"}


def test_noop_without_systemd(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog() and n.watchdog_interval() is None
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    # a socket path nobody listens on: reported, not raised
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False


def test_watchdog_interval_and_pid(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval() == 3.0
    assert n.watchdog()
    assert recv(s) == {"WATCHDOG": "1"}
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None and not other.watchdog()
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"}).watchdog_interval() == 3.0
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "junk"}).watchdog_interval() is None
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "0"}).watchdog_interval() is None


def test_module_functions_use_environment_and_unset(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    # A real child process: the module-level API reads os.environ, and
    # unset_environment hides the variables from grandchildren.
    code = ("import os, sys; from ops import notify; "
            "notify.ready('up'); "
            "n = notify.Notifier(unset_environment=True); "
            "print(notify.watchdog_interval(), 'NOTIFY_SOCKET' in os.environ, n.enabled)")
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="500000")
    env.pop("WATCHDOG_PID", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True,
                         text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.5", "False", "True"]
    assert recv(s) == {"READY": "1", "STATUS": "up"}


def test_default_is_cached_and_resettable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify.reset_default()
    assert notify.ready() is False and notify.default() is notify.default()
    notify.reset_default()
