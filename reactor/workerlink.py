"""Front-end side of one worker channel, inside the front-end's asyncio loop.

Requests carry a `seq`; the worker answers `ack` with the same seq.  Two ways to wait:
`request()` (a Future, for the async vfio-user pipeline: quiesce) and `request_sync()`
(blocking with a bound, for admin commands that must not complete before a worker
did its part, e.g. Delete I/O SQ waits until the queue drained).  Messages that are
not acks (doorbell errors, slow-path commands, faults) go to `on_message`.
"""
from __future__ import annotations

import asyncio
import logging
import select
import time
from typing import Any, Callable

from reactor.channel import Channel

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
        self.chan.rx.prepare_sleep()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.remove_reader(self.chan.rx.fileno())
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

    def _broken(self, e: OSError) -> None:
        """The worker died (its end of the channel is gone): the link is dead from now on.

        Nothing to tell anyone: the supervisor restarts the worker and sends us a new
        channel ("worker"), which is where its queues are dealt with.  Until then every
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
            if left <= 0:
                self._waiting.pop(seq, None)
                while not self.chan.rx.prepare_sleep():
                    self.drain()
                raise TimeoutError(f"worker {self.wid} did not answer {msg.get('op')}")
            if self.chan.rx.prepare_sleep():
                select.select([self.chan.rx], [], [], min(left, 0.05))
            self.chan.rx.woke()
            self.drain()
        # Re-arm: the asyncio reader only sees our eventfd if the ring knows we sleep.
        while not self.chan.rx.prepare_sleep():
            self.drain()
        return self._acks.pop(seq)
