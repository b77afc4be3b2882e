"""File descriptors over a UNIX socket (SCM_RIGHTS): the project's one send and receive.

Everything that passes fds goes through these three functions: `send` is the standard
library's `socket.send_fds`; `recv` is `socket.recv_fds` done by hand, because on Python
3.11 `recv_fds` drops its `flags` argument (MSG_CMSG_CLOEXEC, MSG_DONTWAIT never reach
recvmsg).  Users: the vfio-user server and test client
(stream sockets: DMA_MAP memfds, IRQ eventfds, the BAR0 memfd), the supervisor's control
sockets (reactor/ipc.py) and the front-end -> worker fd channel (reactor/shm/fdpass.py).
A live upgrade hands its fds over with the same calls.

Rules the callers rely on:

* `send()` attaches the fds to the first byte it sends, in one sendmsg; a short send
  on a stream socket means the fds went with the bytes that did go (send the rest
  without fds).  The caller keeps its fds: the kernel installs duplicates in the peer.
* `recv()` receives close-on-exec fds (MSG_CMSG_CLOEXEC by default) and says whether
  the kernel dropped some (MSG_CTRUNC: more fds than `maxfds`) or cut a datagram
  (MSG_TRUNC).  Whatever it returns, the fds are the caller's to close (`close_fds`).
* On a stream socket the fds of one recvmsg belong to the chunk's *last* byte
  (vfio_user/framing.py explains the Linux behaviour behind this).
"""
from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field
from typing import Iterable

SCM_MAX_FD = 253          # Linux: most fds one sendmsg may carry


@dataclass(slots=True)
class Received:
    data: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False     # MSG_CTRUNC: the kernel closed fds that did not fit
    data_truncated: bool = False    # MSG_TRUNC: a datagram larger than bufsize was cut


def send(sock: socket.socket, data: bytes | memoryview, fds: Iterable[int] = ()) -> int:
    """One sendmsg of `data` with `fds` attached; returns the bytes sent."""
    fds = list(fds)
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"{len(fds)} fds in one message (at most {SCM_MAX_FD})")
    if not fds:
        return sock.send(data)
    return socket.send_fds(sock, [data], fds)


def recv(sock: socket.socket, bufsize: int, maxfds: int = SCM_MAX_FD,
         flags: int = socket.MSG_CMSG_CLOEXEC) -> Received:
    """One recvmsg of at most `bufsize` bytes and `maxfds` fds (BlockingIOError if none)."""
    fds = array.array("i")
    data, anc, msg_flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * fds.itemsize), flags)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return Received(data, list(fds), bool(msg_flags & socket.MSG_CTRUNC),
                    bool(msg_flags & socket.MSG_TRUNC))


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring the ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
