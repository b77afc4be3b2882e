"""Packages (state + fds) between processes, snapshot format checks, partial-message export,
spec round trips: the pieces of a live upgrade that need no daemon (real sockets and fds)."""
from __future__ import annotations

import os
import socket

import pytest

from ops import notify
from ops.config import ControllerSpec, DoorbellMode, NamespaceKind, NamespaceSpec
from ops.ctl import build_parser, request_for
from reactor import ipc
from reactor.handover import (FORMAT, FdTable, PackageAssembler, PackageError, claimed_format,
                              format_problem, send_package)
from reactor.upgrade import from_wire, to_wire
from vfio_user.framing import Framer
from vfio_user.wire import Header, MsgType

pytestmark = pytest.mark.timeout(30)


def _receive(sock: socket.socket) -> object:
    asm = PackageAssembler()
    while True:
        msg, fds = ipc.recv(sock)
        assert msg is not None
        pkg = asm.feed(msg, fds)
        if pkg is not None:
            return pkg


def test_a_package_with_many_fds_and_a_large_state_arrives_whole() -> None:
    a, b = ipc.pair()
    a.setblocking(False)
    made = [os.eventfd(i) for i in range(600)]         # > 2 x SCM_MAX_FD
    try:
        fds = FdTable()
        state = {"refs": [fds.ref(fd) for fd in made] + [fds.ref(made[0])],
                 "blob": os.urandom(200_000)}
        assert len(fds.fds) == 600                      # the repeated fd is sent once
        send_package(a, "state", state, fds.fds, name="c0")
        pkg = _receive(b)
        assert pkg.kind == "state" and pkg.extra == {"name": "c0"}  # type: ignore[attr-defined]
        assert pkg.state["blob"] == state["blob"]  # type: ignore[attr-defined]
        got = [pkg.fd(r) for r in pkg.state["refs"]]  # type: ignore[attr-defined]
        assert got[-1] == got[0]
        assert [os.eventfd_read(fd) for fd in got[1:5]] == [1, 2, 3, 4]   # the same eventfds
        kept = pkg.take(pkg.state["refs"][7])  # type: ignore[attr-defined]
        pkg.close_unused()  # type: ignore[attr-defined]
        assert os.fstat(kept) and os.eventfd_read(kept) == 7
        os.close(kept)
        with pytest.raises(OSError):
            os.fstat(got[8])                            # closed by close_unused
    finally:
        for fd in made:
            os.close(fd)
        a.close()
        b.close()


def test_package_parts_out_of_order_are_refused_and_close_their_fds() -> None:
    asm = PackageAssembler()
    r, w = os.pipe()
    with pytest.raises(PackageError):
        asm.feed({"op": "pkg", "id": 1, "kind": "x", "part": 1, "parts": 2, "data": b""}, [w])
    with pytest.raises(OSError):
        os.fstat(w)
    os.close(r)
    with pytest.raises(PackageError):
        asm.feed({"op": "pkg", "id": "x"}, [])


def test_format_rules() -> None:
    assert FORMAT[0] >= 1
    assert format_problem([1, 0], (1, 0)) is None
    assert format_problem([1, 9], (1, 0)) is None        # newer minor: extra keys ignored
    assert format_problem([1, 0], (1, 7)) is None        # older minor: missing keys default
    assert "newer than this build's 1.0" in format_problem([2, 0], (1, 0))  # type: ignore[operator]
    assert "older" in format_problem([0, 5], (1, 0))  # type: ignore[operator]
    assert "MAJOR.MINOR" in format_problem("junk", (1, 0))  # type: ignore[operator]
    assert claimed_format({}) == FORMAT
    assert claimed_format({"VNVMED_SNAPSHOT_FORMAT": "2.3"}) == (2, 3)
    with pytest.raises(ValueError):
        claimed_format({"VNVMED_SNAPSHOT_FORMAT": "two"})


def test_a_partial_message_and_its_fds_move_between_framers() -> None:
    msg = Header(7, 2, 16 + 24, MsgType.COMMAND).encode() + bytes(range(24))
    old = Framer(1 << 20)
    r, w = os.pipe()
    assert old.feed(msg[:20], [r]) == []
    data, marks, fds = old.export()
    assert data == msg[:20] and marks == [(19, 1, False)] and fds == [r]
    new = Framer(1 << 20)
    new.adopt(data, marks, [os.dup(fd) for fd in fds])
    (frame,) = new.feed(msg[20:])
    assert frame.header.msg_id == 7 and frame.payload == bytes(range(24)) and len(frame.fds) == 1
    frame.close()
    old.close()
    os.close(w)


def test_controller_specs_survive_the_wire_across_versions() -> None:
    spec = ControllerSpec("vm1", "/run/x.sock", serial="S1", doorbells=DoorbellMode.TRAPPED,
                          namespaces=[NamespaceSpec(NamespaceKind.RAM, "4M", 1, size=4 << 20)])
    wire = to_wire(spec)
    wire["from_a_newer_build"] = 1                      # dropped
    del wire["mdts"]                                    # an older build: default
    back = from_wire(ControllerSpec, wire, namespaces=NamespaceSpec)
    assert back.doorbells is DoorbellMode.TRAPPED and back.mdts == ControllerSpec("x", "y").mdts
    assert back.namespaces[0].kind is NamespaceKind.RAM and back.namespaces[0].size == 4 << 20
    assert (back.name, back.socket, back.serial) == ("vm1", "/run/x.sock", "S1")


def test_barrier_waits_until_the_notify_socket_reader_got_it(tmp_path) -> None:
    path = str(tmp_path / "n")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    n = notify.Notifier({"NOTIFY_SOCKET": path})
    assert n.notify(MAINPID=1234)
    assert n.barrier(0.2) is False                     # nobody read it yet
    srv.recv(100)                                      # MAINPID=
    srv.recv(100)                                      # the first barrier: its pipe closes
    import threading
    t = threading.Thread(target=lambda: srv.recv(100))
    t.start()
    assert n.barrier(5) is True
    t.join()
    srv.close()
    assert notify.Notifier({}).barrier() is False


def test_vnvmectl_upgrade_request() -> None:
    a = build_parser().parse_args(["upgrade", "--exec", "next", "--handover-timeout", "9"])
    method, params = request_for(a)
    assert method == "daemon.upgrade" and params["timeout"] == 9 and os.path.isabs(params["exec"])
    assert request_for(build_parser().parse_args(["upgrade"])) == ("daemon.upgrade", {"timeout": 45.0})


def test_a_restore_for_a_live_upgrade_keeps_the_doorbell_page() -> None:
    """Both processes map one BAR0 memfd: a doorbell the guest writes during the blackout
    must survive the restore (load_state restores the saved page only for migration)."""
    from backends.null import NullBackend
    from nvme.config import ControllerConfig
    from nvme.namespace import Namespace
    from nvme.state import NamespaceInfo
    from reactor import devstate
    from reactor.nvmefn import NvmeFunction

    def function(bar_fd: int | None = None) -> NvmeFunction:
        info = NamespaceInfo(1, 512, 2048, backend={"kind": "null", "size": 1 << 20})
        cfg = ControllerConfig(serial="S", model="M", max_io_queues=4, mqes=64, mdts=5, subnqn="nqn.x")
        return NvmeFunction("c", cfg, {1: Namespace(info, NullBackend(1 << 20))}, cfg.max_transfer,
                            bar_fd=bar_fd)

    old = function()
    old.db_words[3] = 7                      # rung before the freeze: in the snapshot
    blob = devstate.save_state(old)
    new = function(bar_fd=os.dup(old.bar_fd))
    old.db_words[3] = 9                      # rung during the blackout
    devstate.load_state(new, blob, shared_bar=True)
    assert new.db_words[3] == old.db_words[3] == 9
    devstate.load_state(new, blob)           # migration: the saved page comes back
    assert old.db_words[3] == 7
