"""A front-end <-> worker channel: two shared-memory rings plus an fd side-channel.

Theory of operation
-------------------
The front-end of a controller and a worker talk through two single-producer /
single-consumer rings (`reactor.shm.ring.Ring`, msgpack messages): one per
direction.  The front-end creates both rings (it is their creator and unlinks them);
the worker attaches.  File descriptors (guest memory fds, the doorbell memfd, IRQ
eventfds) cannot travel through shared memory, so each channel also has a
SOCK_SEQPACKET socketpair made by the supervisor.

The socket carries two kinds of traffic, in this order: first exactly one
`reactor.ipc` control message, the handshake (ring names + the two ring eventfds),
sent by `create` and read by `try_attach`; after it only `reactor.shm.fdpass`
batches (fds tagged with a token), the one fd-passing mechanism of the daemon.

Ordering rule: a message that refers to fds carries a token `tok`; the sender
sends the fds on the socket FIRST (`fdpass.send_fds`) and only then puts the
message in the ring.  The receiver therefore always finds the fds already queued in
the socket when it reads the message (`take_fds` -> `FdReceiver.take`, which buffers
other tokens that arrive first, so they may be taken in any order).

Wake-ups: each ring has an eventfd; a consumer about to sleep announces it
(`Ring.prepare_sleep`) and the producer writes the eventfd only then.  `kick()` writes
the inbound ring's eventfd of the peer unconditionally: the front-end uses it when a
trapped doorbell write must wake a sleeping worker.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from reactor import ipc
from reactor.shm.fdpass import FdReceiver, send_fds
from reactor.shm.ring import Ring

RING_CAPACITY = 1 << 20
FD_TIMEOUT = 2.0    # the fds are queued before the message that names them: seconds is generous


class Channel:
    def __init__(self, sock: socket.socket, tx: Ring, rx: Ring) -> None:
        self.sock = sock
        self.tx = tx
        self.rx = rx
        # Created only after the handshake was sent/read, so it never sees that message.
        self.fd_rx = FdReceiver(sock)
        self._next_tok = 1
        sock.setblocking(False)

    # --- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, sock: socket.socket, prefix: str) -> "Channel":
        """Front-end side: make both rings and tell the worker their names."""
        tx = Ring.create(f"{prefix}-a", RING_CAPACITY)
        rx = Ring.create(f"{prefix}-b", RING_CAPACITY)
        sock.setblocking(True)
        try:
            ipc.send(sock, {"op": "rings", "a": tx.name, "b": rx.name}, [tx.eventfd, rx.eventfd])
        except OSError:
            for r in (tx, rx):     # the worker is gone: the rings are ours to remove
                r.close()
                r.unlink()
            raise
        return cls(sock, tx, rx)

    @classmethod
    def try_attach(cls, sock: socket.socket) -> "Channel | None":
        """Worker side: attach (never unlink) once the front-end sent its ring names.

        Non-blocking: None while the front-end is still starting, so a worker never
        stalls the queues it already serves waiting for a new controller.
        """
        sock.setblocking(False)
        try:
            msg, fds = ipc.recv(sock)
        except (BlockingIOError, InterruptedError):
            return None
        if msg is None or msg.get("op") != "rings" or len(fds) != 2:
            ipc.close_fds(fds)
            raise ConnectionError("front-end channel closed before it sent its rings")
        rx = Ring.attach(msg["a"], fds[0])
        tx = Ring.attach(msg["b"], fds[1])
        return cls(sock, tx, rx)

    # --- messages -------------------------------------------------------------------
    def send(self, msg: dict[str, Any], fds: list[int] | None = None, timeout: float = 2.0) -> None:
        """Put `msg` in the ring; its `fds` (if any) go first on the socket under a new token."""
        if fds:
            tok = self._next_tok
            self._next_tok += 1
            send_fds(self.sock, tok, fds, timeout=timeout)
            msg["tok"] = tok
        if not self.tx.put(msg):
            self.tx.put_wait(msg, timeout)

    def recv_all(self, limit: int = 1024) -> list[dict[str, Any]]:
        return self.rx.get_all(limit)

    def take_fds(self, tok: int) -> list[int]:
        """The fds sent with token `tok` (already queued on the socket, see the ordering rule).

        The caller owns them.  TimeoutError / ConnectionError / FdPassError if the
        peer broke the ordering rule, went away, or sent garbage.
        """
        return self.fd_rx.take(tok, FD_TIMEOUT)

    def kick(self) -> None:
        """Wake the peer's consumer of our tx ring, whether or not it said it sleeps."""
        try:
            os.eventfd_write(self.tx.eventfd, 1)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        """Both rings unmapped (close() may have to be called again: Ring.close)."""
        return self.tx.closed and self.rx.closed

    def close(self, unlink: bool) -> None:
        self.fd_rx.close()     # fds received for messages nobody took
        for r in (self.tx, self.rx):
            try:
                r.close()
                if unlink:
                    r.unlink()
            except Exception:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
