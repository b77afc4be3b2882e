"""The DMA region table: which guest IOVA ranges the client mapped.

Pure bookkeeping; what an entry *holds* (an mmap, nothing) is the `handle`, owned
by the caller.  Every bound is computed on Python ints, so a range ending at or
beyond 2^64 is refused instead of wrapping (SPDK's target wrapped here and wrote
outside guest memory).  Lookups are O(log n) with bisect over sorted starts.

Errors (as DMA_MAP/DMA_UNMAP replies want them): zero size, unaligned or
out-of-2^64 ranges -> EINVAL; overlap -> EEXIST; unmapping an unknown range ->
ENOENT, a range that starts a region but differs in size -> EINVAL;
too many regions -> ENOSPC.  `find` raises EFAULT.
"""
from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import ProtocolError

ADDR_LIMIT = 1 << 64
PAGE = 4096


@dataclass(slots=True)
class DmaEntry:
    iova: int
    size: int
    readable: bool
    writable: bool
    handle: Any = None

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaTable:
    def __init__(self, max_regions: int = 65535, align: int = PAGE) -> None:
        self._starts: list[int] = []
        self._entries: list[DmaEntry] = []
        self.max_regions = max_regions
        self.align = align

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[DmaEntry]:
        return iter(list(self._entries))

    def add(self, iova: int, size: int, readable: bool, writable: bool,
            handle: Any = None) -> DmaEntry:
        if size <= 0 or iova < 0 or iova + size > ADDR_LIMIT:
            raise ProtocolError(errno.EINVAL, f"DMA range {iova:#x}+{size:#x} invalid")
        if iova % self.align or size % self.align:
            raise ProtocolError(errno.EINVAL, f"DMA range {iova:#x}+{size:#x} not aligned")
        if len(self._entries) >= self.max_regions:
            raise ProtocolError(errno.ENOSPC, "too many DMA regions")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._entries[i - 1].end > iova:
            raise ProtocolError(errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps")
        if i < len(self._entries) and iova + size > self._entries[i].iova:
            raise ProtocolError(errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps")
        entry = DmaEntry(iova, size, readable, writable, handle)
        self._starts.insert(i, iova)
        self._entries.insert(i, entry)
        return entry

    def lookup_exact(self, iova: int, size: int) -> DmaEntry:
        """The entry mapped exactly as [iova, iova+size); ENOENT / EINVAL otherwise."""
        return self._entries[self._exact(iova, size)]

    def remove(self, iova: int, size: int) -> DmaEntry:
        i = self._exact(iova, size)
        del self._starts[i]
        return self._entries.pop(i)

    def _exact(self, iova: int, size: int) -> int:
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova:
            raise ProtocolError(errno.ENOENT, f"no DMA region at {iova:#x}")
        if self._entries[i].size != size:
            raise ProtocolError(errno.EINVAL,
                                f"DMA unmap {iova:#x}+{size:#x} != region size "
                                f"{self._entries[i].size:#x}")
        return i

    def remove_all(self) -> list[DmaEntry]:
        out = self._entries
        self._starts, self._entries = [], []
        return out

    def find(self, addr: int, length: int) -> tuple[DmaEntry, int]:
        """The entry holding all of [addr, addr+length) and the offset of addr in it."""
        if addr < 0 or length < 0:
            raise ProtocolError(errno.EFAULT, "negative address or length")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise ProtocolError(errno.EFAULT, f"{addr:#x} not mapped")
        e = self._entries[i]
        if addr >= e.end or addr + length > e.end:
            raise ProtocolError(errno.EFAULT, f"{addr:#x}+{length:#x} outside mapped memory")
        return e, addr - e.iova
