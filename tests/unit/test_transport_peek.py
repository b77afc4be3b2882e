"""Transport.recv_chunk(peek=True)/take (reactor/transport.py) on a real AF_UNIX stream pair: a
look leaves bytes and fds in the socket (it gets duplicates of the fds), and a take
consumes exactly what the look showed."""
import asyncio
import os
import socket

import pytest

from reactor.transport import Transport
from vfio_user import scm
from vfio_user.errors import StreamError


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_peek_leaves_bytes_and_fds_and_take_consumes_them() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    efd = os.eventfd(0)
    t = Transport(b)
    try:
        a.sendall(b"plain")
        assert asyncio.run(t.recv_chunk(peek=True)) == (b"plain", [], False)
        assert t.take(5, 0) == b"plain"
        # fds: the peek shows the bytes up to and including the skb that carries them,
        # with duplicates of the fds; a second peek shows the same again
        a.sendall(b"ab")
        scm.send(a, b"cd", [efd])
        a.sendall(b"ef")
        data, fds, trunc = asyncio.run(t.recv_chunk(peek=True))
        assert (data, len(fds), trunc) == (b"abcd", 1, False) and same_file(fds[0], efd)
        data2, fds2, _ = asyncio.run(t.recv_chunk(peek=True))
        assert data2 == b"abcd" and len(fds2) == 1 and fds2[0] != fds[0]
        scm.close_fds(fds2)
        before = len(os.listdir("/proc/self/fd"))
        assert t.take(4, 1) == b"abcd"                 # the taken copy is closed
        assert len(os.listdir("/proc/self/fd")) == before
        assert asyncio.run(t.recv_chunk(peek=True)) == (b"ef", [], False)
        scm.close_fds(fds)
        before = len(os.listdir("/proc/self/fd"))
        # a take that meets a different number of fds than the peek showed is refused,
        # and closes what it got
        with pytest.raises(StreamError):
            t.take(2, 1)
        scm.send(a, b"gh", [efd])
        with pytest.raises(StreamError):
            t.take(2, 0)
        assert len(os.listdir("/proc/self/fd")) == before
        a.close()
        assert asyncio.run(t.recv_chunk(peek=True)) == (b"", [], False)          # EOF
    finally:
        os.close(efd)
        t.close()
