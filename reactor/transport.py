"""The vfio-user socket edge: framing of (bytes, fds) and asyncio send/receive.

Theory of operation
-------------------
Framing (bytes + fds -> messages, fd attribution and ownership) is sans-I/O in
`vfio_user.framing` and re-exported here.

`Transport` wraps a non-blocking socket for asyncio: `recv_chunk()` awaits
readability and does one `recvmsg` (MSG_CMSG_CLOEXEC); `recv_chunk(peek=True)` + `take(n)`
read in two steps - look, then consume - for a reader that must record a request
outside the process before it leaves the socket (reactor/session.py); `send()` does `sendmsg` with
the fds on the first byte and finishes partial writes when the socket drains.
Sends are serialised with a lock so a DMA request never interleaves with a reply.
"""
from __future__ import annotations

import asyncio
import errno
import select
import socket

from vfio_user import scm
from vfio_user.errors import StreamError
from vfio_user.framing import Frame, Framer, close_fds, whole_frames
from vfio_user.wire import Header

__all__ = ["Frame", "Framer", "Transport", "close_fds", "peer_hung_up", "whole_frames"]

# SCM_MAX_FD is 253 on Linux: room for every fd a single sendmsg can carry, so we
# see (and refuse) an over-long fd list instead of the kernel truncating it.
_MAX_FDS_PER_RECV = 253
RECV_CHUNK = 256 * 1024


def peer_hung_up(sock: socket.socket) -> bool:
    """The peer closed (or reset) its end: an EOF or error is pending on `sock` (no read)."""
    if sock.fileno() < 0:
        return True
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))


class Transport:
    """A connected non-blocking AF_UNIX stream socket, used from one event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def _wait(self, writer: bool) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.sock.fileno()
        add, remove = ((loop.add_writer, loop.remove_writer) if writer
                       else (loop.add_reader, loop.remove_reader))
        add(fd, lambda: None if fut.done() else fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def recv_chunk(self, peek: bool = False) -> tuple[bytes, list[int], bool]:
        """One recvmsg: (data, fds, fds_truncated).  b"" means EOF.

        `peek`: copy the bytes without consuming them (MSG_PEEK).  Fds riding on the
        bytes shown come as duplicates (the socket keeps its own for the read that takes
        them); the bytes end right after the skb that carries them, so they belong to
        the message holding the last byte."""
        flags = socket.MSG_CMSG_CLOEXEC | (socket.MSG_PEEK if peek else 0)
        while True:
            if self._closed:
                return b"", [], False
            try:
                got = scm.recv(self.sock, RECV_CHUNK, _MAX_FDS_PER_RECV, flags)
            except (BlockingIOError, InterruptedError):
                await self._wait(writer=False)
                continue
            except (ConnectionResetError, OSError):
                return b"", [], False
            return got.data, got.fds, got.fds_truncated

    def recv_now(self) -> tuple[bytes, list[int], bool]:
        """One recvmsg of bytes known to be queued (a peek showed them)."""
        got = scm.recv(self.sock, RECV_CHUNK, _MAX_FDS_PER_RECV)
        return got.data, got.fds, got.fds_truncated

    def take(self, n: int, nfds: int) -> bytes:
        """Consume `n` bytes that a peek showed, with the `nfds` fds it showed on
        them; the fds taken are closed (the peek's duplicates are the ones kept)."""
        got = scm.recv(self.sock, n, _MAX_FDS_PER_RECV)
        close_fds(got.fds)
        if len(got.fds) != nfds or got.fds_truncated:
            raise StreamError(errno.EPROTO, f"{len(got.fds)} fds taken where the peek showed {nfds}")
        return got.data

    async def send(self, header: Header, payload: bytes = b"",
                   fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one whole message; the fds go with its first byte.  We keep our fds."""
        data = memoryview(header.encode() + payload)
        async with self._send_lock:
            pending = list(fds)
            while data:
                if self._closed:
                    raise ConnectionError("transport closed")
                try:
                    n = scm.send(self.sock, data, pending)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writer=True)
                    continue
                pending = []      # fds went with the first byte sent
                data = data[n:]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass
