"""reactor.channel.Channel: rings + the fdpass side channel, in one process and across a fork.

Real shared-memory rings (posix_ipc), a real SOCK_SEQPACKET socketpair made the way
the supervisor makes it (reactor.ipc.pair), real fds (pipes, memfds).
"""
from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest

from reactor import ipc
from reactor.channel import Channel
from reactor.shm.fdpass import FdPassError

pytestmark = pytest.mark.timeout(20)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """(front-end side, worker side) of one channel; both closed, rings unlinked."""
    a, b = ipc.pair()
    fe = Channel.create(a, f"/vnvt-chan-{os.getpid()}-{id(a):x}")
    wk = Channel.try_attach(b)
    assert wk is not None
    try:
        yield fe, wk
    finally:
        wk.close(unlink=False)
        fe.close(unlink=True)


def test_attach_before_handshake_is_none_and_closed_peer_is_an_error() -> None:
    a, b = ipc.pair()
    try:
        assert Channel.try_attach(b) is None          # nothing sent yet: do not block
        a.close()
        with pytest.raises(ConnectionError):
            Channel.try_attach(b)
    finally:
        b.close()


def test_message_with_fds_any_take_order_and_usable(pair: tuple[Channel, Channel]) -> None:
    fe, wk = pair
    r1, w1 = os.pipe()
    mfd = os.memfd_create("chan-test")
    try:
        os.write(mfd, b"guest memory")
        fe.send({"op": "map", "n": 1}, [w1])
        fe.send({"op": "plain"})
        fe.send({"op": "irqs", "n": 2}, [mfd, w1])
    finally:
        os.close(w1)                                   # the sender keeps and closes its own
        os.close(mfd)
    msgs = wk.recv_all()
    assert [m["op"] for m in msgs] == ["map", "plain", "irqs"]
    assert "tok" not in msgs[1] and msgs[0]["tok"] != msgs[2]["tok"]
    # the later token first: the earlier one stays buffered
    m_fd, w1b = wk.take_fds(msgs[2]["tok"])
    (w1a,) = wk.take_fds(msgs[0]["tok"])
    try:
        assert os.pread(m_fd, 12, 0) == b"guest memory"
        os.write(w1a, b"a")
        os.write(w1b, b"b")
        assert os.read(r1, 2) == b"ab"                 # both are the same pipe's write end
    finally:
        for fd in (m_fd, w1a, w1b, r1):
            os.close(fd)


def test_reply_direction_and_kick(pair: tuple[Channel, Channel]) -> None:
    fe, wk = pair
    wk.send({"op": "ack", "seq": 7})
    assert fe.recv_all() == [{"op": "ack", "seq": 7}]
    assert wk.rx.prepare_sleep()                       # the worker is about to sleep ...
    fe.kick()                                          # ... the front-end wakes it anyway
    assert os.eventfd_read(wk.rx.eventfd) >= 1


def test_unknown_token_times_out_and_close_releases_untaken_fds(pair: tuple[Channel, Channel]) -> None:
    fe, wk = pair
    before = _open_fds()
    r, w = os.pipe()
    try:
        fe.send({"op": "map"}, [r, w])
    finally:
        os.close(r)
        os.close(w)
    (m,) = wk.recv_all()
    with pytest.raises(TimeoutError):
        wk.take_fds(m["tok"] + 100)                    # never sent: a bounded wait, not a hang
    assert len(_open_fds() - before) == 2              # received, buffered, not taken
    wk.fd_rx.close()
    assert _open_fds() - before == set()


def test_garbage_on_the_fd_socket_is_refused(pair: tuple[Channel, Channel]) -> None:
    fe, wk = pair
    fe.sock.send(b"not an fdpass header at all.....")
    with pytest.raises(FdPassError):
        wk.take_fds(1)


def test_fds_cross_a_fork_before_the_message() -> None:
    """The worker is another process: it maps the memfd it got and writes into it."""
    a, b = ipc.pair()
    fe = Channel.create(a, f"/vnvt-chanf-{os.getpid()}")
    pid = os.fork()
    if pid == 0:   # child: the worker side
        code = 1
        try:
            fe.sock.close()
            wk = None
            while wk is None:
                wk = Channel.try_attach(b)
            assert wk.rx.wait(10)
            (m,) = wk.recv_all()
            (fd,) = wk.take_fds(m["tok"])
            os.pwrite(fd, b"written by the worker", m["off"])
            os.close(fd)
            wk.send({"op": "ack", "seq": m["seq"]})
            code = 0
        finally:
            os._exit(code)
    try:
        b.close()
        mfd = os.memfd_create("chan-fork")
        os.ftruncate(mfd, 4096)
        fe.send({"op": "map", "seq": 3, "off": 100}, [mfd])
        assert fe.rx.wait(10)
        assert fe.recv_all() == [{"op": "ack", "seq": 3}]
        assert os.pread(mfd, 21, 100) == b"written by the worker"
        os.close(mfd)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        fe.close(unlink=True)

