"""File descriptors between our processes, over a UNIX socketpair with SCM_RIGHTS.

Theory of operation
===================

Rings carry msgpack messages but cannot carry file descriptors (guest-memory
memfds, MSI-X eventfds, ring eventfds). Those travel on a UNIX socketpair next
to the rings, tagged with a *token* (u64 chosen by the sender):

1. The sender calls ``send_fds(sock, token, fds)`` and only then puts the ring
   message that mentions ``token`` (e.g. ``{"op": "map", "fd_token": 7}``).
   sendmsg() has queued the fds in the receiver's socket before the message is
   published, so ring order and fd order agree.
2. The receiver, on reading the message, calls ``receiver.take(token, timeout)``.
   Messages for other tokens that arrive first are buffered by token, so
   several tokens may be in flight and taken in any order.

Wire format: each sendmsg carries a 24-byte header (magic, total fd count of
the token, token, index of the first fd in this batch, fds in this batch) and
up to 253 fds (the kernel's SCM_MAX_FD). A token with more fds is split into
batches; a token with none sends one header without ancillary data.
SOCK_SEQPACKET (fd_socketpair()) keeps message boundaries; SOCK_STREAM also
works because we read exactly one header at a time and the kernel never merges
the data of two sendmsg calls that carry fds into one recvmsg.

fd ownership: send_fds() does not close the caller's fds (the kernel dups them
into the message). Received fds belong to the FdReceiver until take() hands
them to the caller; close() closes everything still buffered, and a malformed
or truncated message closes whatever fds came with it before raising, so no
path leaks an fd. Received fds are close-on-exec (MSG_CMSG_CLOEXEC).
"""
from __future__ import annotations

import select
import socket
import struct
import time

from vfio_user import scm

__all__ = ["SCM_MAX_FD", "FdPassError", "fd_socketpair", "send_fds", "FdReceiver"]

SCM_MAX_FD = scm.SCM_MAX_FD
_MAGIC = 0x4446_4E56  # 'VNFD'
_HDR = struct.Struct("<IIQII")  # magic, total, token, first index, count
_MAX_TOTAL = 1 << 20  # sanity bound on fds per token


class FdPassError(Exception):
    """Malformed fd-passing traffic (bad header, truncated fds, token reuse)."""


def fd_socketpair() -> tuple[socket.socket, socket.socket]:
    """A close-on-exec AF_UNIX SOCK_SEQPACKET pair for send_fds()/FdReceiver."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send_fds(sock: socket.socket, token: int, fds: list[int],
             timeout: float | None = None) -> None:
    """Send ``fds`` tagged with ``token``; the caller keeps (and closes) its fds.

    Blocks until queued (on a non-blocking socket, up to ``timeout`` s, then
    TimeoutError). Raises ValueError for a token outside u64 or a negative fd.
    """
    if not 0 <= token < 1 << 64:
        raise ValueError(f"token {token} out of u64 range")
    fds = list(fds)
    if len(fds) > _MAX_TOTAL or any(fd < 0 for fd in fds):
        raise ValueError("bad fd list")
    deadline = None if timeout is None else time.monotonic() + timeout
    starts = range(0, len(fds), SCM_MAX_FD) if fds else range(0, 1)
    for first in starts:
        batch = fds[first:first + SCM_MAX_FD]
        hdr = _HDR.pack(_MAGIC, len(fds), token, first, len(batch))
        while True:
            try:
                sent = scm.send(sock, hdr, batch)
                break
            except BlockingIOError:
                _wait_fd(sock, select.POLLOUT, deadline)
        if sent != len(hdr):  # only possible on a stream socket under pressure
            raise FdPassError(f"short send of fd header ({sent}/{len(hdr)} bytes)")


def _wait_fd(sock: socket.socket, events: int, deadline: float | None) -> None:
    if deadline is None:
        ms = None
    else:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("fd passing socket not ready")
        ms = int(left * 1000) + 1
    p = select.poll()
    p.register(sock, events)
    if not p.poll(ms) and deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError("fd passing socket not ready")


_close_all = scm.close_fds


class FdReceiver:
    """Receives fd batches from one socket and hands them out by token.

    Not thread-safe; one receiver per socket. Does not own the socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ready: dict[int, list[int]] = {}
        self._partial: dict[int, tuple[int, list[int]]] = {}  # token -> (total, fds so far)
        self._buf = b""              # partial header (stream sockets only)
        self._buf_fds: list[int] = []
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def pending_tokens(self) -> list[int]:
        """Tokens whose fds have fully arrived and not been taken."""
        return sorted(self._ready)

    def take(self, token: int, timeout: float | None) -> list[int]:
        """The fds sent with ``token``, in the sender's order; caller owns them now.

        Receives (and buffers other tokens) until they are complete. Raises
        TimeoutError, ConnectionError if the peer closed, FdPassError on
        malformed traffic.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while token not in self._ready:
            if not self._recv_one():
                _wait_fd(self._sock, select.POLLIN, deadline)
        return self._ready.pop(token)

    def poll(self) -> int:
        """Receive whatever is queued now without blocking; returns messages read."""
        self._check_open()
        n = 0
        while self._recv_one():
            n += 1
        return n

    def close(self) -> None:
        """Close every fd received but not taken. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fds in self._ready.values():
            _close_all(fds)
        for _, fds in self._partial.values():
            _close_all(fds)
        _close_all(self._buf_fds)
        self._ready.clear(); self._partial.clear(); self._buf_fds = []

    def __enter__(self) -> "FdReceiver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("FdReceiver is closed")

    def _recv_one(self) -> bool:
        """Read at most one message; False if nothing was available."""
        want = _HDR.size - len(self._buf)
        try:
            got = scm.recv(self._sock, want, SCM_MAX_FD,
                           socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return False
        data = got.data
        self._buf_fds.extend(got.fds)
        if got.fds_truncated or got.data_truncated:
            self._drop_partial_header()
            raise FdPassError("fd message truncated (too many fds or oversized header)")
        if not data:
            self._drop_partial_header()
            raise ConnectionError("fd passing peer closed the socket")
        self._buf += data
        if len(self._buf) < _HDR.size:
            return True  # stream socket split the header; the rest follows
        hdr, fds = self._buf, self._buf_fds
        self._buf, self._buf_fds = b"", []
        self._accept(hdr, fds)
        return True

    def _drop_partial_header(self) -> None:
        _close_all(self._buf_fds)
        self._buf, self._buf_fds = b"", []

    def _accept(self, hdr: bytes, fds: list[int]) -> None:
        magic, total, token, first, count = _HDR.unpack(hdr)
        problem = None
        if magic != _MAGIC:
            problem = f"bad magic {magic:#x}"
        elif count != len(fds) or count > SCM_MAX_FD or total > _MAX_TOTAL:
            problem = f"token {token}: header says {count} fds, got {len(fds)}"
        elif token in self._ready:
            problem = f"token {token} reused before it was taken"
        if problem is None:
            prev_total, so_far = self._partial.get(token, (total, []))
            if prev_total != total or first != len(so_far) or first + count > total:
                problem = f"token {token}: batch {first}+{count} does not follow {len(so_far)}/{total}"
        if problem is not None:
            _close_all(fds)
            raise FdPassError(problem)
        so_far = so_far + fds
        if len(so_far) == total:
            self._partial.pop(token, None)
            self._ready[token] = so_far
        else:
            self._partial[token] = (total, so_far)
