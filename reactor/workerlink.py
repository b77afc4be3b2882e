"""Front-end side of one worker channel, inside the front-end's asyncio loop.

Requests carry a `seq`; the worker answers `ack` with the same seq.  Two ways to wait:
`request()` (a Future, for the async vfio-user pipeline: quiesce) and `request_sync()`
(blocking with a bound, for admin commands that must not complete before a worker
did its part, e.g. Delete I/O SQ waits until the queue drained).  Messages that are
not acks (doorbell errors, slow-path commands, faults) go to `on_message`.

A worker's death is seen at once: the worker's end of the channel's fd socket closes
with it (nobody else holds it), so the socket hangs up.  From then on the link is
dead: waiting requests fail with ConnectionError ("gone") and `request_sync` raises
that instead of waiting out its bound.  The supervisor's
"worker" message with the replacement comes later (after the restart).  Callers treat
"gone" as "nothing to wait for": the replacement gets the queues placed on the dead
worker from the queue table (reactor/recovery.py) - unlike a worker that is alive
but does not answer (TimeoutError), which makes the controller fatal.
"""
from __future__ import annotations

import asyncio
import logging
import select
import time
from typing import Any, Callable

from reactor.channel import Channel
from reactor.transport import peer_hung_up

log = logging.getLogger("vnvmed.frontend")


class WorkerLink:
    def __init__(self, wid: int, chan: Channel, on_message: Callable[[int, dict], None]) -> None:
        self.wid = wid
        self.chan = chan
        self.on_message = on_message
        self._seq = 0
        self._waiting: dict[int, asyncio.Future | None] = {}
        self._acks: dict[int, dict] = {}
        self.alive = True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.chan.rx.fileno(), self._readable)
        # Only the worker's hang-up makes our end of the fd socket readable (workers
        # never send fds): the moment of its death (see the module doc).
        loop.add_reader(self.chan.sock.fileno(), self._hung_up)
        self.chan.rx.prepare_sleep()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        for fd in (self.chan.rx.fileno(), self.chan.sock.fileno()):
            try:
                loop.remove_reader(fd)
            except Exception:
                pass
        self.alive = False
        for f in self._waiting.values():
            if f is not None and not f.done():
                f.set_exception(ConnectionError(f"worker {self.wid} is gone"))
        self._waiting.clear()

    def _readable(self) -> None:
        self.chan.rx.woke()
        while True:
            self.drain()
            if self.chan.rx.prepare_sleep():
                return

    def drain(self) -> None:
        for msg in self.chan.recv_all():
            if msg.get("op") == "ack":
                if "t" in msg:                 # stamped by the worker: stamp its arrival too
                    msg["arr"] = time.monotonic_ns()
                seq = msg.get("seq")
                if seq in self._waiting:
                    fut = self._waiting.pop(seq)
                    if fut is None:
                        self._acks[seq] = msg
                    elif not fut.done():
                        fut.set_result(msg)
                continue
            try:
                self.on_message(self.wid, msg)
            except Exception:
                log.exception("worker %d message %r", self.wid, msg.get("op"))

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if not self.alive:
            return
        try:
            self.chan.send(msg, fds)
        except OSError as e:
            self._broken(e)

    def _hung_up(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.chan.sock.fileno())
        except Exception:
            pass
        if peer_hung_up(self.chan.sock):
            self._broken(ConnectionError("the worker exited"))
        else:       # data from a worker on this socket: not our protocol (never spin on it)
            log.error("worker %d: unexpected data on the channel's fd socket", self.wid)

    def _broken(self, e: OSError) -> None:
        """The worker died (its end of the channel is gone): the link is dead from now on.

        The supervisor restarts the worker and sends us a new channel ("worker"), which
        is where its queues are dealt with.  Until then every
        send to this link is dropped and every request fails with ConnectionError, so a
        DMA_MAP or SET_IRQS racing the death is not an internal error (found by the
        stress suite, issue 12).
        """
        if self.alive:
            log.info("worker %d: channel broken (%s); waiting for its replacement", self.wid, e)
        self.alive = False
        for f in self._waiting.values():
            if f is not None and not f.done():
                f.set_exception(ConnectionError(f"worker {self.wid} is gone"))
        self._waiting.clear()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def request(self, msg: dict[str, Any], fds: list[int] | None = None) -> "asyncio.Future[dict]":
        seq = self._next()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        if not self.alive:
            fut.set_exception(ConnectionError(f"worker {self.wid} is gone"))
            return fut
        self._waiting[seq] = fut
        msg["seq"] = seq
        try:
            self.chan.send(msg, fds)
        except OSError as e:
            self._broken(e)
        return fut

    def request_sync(self, msg: dict[str, Any], fds: list[int] | None = None,
                     timeout: float = 2.0) -> dict:
        if not self.alive:
            raise ConnectionError(f"worker {self.wid} is gone")
        seq = self._next()
        self._waiting[seq] = None
        msg["seq"] = seq
        try:
            self.chan.send(msg, fds)
        except OSError as e:
            self._broken(e)
            raise ConnectionError(f"worker {self.wid} is gone: {e}") from None
        deadline = time.monotonic() + timeout
        while seq not in self._acks:
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive:
                self._waiting.pop(seq, None)
                while not self.chan.rx.prepare_sleep():
                    self.drain()
                if not self.alive:
                    raise ConnectionError(f"worker {self.wid} is gone")
                raise TimeoutError(f"worker {self.wid} did not answer {msg.get('op')}")
            if self.chan.rx.prepare_sleep():
                waitables: list[Any] = [self.chan.rx, self.chan.sock]
                r, _, _ = select.select(waitables, [], [], min(left, 0.05))
                if self.chan.sock in r and peer_hung_up(self.chan.sock):
                    self.drain()          # whatever it answered before it died
                    if seq in self._acks:
                        break
                    self._broken(ConnectionError("the worker exited"))
                    continue
            self.chan.rx.woke()
            self.drain()
        # Re-arm: the asyncio reader only sees our eventfd if the ring knows we sleep.
        while not self.chan.rx.prepare_sleep():
            self.drain()
        return self._acks.pop(seq)
