"""RAM backend in POSIX shared memory, visible to the front-end and every worker.

Ownership: the creator makes `/<prefix>-ns-<n>` (O_CREAT|O_EXCL, so a name clash
picks the next n), sizes it with ftruncate and is the ONLY one that unlinks it
(`destroy()`).  Attachers (`attach`) map it by name and never unlink — the reason
for posix_ipc over multiprocessing.shared_memory, whose resource tracker on 3.11
may unlink on an attacher's exit.  Data is copied with memoryview slice
assignment (one memcpy, no intermediate bytes object).
"""
from __future__ import annotations

import itertools
import mmap
from typing import Any, Sequence

import posix_ipc

from .base import check_range

_counter = itertools.count()

# Pre-fault the mapping (Linux >= 5.14 MADV_POPULATE_READ/WRITE): a first touch of a
# shm page costs a page fault (measured ~8 us here), i.e. 32 faults for every new
# 128 KiB I/O - 10x the I/O itself.  The creator allocates the pages once (a RAM disk
# holds its size in RAM anyway), attachers only map them (~0.12 s per GiB).  Skipped
# above POPULATE_MAX and silently on kernels without the advice: then faults happen
# lazily as before.
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23
POPULATE_MAX = 4 << 30


def _populate(mm: mmap.mmap, size: int, write: bool) -> None:
    # Transparent huge pages first, where the shm mount allows them (tmpfs mounted with
    # huge=advise, within_size or always; Debian's /dev/shm has none: then a no-op).  A
    # cold 128 KiB copy out of 4 KiB pages costs 32 page walks and the prefetcher stops
    # at every page end: 8.7-10.7 us here against 5.3 us from huge pages, and 128 KiB
    # reads QD8 go from ~14.8 to 17-21 GB/s (benchmarks/README.md, issue 14).
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        pass
    if size > POPULATE_MAX:
        return
    try:
        mm.madvise(_MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)
    except (OSError, ValueError):
        pass


class RamBackend:
    def __init__(self, name: str, size: int, read_only: bool, owner: bool) -> None:
        shm = posix_ipc.SharedMemory(name)
        try:
            if shm.size < size:
                raise ValueError(f"shm {name} is {shm.size} bytes, spec says {size}")
            self._mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        _populate(self._mm, size, write=not read_only)
        self._mv = memoryview(self._mm)
        self.name = name
        self.size = size
        self.read_only = read_only
        self._owner = owner

    @classmethod
    def create(cls, size: int, *, name_prefix: str, read_only: bool = False) -> "RamBackend":
        if size < 512:
            raise ValueError(f"ram backend size {size} is smaller than one 512-byte block")
        while True:
            name = f"/{name_prefix}-ns-{next(_counter)}"
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
            except posix_ipc.ExistentialError:
                continue
            shm.close_fd()
            break
        try:
            return cls(name, size, read_only, owner=True)
        except BaseException:
            posix_ipc.unlink_shared_memory(name)
            raise

    @classmethod
    def attach(cls, name: str, size: int, read_only: bool = False) -> "RamBackend":
        try:
            return cls(name, size, read_only, owner=False)
        except posix_ipc.ExistentialError:
            raise ValueError(f"ram backend shm {name!r} does not exist (was it destroyed?)") from None

    # The native data path (nvme/native) copies to and from this memory itself.
    native_kind = "ram"

    @property
    def direct_memory(self) -> memoryview:
        return self._mv

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        mv = self._mv
        for b in bufs:
            n = len(b)
            b[:] = mv[offset:offset + n]
            offset += n

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        mv = self._mv
        for b in bufs:
            n = len(b)
            mv[offset:offset + n] = b
            offset += n

    def flush(self) -> None:
        pass  # volatile by definition

    def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        from .null import zero_fill
        zero_fill([self._mv[offset:offset + length]])

    discard = write_zeroes  # deallocated blocks read back as zeroes

    def spec(self) -> dict[str, Any]:
        return {"kind": "ram", "shm": self.name, "size": self.size, "read_only": self.read_only}

    def close(self) -> None:
        if self._mm.closed:
            return
        self._mv.release()
        self._mm.close()

    def take_ownership(self) -> None:
        """A live upgrade moved the namespace to us: we unlink it at destroy() now."""
        self._owner = True

    def destroy(self) -> None:
        self.close()
        if self._owner:
            self._owner = False
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass
