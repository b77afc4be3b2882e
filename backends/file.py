"""File / block-device backend: preadv/pwritev straight into guest-memory views.

* Size: st_size for regular files, the BLKGETSIZE64 ioctl for block devices.
* Short transfers are looped on (advancing through the iovec list); a read that
  hits EOF (the file shrank under us) is an EIO, never silent garbage.
* iovec lists are cut at IOV_MAX.
* O_DIRECT (optional, spec {"direct": true}) needs aligned buffers; guest buffers
  may not be (PRP1 offsets, SGL), so an EINVAL on the direct fd is retried once on a
  second, buffered fd of the same file.
* flush = fdatasync; discard = fallocate(PUNCH_HOLE|KEEP_SIZE), write zeroes =
  fallocate(ZERO_RANGE|KEEP_SIZE); either falls back to writing zeroes when the
  filesystem/device says EOPNOTSUPP.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from typing import Any, Sequence

from .base import MIN_SIZE, check_range, total_len

BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    _fallocate.restype = ctypes.c_int

_ZERO = memoryview(bytes(1 << 20))


def _fallocate_or_none(fd: int, mode: int, offset: int, length: int) -> bool:
    """True if done; False if unsupported here (caller falls back)."""
    if _fallocate is None:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes from an iovec list."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


class FileBackend:
    depth: int | None = None   # requests in flight per worker (backends.aio), None = default
    def __init__(self, path: str, read_only: bool = False, direct: bool = False) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ValueError(f"file backend {path!r} does not exist: create it (e.g. truncate -s 1G {path})") from None
        is_blk = stat.S_ISBLK(st.st_mode)
        if not (is_blk or stat.S_ISREG(st.st_mode)):
            raise ValueError(f"file backend {path!r} is not a regular file or block device")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(path, flags)
        self._dfd = -1
        try:
            if is_blk:
                buf = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
                size = struct.unpack("<Q", buf)[0]
            else:
                size = os.fstat(self._fd).st_size
            if size < MIN_SIZE:
                raise ValueError(f"file backend {path!r} is {size} bytes, smaller than one {MIN_SIZE}-byte "
                                 f"block: grow it (e.g. truncate -s 1G {path})")
            if direct:
                self._dfd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
        except BaseException:
            os.close(self._fd)
            raise
        self.path = path
        self.size = size
        self.read_only = read_only
        self.direct = direct

    # -- data -----------------------------------------------------------------
    def _xfer(self, fn: Any, offset: int, bufs: Sequence[memoryview], reading: bool) -> None:
        todo = [b for b in bufs if len(b)]
        fd = self._dfd if self._dfd >= 0 else self._fd
        while todo:
            chunk = todo[:IOV_MAX]
            try:
                n = fn(fd, chunk, offset)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno == errno.EINVAL and fd == self._dfd:
                    fd = self._fd            # misaligned for O_DIRECT: buffered retry
                    continue
                raise
            if n == 0:
                raise OSError(errno.EIO, f"{'read' if reading else 'write'} at {offset} hit end of {self.path}")
            offset += n
            todo = _advance(todo, n)

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        # Fast path: one syscall that moves everything (the usual case).  Anything
        # else (short transfer, EINTR, O_DIRECT misalignment, > IOV_MAX) is redone
        # by _xfer from the start, which is harmless: a read/write is idempotent.
        if len(bufs) <= IOV_MAX:
            try:
                n = os.preadv(self._dfd if self._dfd >= 0 else self._fd, bufs, offset)
                if n == total_len(bufs):
                    return
            except OSError:
                pass
        self._xfer(os.preadv, offset, bufs, True)

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only backend")
        if len(bufs) <= IOV_MAX:   # fast path, see read_into
            try:
                n = os.pwritev(self._dfd if self._dfd >= 0 else self._fd, bufs, offset)
                if n == total_len(bufs):
                    return
            except OSError:
                pass
        self._xfer(os.pwritev, offset, bufs, False)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(_ZERO))
            self._xfer(os.pwritev, offset, [_ZERO[:n]], False)
            offset += n
            length -= n

    def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        if length and not _fallocate_or_none(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            self._write_zero_bytes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        if length and not _fallocate_or_none(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            self._write_zero_bytes(offset, length)

    def native_fds(self) -> tuple[int, int]:
        """(buffered fd, O_DIRECT fd or -1) for the native data path's io_uring ring
        (nvme/native/uring.c), which follows the same EINVAL-retry rule."""
        return self._fd, self._dfd

    def open_async(self) -> Any:
        """An engine for workers (backends.aio): io_uring when available, else a thread pool."""
        from .uring import ThreadPoolEngine, UringEngine, uring_unavailable
        why = uring_unavailable()
        if why is None:
            try:
                return UringEngine(self._fd, self._dfd)
            except OSError as e:
                why = f"io_uring set-up failed: {e}"
        # Said once per namespace and worker: the pool costs ~2x the CPU per I/O and its
        # threads need the GIL from a worker that polls (benchmarks/README.md, storage).
        import logging
        logging.getLogger("vnvmed.worker").warning(
            "file %s: %s: thread pool instead of io_uring (slower)", self.path, why)
        from .aio import DEFAULT_DEPTH
        return ThreadPoolEngine(self, threads=self.depth or DEFAULT_DEPTH)

    # -- lifecycle ------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path, "size": self.size,
                "read_only": self.read_only, "direct": self.direct, "depth": self.depth}

    def close(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def destroy(self) -> None:
        self.close()  # the file belongs to the user: never deleted
