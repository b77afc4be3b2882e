"""Operations through the real daemon: bin/vnvmed in a subprocess, driven by bin/vnvmectl.

Every test starts its own daemon (one worker on core 0, a short run dir under /tmp so
socket paths stay under 108 bytes), talks to it through the real management socket
and the real vfio-user socket (benchmarks/hostnvme.py plays the guest driver), and
stops it with SIGTERM by PID.  Nothing is mocked.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ops import schema
from tests.daemon import Daemon
from tests.integration import conftest
from vfio_user.client import VfioUserClient

ROOT = Path(__file__).resolve().parents[2]
VNVMECTL = str(ROOT / "bin" / "vnvmectl")
pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
AER_NOTICE = 2
NOTICE_NS_ATTR_CHANGED = 0x00
LID_CHANGED_NS = 0x04
FID_ASYNC_EVENT_CONFIG = 0x0B
AEC_NS_ATTRIBUTE = 1 << 8
SC_LBA_OUT_OF_RANGE = 0x80   # SCT 0; compared under 0x7FF (DNR/M bits above)


class CtlDaemon(Daemon):
    """bin/vnvmed on core 0 with its run dir and info logging, plus vnvmectl helpers.

    The constructor only spawns: the systemd notify test watches start-up itself.
    """

    def __init__(self, run_dir: str, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(["--cores", "0", "--run-dir", run_dir, "--log-level", "info", *args],
                         run_dir, env=env, cwd=run_dir)
        self.spawn()

    # vnvmectl --------------------------------------------------------------------------
    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, VNVMECTL, "--rpc", self.rpc, *args],
                              capture_output=True, text=True, timeout=20, cwd=self.run_dir)

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl(*args, "--json")
        assert r.returncode == 0, f"vnvmectl {args}: {r.stderr}"
        return json.loads(r.stdout)

    def refused(self, *args: str) -> str:
        r = self.ctl(*args)
        assert r.returncode == 1, f"vnvmectl {args} should have been refused: {r.stdout}"
        return r.stderr

    def controllers(self) -> dict[str, dict]:
        return {c["name"]: c for c in self.ctl_json("controller", "list")}

    def raw(self, line: bytes) -> dict:
        """One raw line on the management socket, one reply line back."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.rpc)
            s.sendall(line)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)


@pytest.fixture
def daemon(run_dir: str) -> Iterator[CtlDaemon]:
    d = CtlDaemon(run_dir, ["--controller", f"base={run_dir}/base.sock", "--namespace", "base=ram:4M"])
    try:
        d.wait_ready(20)
        yield d
    finally:
        d.stop()


class Host(conftest.Host):
    """A test 'VM': vfio-user client + 16 MiB guest RAM + NVMe driver, enabled."""

    def __init__(self, sock: str) -> None:
        super().__init__(sock, 16 * MiB)
        assert self.nvme is not None and self.ram is not None
        try:
            self.nvme.enable()
        except BaseException:
            self.close()
            raise
        self.log_buf = self.ram.alloc(4096)

    def enable_ns_notices(self) -> None:
        st, _ = self.nvme.admin(0x09, 0, 0, 0, (FID_ASYNC_EVENT_CONFIG, AEC_NS_ATTRIBUTE))
        assert st == 0

    def submit_aer(self) -> int:
        cid = self.nvme.next_cid()
        self.nvme.submit(0, self.nvme.sqe(0x0C, cid))
        return cid

    def changed_ns_log(self) -> list[int]:
        numd = 4096 // 4 - 1
        st, _ = self.nvme.admin(0x02, 0xFFFFFFFF, self.log_buf, 0, (LID_CHANGED_NS | (numd << 16),))
        assert st == 0
        ids = struct.unpack_from("<1024I", self.ram.view(self.log_buf, 4096))
        return [i for i in ids if i]

    def nsze(self, nsid: int) -> int:
        return struct.unpack_from("<Q", self.nvme.identify(0, nsid), 0)[0]


def expect_ns_notice(h: Host, aer_cid: int, nsid: int) -> None:
    (cid, status, dw0, _), = h.nvme.reap(0, 1, timeout=10)
    assert (cid, status) == (aer_cid, 0)
    assert dw0 & 0x7 == AER_NOTICE
    assert (dw0 >> 8) & 0xFF == NOTICE_NS_ATTR_CHANGED
    assert (dw0 >> 16) & 0xFF == LID_CHANGED_NS
    assert h.changed_ns_log() == [nsid]
    assert h.changed_ns_log() == []   # reading the log cleared it


# --------------------------------------------------------------------------- tests
def test_controller_added_at_run_time_namespace_notice_stats_and_remove(daemon: CtlDaemon) -> None:
    sock = os.path.join(daemon.run_dir, "vm1.sock")
    r = daemon.ctl("controller", "add", "vm1", "--socket", sock)
    assert r.returncode == 0, r.stderr
    assert set(daemon.controllers()) == {"base", "vm1"}

    h = Host(sock)
    try:
        h.enable_ns_notices()
        aer = h.submit_aer()
        assert daemon.ctl_json("namespace", "add", "vm1", "ram:16M")["nsid"] == 1
        expect_ns_notice(h, aer, 1)
        assert h.nsze(1) == 16 * MiB // 512

        h.nvme.create_io_queue(1, 16)
        buf = h.ram.alloc(8192)
        data = os.urandom(8192)
        h.ram.view(buf, 8192)[:] = data
        for i in range(5):
            assert h.nvme.rw(1, True, 1, 16 * i, 16, buf) == 0
        h.ram.view(buf, 8192)[:] = bytes(8192)
        for i in range(3):
            assert h.nvme.rw(1, False, 1, 16 * i, 16, buf) == 0
        assert bytes(h.ram.view(buf, 8192)) == data

        st = daemon.ctl_json("stats", "vm1")
        c = st["controllers"]["vm1"]
        assert c["controller"]["commands"] == 8          # the I/O this test did, nothing else
        q = c["queues"]["1"]
        assert q["depth"] == 16 and q["sq_tail"] == 8 and q["sq_head"] == 8 and q["cqid"] == 1
        assert [w["id"] for w in st["workers"]] == [0]
        assert st["workers"][0]["polls"] >= st["workers"][0]["idle"] > 0

        lst = daemon.controllers()
        assert lst["vm1"]["client_connected"] is True
        assert lst["vm1"]["namespaces"][0]["size"] == 16 * MiB

        err = daemon.refused("controller", "remove", "vm1")
        assert "client attached" in err and "--force" in err
        assert "vm1" in daemon.controllers()
        assert daemon.ctl("controller", "remove", "vm1", "--force").returncode == 0
    finally:
        h.close()
    assert set(daemon.controllers()) == {"base"}
    assert not os.path.exists(sock) or _refuses_connect(sock)
    assert daemon.alive()


def _refuses_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return True
    return False


def test_namespace_resize_ram_and_file(daemon: CtlDaemon) -> None:
    img = os.path.join(daemon.run_dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    base = os.path.join(daemon.run_dir, "base.sock")
    h = Host(base)
    try:
        h.enable_ns_notices()
        aer = h.submit_aer()
        assert daemon.ctl_json("namespace", "add", "base", f"file:{img}")["nsid"] == 2
        expect_ns_notice(h, aer, 2)

        # ram: shrink, then grow back up to (never past) the created size
        aer = h.submit_aer()
        assert daemon.ctl_json("namespace", "resize", "base", "1", "2M")["blocks"] == 4096
        expect_ns_notice(h, aer, 1)
        assert h.nsze(1) == 4096
        h.nvme.create_io_queue(1, 8)
        buf = h.ram.alloc(4096)
        assert h.nvme.rw(1, False, 1, 4095, 1, buf) == 0
        assert h.nvme.rw(1, False, 1, 4096, 1, buf) & 0x7FF == SC_LBA_OUT_OF_RANGE   # workers saw the shrink
        err = daemon.refused("namespace", "resize", "base", "1", "8M")
        assert "cannot grow beyond" in err
        assert h.nsze(1) == 4096
        aer = h.submit_aer()
        daemon.ctl_json("namespace", "resize", "base", "1", "4M")
        expect_ns_notice(h, aer, 1)
        assert h.nvme.rw(1, False, 1, 8191, 1, buf) == 0

        # file: grow by ftruncate, data written past the old end reads back
        aer = h.submit_aer()
        daemon.ctl_json("namespace", "resize", "base", "2", "3M")
        expect_ns_notice(h, aer, 2)
        assert os.path.getsize(img) == 3 * MiB and h.nsze(2) == 6144
        h.ram.view(buf, 4096)[:] = b"\xa5" * 4096
        assert h.nvme.rw(1, True, 2, 6136, 8, buf) == 0
        with open(img, "rb") as f:
            f.seek(6136 * 512)
            assert f.read(4096) == b"\xa5" * 4096
        # shrink: the file is cut after every worker switched
        aer = h.submit_aer()
        daemon.ctl_json("namespace", "resize", "base", "2", "1M")
        expect_ns_notice(h, aer, 2)
        assert os.path.getsize(img) == 1 * MiB and h.nsze(2) == 2048
        assert h.nvme.rw(1, False, 2, 2048, 1, buf) & 0x7FF == SC_LBA_OUT_OF_RANGE
        assert "not a multiple" in daemon.refused("namespace", "resize", "base", "2", "1000")
        assert "no namespace 9" in daemon.refused("namespace", "resize", "base", "9", "1M")
    finally:
        h.close()
    sizes = {n["nsid"]: n["size"] for n in daemon.controllers()["base"]["namespaces"]}
    assert sizes == {1: 4 * MiB, 2: 1 * MiB}


def test_resized_namespaces_survive_a_front_end_restart(daemon: CtlDaemon) -> None:
    img = os.path.join(daemon.run_dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    daemon.ctl_json("namespace", "add", "base", f"file:{img}")
    daemon.ctl_json("namespace", "resize", "base", "1", "1M")      # ram, below its created 4M
    daemon.ctl_json("namespace", "resize", "base", "2", "512K")    # file, truncated
    old_pid = daemon.controllers()["base"]["pid"]
    os.kill(old_pid, signal.SIGKILL)     # a child of the daemon this test started
    deadline = time.monotonic() + 20
    while True:
        c = daemon.controllers()["base"]
        if c["pid"] != old_pid and "namespaces" in c:
            break
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert {n["nsid"]: n["size"] for n in c["namespaces"]} == {1: 1 * MiB, 2: 512 * 1024}
    h = Host(os.path.join(daemon.run_dir, "base.sock"))
    try:
        assert h.nsze(1) == 2048 and h.nsze(2) == 1024
    finally:
        h.close()
    daemon.ctl_json("namespace", "resize", "base", "1", "4M")      # grows back to the created size
    assert daemon.controllers()["base"]["namespaces"][0]["size"] == 4 * MiB


def test_bad_inputs_are_json_rpc_errors_and_change_nothing(daemon: CtlDaemon) -> None:
    before = daemon.controllers()
    rd = daemon.run_dir
    # a socket path some other server listens on
    busy = os.path.join(rd, "busy.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(busy)
        other.listen(1)
        assert "in use" in daemon.refused("controller", "add", "x1", "--socket", busy)
    finally:
        other.close()
    assert "already" in daemon.refused("controller", "add", "x2", "--socket", os.path.join(rd, "base.sock"))
    assert "duplicate controller name" in daemon.refused("controller", "add", "base", "--socket",
                                                         os.path.join(rd, "b2.sock"))
    # namespaces: missing file, too-small file, duplicate NSID, unknown controller
    assert "does not exist" in daemon.refused("namespace", "add", "base", f"file:{rd}/missing.img")
    small = os.path.join(rd, "small.img")
    with open(small, "wb") as f:
        f.write(b"x" * 100)
    assert "small" in daemon.refused("namespace", "add", "base", f"file:{small}")
    assert "already has namespace 1" in daemon.refused("namespace", "add", "base", "ram:1M", "--nsid", "1")
    assert "no controller named" in daemon.refused("namespace", "add", "nope", "ram:1M")
    # malformed JSON and bad requests on the raw socket
    assert daemon.raw(b'{"jsonrpc": "2.0", "method": \n')["error"]["code"] == -32700
    assert daemon.raw(b'[1, 2\n')["error"]["code"] == -32700
    r = daemon.raw(b'{"jsonrpc":"2.0","method":"namespace.resize","params":{"ctrl":"base"},"id":7}\n')
    assert r["id"] == 7 and r["error"]["code"] == -32602
    r = daemon.raw(b'{"jsonrpc":"2.0","method":"namespace.add","params":{"ctrl":"base","spec":"ram:1M",'
                   b'"nsid":1},"id":8}\n')
    assert r["error"]["code"] == -32002
    r = daemon.raw(b'{"jsonrpc":"2.0","method":"controller.remove","params":{"name":"ghost"},"id":9}\n')
    assert r["error"]["code"] == -32001

    assert daemon.alive()
    after = daemon.controllers()
    assert set(after) == set(before) == {"base"}
    assert after["base"]["namespaces"] == before["base"]["namespaces"]
    assert not os.path.exists(os.path.join(rd, "x2.sock"))
    assert not os.path.exists(os.path.join(rd, "b2.sock"))


def test_workers_rpc(daemon: CtlDaemon) -> None:
    rows = daemon.ctl_json("workers")
    assert [r["id"] for r in rows] == [0]
    w = rows[0]
    assert w["responsive"] is True and w["alive"] is True and w["core"] == 0 and w["restarts"] == 0
    assert w["polls"] >= w["idle"] >= 0 and w["queues"] == 0 and "base" in w["slots"]
    text = daemon.ctl("workers")
    assert text.returncode == 0 and str(w["pid"]) in text.stdout


def _recv_until(sock: socket.socket, want: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(want in m for m in seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want!r} in notifications {seen}")
        sock.settimeout(left)
        try:
            seen.append(sock.recv(4096).decode())
        except socket.timeout:
            pass


def test_systemd_notify_ready_status_stopping(run_dir: str) -> None:
    nsock = os.path.join(run_dir, "notify")
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.bind(nsock)
    ctrl = os.path.join(run_dir, "n0.sock")
    d = CtlDaemon(run_dir, ["--controller", f"n0={ctrl}", "--namespace", "n0=ram:1M"],
               env={"NOTIFY_SOCKET": nsock})
    seen: list[str] = []
    try:
        _recv_until(n, "READY=1", seen, 20)
        # READY=1 means every socket listens: both connect at once
        for path in (ctrl, d.rpc):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        _recv_until(n, "STATUS=", seen, 5)
        status = next(m for m in seen if "STATUS=" in m)
        assert "1 controller" in status and "1 worker" in status
        d.proc.send_signal(signal.SIGTERM)
        _recv_until(n, "STOPPING=1", seen, 15)
        assert d.proc.wait(15) == 0
    finally:
        d.stop()
        n.close()
    assert [m for m in seen if "READY=1" in m] and seen.index(
        next(m for m in seen if "READY=1" in m)) < seen.index(next(m for m in seen if "STOPPING=1" in m))


def test_sighup_reloads_controllers_from_the_config_file(run_dir: str) -> None:
    conf = os.path.join(run_dir, "vnvmed.toml")

    def write(names: list[str]) -> None:
        text = f'run_dir = "{run_dir}"\n'
        for name in names:
            text += (f'[[controllers]]\nname = "{name}"\nsocket = "{name}.sock"\n'
                     f'[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\n')
        with open(conf, "w") as f:
            f.write(text)

    write(["keep", "gone"])
    d = CtlDaemon(run_dir, ["--config", conf])
    try:
        d.wait_ready()
        assert set(d.controllers()) == {"keep", "gone"}
        write(["keep", "fresh"])
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while set(d.controllers()) != {"keep", "fresh"}:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        c = VfioUserClient(os.path.join(run_dir, "fresh.sock"))   # the new one serves
        try:
            assert c.negotiate()
        finally:
            c.close()
        assert _refuses_connect(os.path.join(run_dir, "gone.sock")) or \
            not os.path.exists(os.path.join(run_dir, "gone.sock"))
        # a broken file is refused as a whole: nothing changes, the daemon runs on
        with open(conf, "a") as f:
            f.write("bogus_key = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config not reloaded" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert d.alive() and set(d.controllers()) == {"keep", "fresh"}
    finally:
        assert d.stop() == 0


def test_vnvmectl_tables_against_the_real_daemon(run_dir: str) -> None:
    """controller list / stats from the daemon's real records (ops/schema.py): state, every
    namespace's kind and argument (the file's path), queues; `stats` as tables; a reader
    that leaves early (`| head -1`) costs no traceback."""
    img = os.path.join(run_dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    d = CtlDaemon(run_dir, ["--controller", f"vm1={run_dir}/vm1.sock", "--namespace", "vm1=ram:4M",
                            "--namespace", f"vm1=file:{img}", "--controller", f"idle={run_dir}/idle.sock",
                            "--namespace", "idle=null:1M"])
    try:
        d.wait_ready(20)
        (rec,) = [c for c in d.ctl_json("controller", "list") if c["name"] == "idle"]
        assert schema.missing_fields(rec) == [] and rec["state"] == "no-client"
        h = Host(f"{run_dir}/vm1.sock")
        try:
            for qid in (1, 2):
                h.nvme.create_io_queue(qid, 16)
            buf = h.ram.alloc(4096)
            assert h.nvme.rw(1, True, 2, 0, 8, buf) == 0
            assert h.nvme.rw(2, False, 1, 0, 8, buf) == 0
            recs = {c["name"]: c for c in d.ctl_json("controller", "list")}
            assert [schema.missing_fields(r) for r in recs.values()] == [[], []]
            vm1 = recs["vm1"]
            assert vm1["state"] == "ready" and vm1["client_connected"] is True
            assert [(n["nsid"], n["kind"], n["arg"], n["size"]) for n in vm1["namespaces"]] == \
                [(1, "ram", "4M", 4 * MiB), (2, "file", img, 2 * MiB)]
            assert sorted(q["sqid"] for q in vm1["queues"]) == [1, 2]
            r = d.ctl("controller", "list")
            assert r.returncode == 0, r.stderr
            rows = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}
            assert rows["vm1"].split()[:4] == ["vm1", "ready", "yes", "2"], r.stdout
            assert f"1=ram:4M(4M/512), 2=file:{img}(2M/512)" in rows["vm1"], r.stdout
            assert rows["idle"].split()[:4] == ["idle", "no-client", "no", "0"], r.stdout
            assert "-" not in rows["vm1"].split()[:4] and "?" not in r.stdout
            r = d.ctl("stats")
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            head = lines[0].split()
            assert head[:4] == ["CONTROLLER", "COMMANDS", "READS", "WRITES"], r.stdout
            row = dict(zip(head, next(ln.split() for ln in lines if ln.startswith("vm1 "))))
            assert (row["READS"], row["WRITES"], row["READ"], row["WRITTEN"]) == ("1", "1", "4K", "4K"), r.stdout
            assert "vm1: I/O queues" in lines and "workers" in lines, r.stdout
        finally:
            h.close()
        for args in (["stats"], ["controller", "list"], ["--json", "stats"]):
            # The reader is gone before vnvmectl writes (what `| head` ends up as): EPIPE.
            r_end, w_end = os.pipe()
            os.close(r_end)
            try:
                p = subprocess.run([sys.executable, VNVMECTL, "--rpc", d.rpc, *args], stdout=w_end,
                                   stderr=subprocess.PIPE, text=True, timeout=20)
            finally:
                os.close(w_end)
            assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
    finally:
        assert d.stop() == 0
