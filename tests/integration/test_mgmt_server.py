"""Management server over a real UNIX socket, driven by raw JSON lines and by the real vnvmectl.

The ManagementApi here is a small in-memory implementation built on
ops.config (the same validation the supervisor uses); the server runs in
its own asyncio loop on a thread, vnvmectl runs as a subprocess.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from ops import config as C, schema
from ops.mgmt import ErrorCode, MgmtError, MgmtServer

ROOT = Path(__file__).resolve().parents[2]
VNVMECTL = str(ROOT / "bin" / "vnvmectl")
# The vnvmectl tests start ~15 interpreters each (~1 s apiece at load 12-13 on 2 cores:
# 20 s timed out on Debian 12 and 13 alike); a hang still fails, each call has its own 15 s.
pytestmark = pytest.mark.timeout(90)


class DemoApi:
    """In-test ManagementApi: controllers in a dict, validated through ops.config."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.cfg = C.DaemonConfig(run_dir=run_dir)
        self.calls: list[str] = []

    def _ctrl(self, name: str) -> C.ControllerSpec:
        c = self.cfg.controller(name)
        if c is None:
            raise MgmtError(f"no controller named {name!r}; see 'vnvmectl controller list'", ErrorCode.NOT_FOUND)
        return c

    @staticmethod
    def _ns(n: C.NamespaceSpec) -> dict[str, Any]:
        return {"nsid": n.nsid, "kind": n.kind.value, "arg": n.arg, "size": n.size, "block_size": n.block_size}

    async def controller_list(self) -> list[dict]:
        """Built by the server's own ops.schema (the fake cannot drift from the real shape)."""
        self.calls.append("controller_list")
        idle = {"client_connected": False, "enabled": False, "ready": False, "fatal": False,
                "queues": {}}
        return [schema.controller_record(c.name, c.socket, c.namespaces, idle, pid=4321)
                for c in self.cfg.controllers]

    async def controller_add(self, name: str, socket: str, **opts: Any) -> dict:
        self.calls.append("controller_add")
        try:
            c = C.controller_from_options(name, socket, opts, self.run_dir)
            self.cfg = C.with_controller(self.cfg, c)
        except C.ConfigError as e:
            raise MgmtError(e.reason if e.key.startswith("params") else str(e), ErrorCode.CONFLICT) from None
        return {"name": c.name, "socket": c.socket, "mqes": c.mqes}

    async def controller_remove(self, name: str, force: bool = False) -> dict:
        c = self._ctrl(name)
        self.cfg.controllers.remove(c)
        return {"name": name, "removed": True, "force": force}

    async def namespace_add(self, ctrl: str, spec: str, nsid: int | None = None, block_size: int = 512,
                            read_only: bool = False) -> dict:
        c = self._ctrl(ctrl)
        try:
            ns = C.check_namespace(C.NamespaceSpec.parse(spec, nsid, block_size, read_only))
            trial = dataclasses.replace(c, namespaces=[*c.namespaces, ns])
            C.assign_nsids(trial)   # refuses a duplicate NSID, numbers an NSID-less one
        except (ValueError, C.ConfigError) as e:
            raise MgmtError(getattr(e, "reason", str(e))) from None
        c.namespaces = trial.namespaces
        return self._ns(ns)

    async def namespace_remove(self, ctrl: str, nsid: int) -> dict:
        c = self._ctrl(ctrl)
        c.namespaces = [n for n in c.namespaces if n.nsid != nsid]
        return {"ctrl": ctrl, "nsid": nsid}

    async def namespace_resize(self, ctrl: str, nsid: int, size: str) -> dict:
        self.calls.append(f"namespace_resize {size!r}")
        return {"ctrl": ctrl, "nsid": nsid, "size": C.parse_size(size)}

    async def stats(self, ctrl: str | None = None) -> dict:
        if ctrl is not None:
            self._ctrl(ctrl)
        names = [ctrl] if ctrl else [c.name for c in self.cfg.controllers]
        ctrl = {"commands": 7, "read_commands": 3, "write_commands": 4, "bytes_read": 12288,
                "bytes_written": 16384, "slow_commands": 0, "doorbell_errors": 0, "quiesces": 1}
        queue = {"worker": 0, "cqid": 1, "depth": 32, "sq_head": 7, "sq_tail": 7, "pending": 0,
                 "cq_head": 7, "cq_tail": 7, "broken": False}
        return {"controllers": {n: {"controller": ctrl, "queues": {"1": queue}, "workers": {},
                                    "errors_logged": 0} for n in names},
                "workers": await self.workers()}

    async def workers(self) -> list[dict]:
        if any(c.name == "boom" for c in self.cfg.controllers):
            raise RuntimeError("simulated supervisor bug")
        return [{"pid": 1234, "core": 0, "queues": 2}, {"pid": 1235, "core": 1, "queues": 1}]


class ServerThread:
    def __init__(self, api: DemoApi, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = MgmtServer(api, path)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self.error = e
            self.loop.close()
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(5)
        if self.error:
            raise self.error

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DemoApi, str]]:
    api = DemoApi(str(tmp_path))
    path = str(tmp_path / "vnvmed.rpc")
    st = ServerThread(api, path)
    st.start()
    yield api, path
    st.stop()
    assert not os.path.exists(path)   # close() cleans up its socket


def raw(path: str, *lines: bytes) -> list[Any]:
    """Send lines on one connection; return one decoded reply per line that gets an answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        out = []
        for line in lines:
            s.sendall(line + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "server closed the connection"
                buf += chunk
            out.append(json.loads(buf))
        return out


def ctl(path: str, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VNVMED_RUN_DIR"}
    env["VNVMED_RUN_DIR"] = os.path.dirname(path)
    return subprocess.run([sys.executable, VNVMECTL, *args], capture_output=True, text=True, timeout=15,
                          env=env, cwd=cwd)


def test_socket_is_private(daemon: tuple[DemoApi, str]) -> None:
    _, path = daemon
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_vnvmectl_add_list_namespace_stats(daemon: tuple[DemoApi, str], tmp_path: Path) -> None:
    api, path = daemon
    r = ctl(path, "controller", "add", "vm1", "--socket", "vm1.sock", "--mqes", "255", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"socket: {tmp_path}/vm1.sock" in r.stdout and "mqes: 255" in r.stdout
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 8192)
    r = ctl(path, "namespace", "add", "vm1", "ram:64M")
    assert r.returncode == 0, r.stderr
    r = ctl(path, "namespace", "add", "vm1", "file:d.img", "--nsid", "5", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr   # relative file path was made absolute by vnvmectl
    r = ctl(path, "controller", "list")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "STATE", "CLIENT", "QUEUES", "SOCKET"]
    assert row.split()[:4] == ["vm1", "no-client", "no", "0"] and f"5=file:{img}(8K/512)" in row
    assert "1=ram:64M(64M/512)" in row
    r = ctl(path, "controller", "list", "--json")
    (c,) = json.loads(r.stdout)
    assert [n["nsid"] for n in c["namespaces"]] == [1, 5] and c["namespaces"][0]["size"] == 64 << 20
    r = ctl(path, "stats", "vm1")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split()[:4] == ["CONTROLLER", "COMMANDS", "READS", "WRITES"]
    assert lines[1].split()[:6] == ["vm1", "7", "3", "4", "12K", "16K"], lines
    assert "vm1: I/O queues" in lines and any(ln.split()[:4] == ["1", "0", "1", "32"] for ln in lines)
    r = ctl(path, "workers")
    assert r.returncode == 0 and r.stdout.split()[:3] == ["PID", "CORE", "QUEUES"]
    r = ctl(path, "--json", "workers")
    assert json.loads(r.stdout)[1]["pid"] == 1235
    r = ctl(path, "namespace", "resize", "vm1", "1", "128M")
    assert r.returncode == 0 and "size: 134217728" in r.stdout
    assert ctl(path, "namespace", "remove", "vm1", "5").returncode == 0
    assert ctl(path, "controller", "remove", "vm1", "--force").returncode == 0
    assert ctl(path, "controller", "list").stdout.strip() == "no controllers"


def test_vnvmectl_errors_exit_1_with_server_message(daemon: tuple[DemoApi, str], tmp_path: Path) -> None:
    _, path = daemon
    r = ctl(path, "namespace", "add", "ghost", "ram:1M")
    assert r.returncode == 1 and "no controller named 'ghost'" in r.stderr and r.stdout == ""
    assert ctl(path, "controller", "add", "a", "--socket", "/tmp/x-a.sock").returncode == 0
    r = ctl(path, "controller", "add", "a", "--socket", "/tmp/x-b.sock")
    assert r.returncode == 1 and "duplicate controller name 'a'" in r.stderr
    r = ctl(path, "namespace", "add", "a", "tape:1M")
    assert r.returncode == 1 and "unknown namespace kind 'tape'" in r.stderr
    r = ctl(path, "namespace", "add", "a", f"file:{tmp_path}/none.img")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = ctl(path, "namespace", "add", "a", "null:1M", "--nsid", "3")
    assert r.returncode == 0, r.stderr
    r = ctl(path, "namespace", "add", "a", "null:1M", "--nsid", "3")
    assert r.returncode == 1 and "duplicate NSID 3" in r.stderr
    r = ctl(path, "controller", "add", "b", "--socket", "/tmp/x-c.sock", "--mdts", "99")
    assert r.returncode == 1 and "out of range 0..10" in r.stderr


def test_vnvmectl_daemon_not_running(tmp_path: Path) -> None:
    r = ctl(str(tmp_path / "vnvmed.rpc"), "controller", "list")
    assert r.returncode == 1 and "vnvmed is not running" in r.stderr
    stale = tmp_path / "stale.rpc"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()   # bound, never listened: connect() is refused
    r = ctl(str(tmp_path / "vnvmed.rpc"), "--rpc", str(stale), "workers")
    assert r.returncode == 1 and "refuses connections" in r.stderr


def test_protocol_errors_and_server_survives(daemon: tuple[DemoApi, str]) -> None:
    api, path = daemon
    replies = raw(path,
                  b"{this is not json",
                  b'{"jsonrpc":"2.0","method":"controller.explode","id":1}',
                  b'{"jsonrpc":"2.0","method":"namespace.add","params":{"ctrl":1,"spec":"ram:1M"},"id":2}',
                  b'{"jsonrpc":"2.0","method":"namespace.add","params":["a","ram:1M"],"id":3}',
                  b'{"jsonrpc":"2.0","method":"controller.add","params":{"name":"x"},"id":4}',
                  b'{"jsonrpc":"2.0","method":"stats","params":{"ctrl":"x","verbose":true},"id":5}',
                  b'{"method":"stats","id":6}',
                  b'{"jsonrpc":"2.0","method":"controller.list","id":"after"}')
    codes = [r.get("error", {}).get("code") for r in replies]
    assert codes == [-32700, -32601, -32602, -32602, -32602, -32602, -32600, None]
    assert "'ctrl' must be string" in replies[2]["error"]["message"]
    assert replies[2]["error"]["data"] == {"param": "ctrl", "expected": "string"}
    assert "missing parameter 'socket'" in replies[4]["error"]["message"]
    assert "controller.list" in replies[1]["error"]["message"]   # lists what exists
    assert replies[7] == {"jsonrpc": "2.0", "id": "after", "result": []}
    assert [r["id"] for r in replies[1:6]] == [1, 2, 3, 4, 5]
    assert "controller_add" not in api.calls   # invalid params never reach the API


def test_internal_error_is_32603_and_server_survives(daemon: tuple[DemoApi, str]) -> None:
    _, path = daemon
    (add, boom, after) = raw(path,
                             b'{"jsonrpc":"2.0","method":"controller.add","params":{"name":"boom",'
                             b'"socket":"/tmp/boom.sock"},"id":1}',
                             b'{"jsonrpc":"2.0","method":"workers","id":2}',
                             b'{"jsonrpc":"2.0","method":"controller.list","id":3}')
    assert "result" in add
    assert boom["error"]["code"] == -32603 and "simulated supervisor bug" in boom["error"]["message"]
    assert after["result"][0]["name"] == "boom"


def test_batch_notification_and_size_as_int(daemon: tuple[DemoApi, str]) -> None:
    api, path = daemon
    (batch,) = raw(path, b'[{"jsonrpc":"2.0","method":"namespace.resize","params":{"ctrl":"a","nsid":1,'
                         b'"size":4096},"id":1}, {"jsonrpc":"2.0","method":"controller.list"}, 7]')
    assert len(batch) == 2   # the notification is run but not answered
    assert batch[0]["result"]["size"] == 4096 and batch[1]["error"]["code"] == -32600
    assert "namespace_resize '4096'" in api.calls and "controller_list" in api.calls


def test_clients_dropping_mid_request_do_not_hurt(daemon: tuple[DemoApi, str]) -> None:
    _, path = daemon
    for payload in (b"", b'{"jsonrpc":"2.0","method":"work', b'{"jsonrpc":"2.0","method":"workers","id":1}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(payload)
    # a final line without newline followed by EOF is still answered
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"jsonrpc":"2.0","method":"controller.list","id":9}')
        s.shutdown(socket.SHUT_WR)
        assert json.loads(s.makefile("rb").readline()) == {"jsonrpc": "2.0", "id": 9, "result": []}
    assert raw(path, b'{"jsonrpc":"2.0","method":"rpc.methods","id":1}')[0]["result"]["stats"]["params"] == ["ctrl"]


def test_oversized_line_answered_then_closed(daemon: tuple[DemoApi, str]) -> None:
    _, path = daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(b"[" + b" " * (2 << 20) + b"]\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = json.loads(s.makefile("rb").readline())
    assert reply["error"]["code"] == -32700
    assert raw(path, b'{"jsonrpc":"2.0","method":"workers","id":1}')[0]["result"][0]["core"] == 0


def test_refuses_to_steal_live_socket_and_replaces_stale(daemon: tuple[DemoApi, str], tmp_path: Path) -> None:
    api, path = daemon
    with pytest.raises(OSError, match="already serving"):
        ServerThread(api, path).start()
    stale = str(tmp_path / "stale.rpc")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    st = ServerThread(api, stale)
    st.start()
    try:
        assert raw(stale, b'{"jsonrpc":"2.0","method":"controller.list","id":1}')[0]["result"] == []
    finally:
        st.stop()
    regular = tmp_path / "plain"
    regular.write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        ServerThread(api, str(regular)).start()
