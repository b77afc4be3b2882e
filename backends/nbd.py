"""`nbd:URI` namespaces through libnbd (Debian `python3-libnbd`).

URIs are libnbd's: `nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`.

Theory of operation
-------------------
The creator (supervisor, `vnvmectl namespace add`) connects once with a deadline to
check the server is there, the export is big enough and writable if it must be;
the answer is a one-line ValueError, then that connection is closed.  Every other
process attaches from `spec()` without connecting: the front-end connects only if
its slow path ever needs data (blocking, rare); each worker's `open_async()` makes
its own `NbdEngine` with its own connection, so workers never share a socket.

NbdEngine drives libnbd's asynchronous API from the worker loop.  Its `fileno()`
is an epoll set of its own holding the current socket with the direction libnbd
wants (read, or read+write while requests are unsent), so the worker's epoll sees
one stable fd across reconnects.  Reads land directly in guest memory when the
command's buffer is one view (nbd.Buffer.from_buffer shares it); several views go
through a bounce buffer.  Completions arrive as libnbd callbacks run inside
aio_notify_read(), in this thread.

Connection loss (server killed, socket reset): every request in flight fails
with ENOTCONN, which the NVMe layer reports as a retryable status (DNR clear), the
handle is dropped, and the next request starts a fresh non-blocking connect; while
a connect is under way requests wait for it (bounded by CONNECT_TIMEOUT); after a
failed connect requests fail at once until RETRY_INTERVAL has passed.  So a guest
sees retryable errors while the server is down and I/O resumes by itself after.
A stopped (not dead) server is not timed out here: the guest's own command timeout
and Abort decide.

Mapping: Flush -> NBD_CMD_FLUSH; Write Zeroes -> NBD_CMD_WRITE_ZEROES with NO_HOLE;
Deallocate -> NBD_CMD_WRITE_ZEROES without NO_HOLE (the server may punch a hole, and
the blocks read back as zeroes, which is what we promise for deallocated blocks; a
plain NBD_CMD_TRIM would not promise that); FUA ->
NBD_CMD_FLAG_FUA, or a flush after the write when the server has no FUA.
"""
from __future__ import annotations

import errno
import select
import time
from collections import deque
from typing import Any, Sequence

from .aio import Op, Req, scatter
from .base import MIN_SIZE

CONNECT_TIMEOUT = 5.0      # a connect (create-time check, or a worker's reconnect) gives up after this
RETRY_INTERVAL = 0.5       # after a failed connect, fail requests at once for this long

try:
    import nbd as _nbd
except Exception:  # pragma: no cover - depends on the machine
    _nbd = None


def unavailable() -> str | None:
    if _nbd is None:
        return "libnbd Python binding not importable (Debian package python3-libnbd; run with a " \
               "Python that sees Debian's dist-packages, e.g. scripts/setup's .venv)"
    return None


def _require() -> Any:
    why = unavailable()
    if why:
        raise ValueError(f"nbd: backend unavailable: {why}")
    return _nbd


def _close(h: Any) -> None:
    """Close a handle now (the binding closes on __del__; do not wait for the GC).

    libnbd 1.22 (Debian 13) has NBD.close(), which sets `_o` to None, and a __del__ that
    reads `_o` (deleting it there printed "Exception ignored ... no attribute '_o'" on
    stderr); 1.14 (Debian 12) has no close() and a __del__ that skips a handle without `_o`.
    """
    o = getattr(h, "_o", None)
    if o is None:
        return
    if hasattr(type(h), "close"):
        h.close()
    else:
        del h._o
        _nbd.libnbdmod.close(o)


def _err_of(e: Exception) -> int:
    return getattr(e, "errno", None) or errno.ENOTCONN


def _connect_blocking(uri: str, timeout: float) -> Any:
    """A connected handle, or ValueError with a one-line reason."""
    nbd = _require()
    h = nbd.NBD()
    h.set_handle_name("vnvmed")
    try:
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        fd = h.aio_get_fd()
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise ValueError(f"nbd: {uri}: connection failed: {h.get_error() if hasattr(h, 'get_error') else 'dead'}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"nbd: {uri}: no answer within {timeout:.0f} s")
            d = h.aio_get_direction()
            r, w, _ = select.select([fd] if d & 1 else [], [fd] if d & 2 else [], [], min(left, 0.1))
            if r:
                h.aio_notify_read()
            if w:
                h.aio_notify_write()
    except nbd.Error as e:
        _close(h)
        raise ValueError(f"nbd: {uri}: {e.string if hasattr(e, 'string') else e}") from None
    except BaseException:
        _close(h)
        raise
    return h


class NbdBackend:
    """Synchronous face (Backend protocol) + `open_async()` for workers."""
    depth: int | None = None   # requests in flight per worker, None = backends.aio.DEFAULT_DEPTH

    def __init__(self, uri: str, size: int, read_only: bool = False) -> None:
        self.uri = uri
        self.size = size
        self.read_only = read_only
        self._h: Any = None

    @classmethod
    def create(cls, uri: str, size: int | None = None, read_only: bool = False) -> "NbdBackend":
        """Check the export now (one-line ValueError on anything wrong), keep no connection."""
        h = _connect_blocking(uri, CONNECT_TIMEOUT)
        try:
            have = h.get_size()
            if not read_only and h.is_read_only():
                raise ValueError(f"nbd: {uri}: the export is read-only: set read_only = true (or ',ro')")
        finally:
            _close(h)
        if size is None:
            size = have
        elif have < size:
            raise ValueError(f"nbd: {uri}: export is {have} bytes, smaller than the configured {size}")
        if size < MIN_SIZE:
            raise ValueError(f"nbd: {uri}: export is {size} bytes, smaller than one {MIN_SIZE}-byte block")
        return cls(uri, size, read_only)

    @classmethod
    def attach(cls, spec: dict[str, Any]) -> "NbdBackend":
        _require()
        return cls(str(spec["uri"]), int(spec["size"]), bool(spec.get("read_only", False)))

    # -- synchronous (front-end slow path, tools) ------------------------------
    def _handle(self) -> Any:
        if self._h is None or self._h.aio_is_dead() or self._h.aio_is_closed():
            if self._h is not None:
                _close(self._h)
                self._h = None
            try:
                self._h = _connect_blocking(self.uri, CONNECT_TIMEOUT)
            except ValueError as e:
                raise OSError(errno.ENOTCONN, str(e)) from None
        return self._h

    def _sync(self, fn: str, *args: Any) -> Any:
        h = self._handle()
        try:
            return getattr(h, fn)(*args)
        except _nbd.Error as e:
            if h.aio_is_dead():
                _close(h)
                self._h = None
            raise OSError(_err_of(e), str(e)) from None

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        scatter(self._sync("pread", total, offset), bufs)

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only backend")
        self._sync("pwrite", b"".join(bufs), offset)

    def flush(self) -> None:
        if not self.read_only:
            self._sync("flush")

    def write_zeroes(self, offset: int, length: int) -> None:
        self._sync("zero", length, offset, _nbd.CMD_FLAG_NO_HOLE)

    def discard(self, offset: int, length: int) -> None:
        self._sync("zero", length, offset)

    def open_async(self) -> "NbdEngine":
        return NbdEngine(self.uri, self.read_only)

    def spec(self) -> dict[str, Any]:
        return {"kind": "nbd", "uri": self.uri, "size": self.size, "read_only": self.read_only,
                "depth": self.depth}

    def close(self) -> None:
        if self._h is not None:
            _close(self._h)
            self._h = None

    def destroy(self) -> None:
        self.close()   # the export belongs to its server


class NbdEngine:
    """One libnbd connection driven asynchronously (see the module docstring)."""

    needs_readiness = True   # completions only appear after the socket is serviced

    def __init__(self, uri: str, read_only: bool = False) -> None:
        self.nbd = _require()
        self.uri = uri
        self.read_only = read_only
        self._ep = select.epoll()
        self._h: Any = None
        self._fd = -1
        self._mask = 0
        self._connecting_since = 0.0
        self._retry_at = 0.0
        self._inflight: dict[int, Req] = {}   # id(req) -> req, sent to the server
        self._waiting: deque[Req] = deque()   # waiting for a connect to finish
        self._done: deque[Req] = deque()
        self._busy = 0
        self._can_fua = False
        self.connects = 0                     # successful connects (statistics, tests)
        self.last_error = ""

    # -- engine protocol -------------------------------------------------------
    def fileno(self) -> int:
        return self._ep.fileno()

    def events(self) -> int:
        return select.EPOLLIN

    def busy(self) -> int:
        return self._busy

    def submit(self, req: Req) -> None:
        self._busy += 1
        req.err = 0
        if self._h is None:
            self._start_connect()
        if self._h is None:
            self._fail(req, errno.ENOTCONN)
        elif self._connecting_since:
            self._waiting.append(req)
        else:
            self._send(req)
        self._rearm()

    def reap(self, ready: bool, out: list[Req]) -> None:
        h = self._h
        if h is not None and (ready or self._connecting_since):
            self._service()
        done = self._done
        while done:
            out.append(done.popleft())
            self._busy -= 1

    def close(self) -> None:
        self._drop(errno.ECANCELED)
        self._ep.close()

    # -- internals ---------------------------------------------------------------
    def _fail(self, req: Req, err: int) -> None:
        req.err = err
        self._done.append(req)

    def _start_connect(self) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        h = self.nbd.NBD()
        h.set_handle_name("vnvmed-worker")
        try:
            h.aio_connect_uri(self.uri)
        except self.nbd.Error as e:
            _close(h)
            self.last_error = str(e)
            self._retry_at = now + RETRY_INTERVAL
            return
        self._h = h
        self._fd = h.aio_get_fd()
        self._mask = 0
        self._connecting_since = now
        self._ep.register(self._fd, 0)
        self._advance_connect()

    def _advance_connect(self) -> None:
        h = self._h
        if h.aio_is_ready():
            self._connecting_since = 0.0
            self.connects += 1
            try:
                self._can_fua = bool(h.can_fua())
            except self.nbd.Error:
                self._can_fua = False
            while self._waiting:
                self._send(self._waiting.popleft())
        elif h.aio_is_dead() or h.aio_is_closed() or \
                time.monotonic() - self._connecting_since > CONNECT_TIMEOUT:
            self.last_error = "connect failed or timed out"
            self._drop(errno.ENOTCONN)
            self._retry_at = time.monotonic() + RETRY_INTERVAL

    def _send(self, req: Req) -> None:
        nbd, h = self.nbd, self._h
        op = req.op
        cb = _Completion(self, req)
        try:
            if op == Op.READ:
                bufs = req.bufs
                if len(bufs) == 1:
                    buf = nbd.Buffer.from_buffer(bufs[0])
                else:
                    buf = nbd.Buffer.from_buffer(bytearray(req.length))
                    req.priv = buf
                h.aio_pread(buf, req.offset, completion=cb)
            elif op == Op.WRITE:
                bufs = req.bufs
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                flags = nbd.CMD_FLAG_FUA if req.fua and self._can_fua else 0
                if req.fua and not self._can_fua:
                    cb.then_flush = True
                h.aio_pwrite(nbd.Buffer.from_buffer(data), req.offset, completion=cb, flags=flags)
            elif op == Op.FLUSH:
                h.aio_flush(completion=cb)
            elif op == Op.WRITE_ZEROES:
                h.aio_zero(req.length, req.offset, completion=cb, flags=nbd.CMD_FLAG_NO_HOLE)
            else:
                h.aio_zero(req.length, req.offset, completion=cb)
        except nbd.Error as e:
            err = _err_of(e)
            self._fail(req, err)
            if h.aio_is_dead() or h.aio_is_closed():
                self._drop(errno.ENOTCONN)
            return
        self._inflight[id(req)] = req

    def _completed(self, cb: "_Completion", err: int) -> None:
        req = cb.req
        if self._inflight.pop(id(req), None) is None:
            return                               # already failed by _drop
        if not err and cb.then_flush and self._h is not None:
            cb.then_flush = False
            try:
                self._h.aio_flush(completion=cb)
                self._inflight[id(req)] = req
                return
            except self.nbd.Error as e:
                err = _err_of(e)
        if not err and req.priv is not None:
            scatter(req.priv.to_buffer(), req.bufs)
        req.priv = None
        self._fail(req, err)

    def _service(self) -> None:
        h = self._h
        try:
            d = h.aio_get_direction()
            if d & 1:
                h.aio_notify_read()
            if d & 2 and self._mask & select.EPOLLOUT:
                h.aio_notify_write()
        except self.nbd.Error as e:
            self.last_error = str(e)
        if self._h is not h:
            return
        if h.aio_is_dead() or h.aio_is_closed():
            self._drop(errno.ENOTCONN)
            return
        if self._connecting_since:
            self._advance_connect()
        self._rearm()

    def _rearm(self) -> None:
        h = self._h
        if h is None:
            return
        if h.aio_is_dead() or h.aio_is_closed():
            self._drop(errno.ENOTCONN)
            return
        d = h.aio_get_direction()
        mask = (select.EPOLLIN if d & 1 else 0) | (select.EPOLLOUT if d & 2 else 0)
        if mask != self._mask:
            try:
                self._ep.modify(self._fd, mask)
            except OSError:          # libnbd closed the socket under us: connection gone
                self._drop(errno.ENOTCONN)
                return
            self._mask = mask

    def _drop(self, err: int) -> None:
        """Connection gone: fail everything it carried, forget the handle."""
        h, self._h = self._h, None
        if h is not None:
            try:
                self._ep.unregister(self._fd)
            except (OSError, ValueError):
                pass
            try:
                _close(h)      # may run completion callbacks of in-flight commands
            except Exception:
                pass
        self._fd = -1
        self._connecting_since = 0.0
        for req in list(self._inflight.values()):
            req.priv = None
            self._fail(req, err)
        self._inflight.clear()
        while self._waiting:
            self._fail(self._waiting.popleft(), err)


class _Completion:
    """libnbd completion callback for one request (returns 1: retire the command)."""
    __slots__ = ("eng", "req", "then_flush")

    def __init__(self, eng: NbdEngine, req: Req) -> None:
        self.eng = eng
        self.req = req
        self.then_flush = False

    def __call__(self, err: Any) -> int:
        e = getattr(err, "value", err) or 0
        self.eng._completed(self, e)
        return 1
