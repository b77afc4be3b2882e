"""Guest memory and backends with PROT_NONE guard pages, for the fuzz targets.

Theory of operation
-------------------
Every bounds check in the data path is done in Python (`GuestMemory.view`, PRP/SGL
walkers, `Namespace.byte_range`); what it hands out are memoryviews, and CPython
bounds-checks every slice of a memoryview, so pure Python code cannot step outside a
region.  Code that works on raw addresses can: `os.preadv`/`pwritev` into views,
ctypes helpers, and the native data path (issue 14) that takes a view's address and
a length.  So each region here is the middle of one anonymous mapping whose first
and last pages are mprotect(PROT_NONE): an access just past either end, by any code,
faults, and the process dies with SIGSEGV.  The fuzz runner counts such deaths as
*guard hits* (a crash class of its own, never expected).

`GuardedRegion`   one mapping: guard | data | guard; `.data` is the region view.
`guarded_memory`  a FlatMemory whose regions are GuardedRegions (RW and RO ones).
`GuardedBackend`  a Backend over a GuardedRegion (the namespace's bytes).
"""
from __future__ import annotations

import ctypes
import mmap
from typing import Any, Sequence

from backends.base import check_range
from nvme.memory import FlatMemory

PAGE = mmap.PAGESIZE
PROT_NONE = 0           # <sys/mman.h>; the mmap module does not export it
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _mprotect(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(prot)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect({addr:#x}, {length:#x}, {prot})")


class GuardedRegion:
    """`size` bytes (a multiple of the page size) between two PROT_NONE pages."""

    def __init__(self, size: int, guard: int = PAGE) -> None:
        if size <= 0 or size % PAGE or guard % PAGE:
            raise ValueError("size and guard must be positive multiples of the page size")
        self.size = size
        self.guard = guard
        self._mm = mmap.mmap(-1, size + 2 * guard, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        # Address of the mapping: a ctypes char array over the buffer, dropped at once
        # (it would pin the mmap's exports otherwise).
        cbuf = (ctypes.c_char * len(self._mm)).from_buffer(self._mm)
        self.base = ctypes.addressof(cbuf)
        del cbuf
        _mprotect(self.base, guard, PROT_NONE)
        _mprotect(self.base + guard + size, guard, PROT_NONE)
        self._whole = memoryview(self._mm)
        self.data = self._whole[guard:guard + size]

    def close(self) -> None:
        self.data.release()
        self._whole.release()
        # Restore access before unmapping is not needed: munmap ignores protection.
        self._mm.close()


def guarded_memory(layout: Sequence[tuple[int, int, bool]]) -> tuple[FlatMemory, list[GuardedRegion]]:
    """A FlatMemory with one GuardedRegion per (guest address, size, writable)."""
    mem = FlatMemory()
    regions: list[GuardedRegion] = []
    for addr, size, writable in layout:
        r = GuardedRegion(size)
        regions.append(r)
        mem.add(addr, r.data, writable=writable)
    return mem, regions


class GuardedBackend:
    """A RAM-like Backend over a guarded region: writes past the end hit a guard page."""

    read_only = False

    def __init__(self, size: int) -> None:
        self.region = GuardedRegion(size)
        self.size = size
        self._mv = self.region.data

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            n = len(b)
            b[:] = self._mv[offset:offset + n]
            offset += n

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            n = len(b)
            self._mv[offset:offset + n] = b
            offset += n

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        self._mv[offset:offset + length] = bytes(length)

    discard = write_zeroes

    def spec(self) -> dict[str, Any]:
        return {"kind": "guarded", "size": self.size}

    def close(self) -> None:
        self.region.close()

    def destroy(self) -> None:
        self.close()
