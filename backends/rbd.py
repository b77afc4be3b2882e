"""`rbd:POOL/IMAGE[?conf=PATH&id=USER&keyring=PATH]` namespaces through librbd
(Debian `python3-rados` / `python3-rbd`).

Theory of operation
-------------------
Like `nbd:`: the creator connects once (bounded by CONNECT_TIMEOUT) to check the
cluster answers, the credentials work, the pool and image exist and the image is
big enough, turns any failure into a one-line ValueError, and disconnects.  Each
worker's `open_async()` makes an `RbdEngine` with its own cluster connection.
Connecting to RADOS blocks for a network round trip or more, so the engine
connects on a thread of its own; requests submitted meanwhile wait for it.

librbd completes asynchronous requests on its own finisher thread: the callback
only appends the request to a deque and writes an eventfd (the engine's fileno),
so completions are handed to the worker thread and never run worker code on a
librbd thread.  The python binding reads into a bytes object of its own and
writes from bytes, so data is copied once each way between guest memory and
librbd.  librbd reconnects to monitors and OSDs by itself; a request waits while
an OSD is away (the guest's command timeout decides), one that fails comes back
with librbd's errno.

Mapping: Flush -> aio_flush; Write Zeroes and Deallocate -> aio_write_zeroes
(librbd deallocates whole objects and zeroes partial ones, so deallocated blocks
read back as zeroes; a plain discard may skip partial objects and would not);
FUA -> the write, then a flush, before completing.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque
from typing import Any, Sequence
from urllib.parse import parse_qs

from .aio import Op, Req, drain_eventfd, hand_gil_over_quickly, scatter
from .base import MIN_SIZE

CONNECT_TIMEOUT = 10   # seconds: rados connect + monitor commands

try:
    import rados as _rados
    import rbd as _rbd
except Exception:  # pragma: no cover - depends on the machine
    _rados = _rbd = None


def unavailable() -> str | None:
    if _rados is None or _rbd is None:
        return "Ceph Python bindings not importable (Debian packages python3-rados, python3-rbd; " \
               "run with a Python that sees Debian's dist-packages, e.g. scripts/setup's .venv)"
    return None


def parse_target(arg: str) -> dict[str, str]:
    """'pool/image?conf=...&id=...&keyring=...' -> {'pool','image','conf','id','keyring'}; ValueError if bad."""
    path, _, query = arg.partition("?")
    pool, sep, image = path.partition("/")
    if not sep or not pool or not image or "/" in image:
        raise ValueError(f"rbd target {arg!r} must be POOL/IMAGE[?conf=PATH&id=USER&keyring=PATH]")
    q = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    bad = set(q) - {"conf", "id", "keyring"}
    if bad:
        raise ValueError(f"rbd target {arg!r}: unknown option(s) {', '.join(sorted(bad))} (use conf, id, keyring)")
    t = {"pool": pool, "image": image, "conf": q.get("conf", ["/etc/ceph/ceph.conf"])[-1],
         "id": q.get("id", ["admin"])[-1]}
    if "keyring" in q:
        t["keyring"] = q["keyring"][-1]
    return t


def _connect(t: dict[str, str]) -> tuple[Any, Any, Any]:
    """(cluster, ioctx, image) or ValueError with a one-line reason."""
    if unavailable():
        raise ValueError(f"rbd: backend unavailable: {unavailable()}")
    where = f"rbd:{t['pool']}/{t['image']}"
    if not os.path.exists(t["conf"]):
        raise ValueError(f"{where}: ceph config {t['conf']!r} does not exist (give ?conf=PATH)")
    conf = {"client_mount_timeout": str(CONNECT_TIMEOUT), "rados_mon_op_timeout": str(CONNECT_TIMEOUT)}
    if "keyring" in t:
        conf["keyring"] = t["keyring"]
    cluster = ioctx = None
    try:
        cluster = _rados.Rados(conffile=t["conf"], rados_id=t["id"], conf=conf)
        cluster.connect(timeout=CONNECT_TIMEOUT)
        ioctx = cluster.open_ioctx(t["pool"])
        image = _rbd.Image(ioctx, t["image"])
        return cluster, ioctx, image
    except Exception as e:
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()
        raise ValueError(f"{where}: {_describe(e, t)}") from None


def _describe(e: Exception, t: dict[str, str]) -> str:
    name = type(e).__name__
    if name == "PermissionDeniedError" or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
        return f"permission denied for client.{t['id']} (wrong id or keyring?)"
    if name == "ObjectNotFound":
        return f"pool {t['pool']!r} does not exist"
    if name == "ImageNotFound":
        return f"image {t['image']!r} does not exist in pool {t['pool']!r}"
    if name == "TimedOut" or getattr(e, "errno", None) == errno.ETIMEDOUT:
        return f"cluster did not answer within {CONNECT_TIMEOUT} s"
    return f"{name}: {e}"


class RbdBackend:
    """Synchronous face (Backend protocol) + `open_async()` for workers."""
    depth: int | None = None   # requests in flight per worker, None = backends.aio.DEFAULT_DEPTH

    def __init__(self, arg: str, size: int, read_only: bool = False) -> None:
        self.arg = arg
        self.target = parse_target(arg)
        self.size = size
        self.read_only = read_only
        self._conn: tuple[Any, Any, Any] | None = None

    @classmethod
    def create(cls, arg: str, size: int | None = None, read_only: bool = False) -> "RbdBackend":
        t = parse_target(arg)
        cluster, ioctx, image = _connect(t)
        try:
            have = image.size()
        finally:
            image.close()
            ioctx.close()
            cluster.shutdown()
        where = f"rbd:{t['pool']}/{t['image']}"
        if size is None:
            size = have
        elif have < size:
            raise ValueError(f"{where}: image is {have} bytes, smaller than the configured {size}")
        if size < MIN_SIZE:
            raise ValueError(f"{where}: image is {size} bytes, smaller than one {MIN_SIZE}-byte block")
        return cls(arg, size, read_only)

    @classmethod
    def attach(cls, spec: dict[str, Any]) -> "RbdBackend":
        if unavailable():
            raise ValueError(f"rbd: backend unavailable: {unavailable()}")
        return cls(str(spec["target"]), int(spec["size"]), bool(spec.get("read_only", False)))

    # -- synchronous (front-end slow path, tools) ------------------------------
    def _image(self) -> Any:
        if self._conn is None:
            try:
                self._conn = _connect(self.target)
            except ValueError as e:
                raise OSError(errno.ENOTCONN, str(e)) from None
        return self._conn[2]

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        scatter(self._image().read(offset, sum(len(b) for b in bufs)), bufs)

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only backend")
        self._image().write(b"".join(bufs), offset)

    def flush(self) -> None:
        if not self.read_only:
            self._image().flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._image().write_zeroes(offset, length)

    discard = write_zeroes

    def open_async(self) -> "RbdEngine":
        return RbdEngine(self.target)

    def spec(self) -> dict[str, Any]:
        return {"kind": "rbd", "target": self.arg, "size": self.size, "read_only": self.read_only,
                "depth": self.depth}

    def close(self) -> None:
        if self._conn is not None:
            cluster, ioctx, image = self._conn
            self._conn = None
            image.close()
            ioctx.close()
            cluster.shutdown()

    def destroy(self) -> None:
        self.close()   # the image belongs to the cluster


class RbdEngine:
    """librbd aio driven from the worker; connects on a thread (see the module docstring)."""

    needs_readiness = False   # completions are queued by librbd's thread; reap just pops them

    def __init__(self, target: dict[str, str]) -> None:
        self.target = target
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: deque[Req] = deque()
        self._waiting: deque[Req] = deque()
        self._lock = threading.Lock()       # guards _image/_waiting hand-over with the connect thread
        self._image: Any = None
        self._conn: tuple[Any, Any, Any] | None = None
        self._failed = ""
        self._busy = 0
        self._closed = False
        self._unread = False                # requests taken without draining the eventfd
        hand_gil_over_quickly()             # librbd's callback threads need the worker's GIL
        threading.Thread(target=self._connect, daemon=True, name="vnvmed-rbd-connect").start()

    def _connect(self) -> None:
        try:
            conn = _connect(self.target)
        except ValueError as e:
            with self._lock:
                self._failed = str(e)
                waiting, self._waiting = self._waiting, deque()
            for r in waiting:
                self._complete(r, errno.ENOTCONN)
            return
        with self._lock:
            if self._closed:
                conn[2].close()
                conn[1].close()
                conn[0].shutdown()
                return
            self._conn = conn
            self._image = conn[2]
            waiting, self._waiting = self._waiting, deque()
        for r in waiting:
            self._send(r)

    # -- engine protocol -------------------------------------------------------
    def fileno(self) -> int:
        return self._efd

    def events(self) -> int:
        return 1

    def busy(self) -> int:
        return self._busy

    def submit(self, req: Req) -> None:
        self._busy += 1
        req.err = 0
        if self._image is None:
            with self._lock:
                if self._image is None:
                    if self._failed:
                        req.err = errno.ENOTCONN
                        self._done.append(req)
                    else:
                        self._waiting.append(req)
                    return
        self._send(req)

    def _send(self, req: Req) -> None:
        img = self._image
        op = req.op
        try:
            if op == Op.READ:
                img.aio_read(req.offset, req.length, lambda c, data, r=req: self._read_done(r, c, data))
            elif op == Op.WRITE:
                bufs = req.bufs
                data = bytes(bufs[0]) if len(bufs) == 1 else b"".join(bufs)
                img.aio_write(data, req.offset, lambda c, r=req: self._write_done(r, c))
            elif op == Op.FLUSH:
                img.aio_flush(lambda c, r=req: self._complete(r, -c.get_return_value()))
            else:
                img.aio_write_zeroes(req.offset, req.length,
                                     lambda c, r=req: self._complete(r, -c.get_return_value()))
        except Exception as e:
            self._complete(req, getattr(e, "errno", None) or errno.EIO)

    # librbd finisher thread from here -----------------------------------------
    def _read_done(self, req: Req, comp: Any, data: Any) -> None:
        ret = comp.get_return_value()
        if ret < 0:
            self._complete(req, -ret)
            return
        if ret != req.length:
            self._complete(req, errno.EIO)
            return
        req.priv = data                   # copied into guest memory by the worker thread (reap)
        self._complete(req, 0)

    def _write_done(self, req: Req, comp: Any) -> None:
        ret = comp.get_return_value()
        if ret < 0 or not req.fua:
            self._complete(req, -ret if ret < 0 else 0)
            return
        req.fua = False
        try:
            self._image.aio_flush(lambda c, r=req: self._complete(r, -c.get_return_value()))
        except Exception as e:
            self._complete(req, getattr(e, "errno", None) or errno.EIO)

    def _complete(self, req: Req, err: int) -> None:
        req.err = err
        self._done.append(req)
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass                          # closed: nobody reaps any more
    # ---------------------------------------------------------------------------

    def reap(self, ready: bool, out: list[Req]) -> None:
        if ready:
            drain_eventfd(self._efd)
            self._unread = False
        done = self._done
        if done and not ready:
            self._unread = True          # each one also counted on the eventfd
        while done:
            req = done.popleft()
            self._busy -= 1
            if req.priv is not None:
                if not req.err:
                    scatter(req.priv, req.bufs)
                req.priv = None
            out.append(req)

    def settle(self) -> bool:
        if self._unread and self._efd >= 0:
            self._unread = False
            drain_eventfd(self._efd)
        return bool(self._done)          # finished before the drain: do not sleep on them

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn, self._image = self._conn, None, None
        if conn is not None:
            cluster, ioctx, image = conn
            try:
                image.close()          # waits for its outstanding aio
            finally:
                ioctx.close()
                cluster.shutdown()
        os.close(self._efd)
        self._efd = -1
