"""vfio_user/scm.py: the one SCM_RIGHTS send/receive, over real socketpairs."""
from __future__ import annotations

import fcntl
import os
import socket

import pytest

from vfio_user import scm


def test_fds_travel_with_the_first_byte_and_arrive_cloexec() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        assert scm.send(a, b"hello", [r, w]) == 5
        got = scm.recv(b, 64)
        assert got.data == b"hello" and len(got.fds) == 2 and not got.fds_truncated
        for fd in got.fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(got.fds[1], b"x")                  # the duplicate of w writes into our pipe
        assert os.read(r, 1) == b"x"
        scm.close_fds(got.fds + got.fds)            # closing twice is harmless
        assert scm.send(a, b"plain") == 5
        got = scm.recv(b, 64)
        assert (got.data, got.fds) == (b"plain", [])
    finally:
        scm.close_fds([r, w])
        a.close()
        b.close()


def test_truncation_is_reported() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        scm.send(a, b"x" * 100, [r, w, r])
        got = scm.recv(b, 10, maxfds=1)             # datagram cut, fds beyond 1 dropped
        assert got.data_truncated and got.fds_truncated and len(got.fds) < 3   # cmsg space rounds up
        scm.close_fds(got.fds)
        with pytest.raises(ValueError):
            scm.send(a, b"y", [r] * (scm.SCM_MAX_FD + 1))
    finally:
        scm.close_fds([r, w])
        a.close()
        b.close()


def test_flags_reach_recvmsg() -> None:
    """MSG_DONTWAIT on a blocking socket: nothing queued is BlockingIOError, not a hang."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(BlockingIOError):
            scm.recv(b, 16, flags=socket.MSG_DONTWAIT)
    finally:
        a.close()
        b.close()
