"""Control messages between vnvmed's own processes: msgpack over SOCK_SEQPACKET, fds attached.

Theory of operation: every control channel (supervisor<->worker, supervisor<->front-end)
is an AF_UNIX SOCK_SEQPACKET socketpair.  SEQPACKET keeps message boundaries, so one
`sendmsg` is one message with its fds (SCM_RIGHTS) and nothing needs framing.  These
channels carry rare control traffic; the busy front-end<->worker traffic goes through
the shared-memory rings (reactor/shm/ring.py), whose fds travel on a socketpair of the
same kind with `reactor.shm.fdpass` (after one handshake message from here, see
reactor/channel.py).

fd ownership: `send` never closes the caller's fds (the kernel dups them into the
message); `recv` returns fds the caller now owns and must close.  Received fds of a
message the caller cannot use must be closed by the caller (see `close_fds`).
"""
from __future__ import annotations

import socket
from typing import Any

import msgpack

from vfio_user import scm

MAX_MSG = 1 << 20
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253)


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_MSG:
        raise ValueError(f"control message of {len(data)} bytes is too large")
    if len(fds) > MAX_FDS:
        raise ValueError("too many fds in one control message")
    scm.send(sock, data, fds)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) when the peer closed.  Raises BlockingIOError if none."""
    r = scm.recv(sock, MAX_MSG, MAX_FDS)
    data, got = r.data, r.fds
    if not data:
        close_fds(got)
        return None, []
    if r.data_truncated or r.fds_truncated:
        close_fds(got)
        raise ValueError("truncated control message")
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as e:  # a peer we spawned sent garbage: our bug, say so
        close_fds(got)
        raise ValueError(f"undecodable control message: {e}") from e
    if not isinstance(msg, dict):
        close_fds(got)
        raise ValueError("control message is not a map")
    return msg, got


close_fds = scm.close_fds
