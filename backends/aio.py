"""Asynchronous backends: submit now, complete later, never block the caller.

Theory of operation
-------------------
A worker polls every queue it owns in one thread; a backend call that waits for a
disk or a network stalls all of them.  An asynchronous engine therefore only
*starts* a request (`submit`) and reports it finished later (`reap`), and it owns
one file descriptor (`fileno`) that becomes ready when it has something to report,
so an idle worker can sleep in epoll until a completion arrives.

    engine.submit(req)            never blocks; errors come back through reap too
    engine.reap(ready, out)       append finished requests to `out` (req.err set);
                                  ready=True: its fd was reported ready (drain it)
    engine.events()               epoll mask it wants now (EPOLLIN, | EPOLLOUT for a
                                  socket with unsent requests)
    engine.busy()                 submitted and not yet reaped
    engine.settle()               optional, eventfd engines: about to sleep; clear the
                                  notification of completions reap() already took
                                  (else the sleep ends at once for nothing); True if
                                  completions are waiting (then do not sleep)

`req.err` is 0 or a positive errno.  Engines never raise from submit/reap for I/O
failures: a lost connection fails the requests it carried with ENOTCONN (see
`RETRYABLE`), which the NVMe layer turns into a retryable status (DNR clear).

A backend that can run asynchronously offers `open_async() -> engine` (file: an
io_uring or thread-pool engine over its own fds; nbd/rbd return themselves).  Its
synchronous methods (the `Backend` protocol) keep working for callers without an
event loop of their own (the front-end's slow path, tools).

`AioQueue` bounds one namespace's depth towards its engine: at most `depth`
requests are submitted, the rest wait in FIFO order and go out as earlier ones
complete, so a guest queue of 1024 entries cannot flood an NBD server or a Ceph
cluster with 1024 requests from one worker.
"""
from __future__ import annotations

import errno
import os
import sys
from collections import deque
from enum import IntEnum
from typing import Any, Protocol, Sequence, runtime_checkable

DEFAULT_DEPTH = 32

# Errors that say "the path to the storage is down", not "the storage failed":
# the command may succeed if retried once the backend reconnects.
RETRYABLE = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                       errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                       errno.ECONNABORTED, errno.EAGAIN, errno.ECANCELED})


class Op(IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    WRITE_ZEROES = 3
    DISCARD = 4


class Req:
    """One backend request.  `bufs` are caller views (guest memory) kept alive until reaped.

    `owner` is the caller's (opaque here); engines keep their own per-request state in
    `priv` and set `err` before handing the request back.
    """
    __slots__ = ("op", "offset", "length", "bufs", "fua", "owner", "err", "priv")

    def __init__(self, op: int, offset: int, length: int, bufs: Sequence[memoryview] = (),
                 fua: bool = False, owner: Any = None) -> None:
        self.op = op
        self.offset = offset
        self.length = length
        self.bufs = bufs
        self.fua = fua
        self.owner = owner
        self.err = 0
        self.priv: Any = None


@runtime_checkable
class AsyncEngine(Protocol):
    def fileno(self) -> int: ...
    def events(self) -> int: ...
    def submit(self, req: Req) -> None: ...
    def reap(self, ready: bool, out: list[Req]) -> None: ...
    def busy(self) -> int: ...
    def close(self) -> None: ...


def open_async(backend: Any) -> AsyncEngine | None:
    """The backend's asynchronous engine, or None if it only works synchronously (ram, null)."""
    fn = getattr(backend, "open_async", None)
    return fn() if fn is not None else None


# CPython lets a thread that waits for the GIL take it only after the holder ran this long.
# A worker polls in one Python thread that holds the GIL all the time, so completions
# delivered by other threads (the file thread pool, librbd's callbacks) waited up to 5 ms
# (the default) each: 4 KiB QD32 O_DIRECT reads on the pool with a polling caller gave
# 2.0-2.5K IOPS at 5 ms, 8-12K at 0.1 ms (load ~13; 5-20K with a caller that sleeps).
# Only matters while another thread waits for the GIL, so it costs nothing otherwise.
GIL_SWITCH_S = 1e-4


def hand_gil_over_quickly() -> None:
    """Called by engines whose completions arrive on threads of their own."""
    if sys.getswitchinterval() > GIL_SWITCH_S:
        sys.setswitchinterval(GIL_SWITCH_S)


def drain_eventfd(fd: int) -> None:
    """Reset an engine's completion eventfd (non-blocking; empty is fine)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def scatter(data: Any, bufs: Sequence[memoryview]) -> None:
    """Copy a contiguous result (bytes/bytearray/memoryview) into the caller's views."""
    mv = memoryview(data)
    pos = 0
    for b in bufs:
        n = len(b)
        b[:] = mv[pos:pos + n]
        pos += n


def gather(bufs: Sequence[memoryview]) -> bytes | memoryview:
    """One contiguous buffer holding the caller's views (no copy for a single view)."""
    if len(bufs) == 1:
        return bufs[0]
    return b"".join(bufs)


class AioQueue:
    """Depth-bounded FIFO in front of one engine (one namespace in one process)."""

    __slots__ = ("engine", "depth", "wait", "name")

    def __init__(self, engine: AsyncEngine, depth: int = DEFAULT_DEPTH, name: str = "") -> None:
        if depth < 1:
            raise ValueError(f"queue depth {depth} must be >= 1")
        self.engine = engine
        self.depth = depth
        self.wait: deque[Req] = deque()
        self.name = name

    def submit(self, req: Req) -> None:
        if self.wait or self.engine.busy() >= self.depth:
            self.wait.append(req)
        else:
            self.engine.submit(req)

    def reap(self, ready: bool, out: list[Req]) -> None:
        self.engine.reap(ready, out)
        wait = self.wait
        if wait:
            eng = self.engine
            while wait and eng.busy() < self.depth:
                eng.submit(wait.popleft())

    def outstanding(self) -> int:
        return self.engine.busy() + len(self.wait)

    def fail_waiting(self, err: int, out: list[Req]) -> None:
        """Give back every request not yet submitted (namespace going away)."""
        while self.wait:
            r = self.wait.popleft()
            r.err = err
            out.append(r)
