"""Transport.peek_chunk/take (reactor/transport.py) on a real AF_UNIX stream pair: a
look leaves bytes and fds in the socket, and says when fds ride on what it showed."""
import asyncio
import os
import socket

import pytest

from reactor.transport import Transport
from vfio_user import scm
from vfio_user.errors import StreamError


def test_peek_leaves_bytes_and_fds_and_says_fds_are_there() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    efd = os.eventfd(0)
    t = Transport(b)
    try:
        a.sendall(b"plain")
        got = asyncio.run(t.peek_chunk())
        assert got == (b"plain", False)
        assert t.take(5) == b"plain"
        scm.send(a, b"withfd", [efd])
        data, fds_pending = asyncio.run(t.peek_chunk())
        assert (data, fds_pending) == (b"withfd", True)
        before = len(os.listdir("/proc/self/fd"))
        data, fds, trunc = t.recv_now()      # the fds are still there for the real read
        assert data == b"withfd" and len(fds) == 1 and not trunc
        assert len(os.listdir("/proc/self/fd")) == before + 1
        scm.close_fds(fds)
        # bytes peeked without fds, then a take that meets fds: refused, nothing leaks
        a.sendall(b"ab")
        scm.send(a, b"cd", [efd])
        assert asyncio.run(t.peek_chunk()) == (b"abcd", True)
        with pytest.raises(StreamError):
            t.take(4)
        a.close()
        assert asyncio.run(t.peek_chunk()) == (b"", False)          # EOF
    finally:
        os.close(efd)
        t.close()
