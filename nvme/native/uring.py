"""NativeRing: the io_uring ring of one file namespace in one worker slot (uring.c).

The C loop (fastpath.c) puts Reads/Writes/Flushes of the namespace on it and reaps it
(NativeQueueRunner.reap_native); Python only owns its lifetime and its eventfd:

    ring = NativeRing(fd, dfd, depth)    # OSError if the kernel says no (then: Python engine)
    ring.fileno()                        # completion eventfd (the worker sleeps on it)
    ring.busy(qid=-1)                    # requests in flight (of one SQ)
    ring.settle() / ring.drain()         # eventfd bookkeeping before/after a sleep
    ring.close()                         # after the runner took back what was in flight

`depth` is the namespace's queue-depth bound (backends.aio.AioQueue's for the Python
engine): at most that many requests are in the kernel at once.
"""
from __future__ import annotations

import os
from typing import Any


class NativeRing:
    def __init__(self, fd: int, dfd: int, depth: int) -> None:
        from . import ffi, lib, why_not
        if lib is None:
            raise OSError(0, f"native data path unavailable: {why_not}")
        self._ffi, self._lib = ffi, lib
        ptr = lib.vn_ring_open(fd, dfd, depth)
        if ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"io_uring set-up failed: {os.strerror(err)}")
        self.ptr: Any = ptr
        self.depth = depth
        self._fd = lib.vn_ring_fileno(ptr)

    def fileno(self) -> int:
        return self._fd

    def busy(self, qid: int = -1) -> int:
        return int(self._lib.vn_ring_busy(self.ptr, qid)) if self.ptr is not None else 0

    def settle(self) -> bool:
        """About to sleep: clear the eventfd count of polled completions; True if a
        completion is ready now (do not sleep)."""
        return bool(self._lib.vn_ring_settle(self.ptr)) if self.ptr is not None else False

    def drain(self) -> None:
        if self.ptr is not None:
            self._lib.vn_ring_drain(self.ptr)

    def close(self) -> None:
        if self.ptr is not None:
            self._lib.vn_ring_close(self.ptr)
            self.ptr = None
