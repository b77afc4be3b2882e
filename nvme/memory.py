"""Guest memory as the device model sees it.

The model never owns guest memory: it is handed a `GuestMemory` and asks it for
views of guest-physical ranges.  A view is a `memoryview` straight into the
mapping (zero copy).  Read-only views are used for everything the device only
reads (SQs, PRP lists, SGL segments, write payloads), so a list that firmware put
in read-only memory (SeaBIOS does) works, and a writable view is asked for only
for read payloads and CQs.

Theory of safety: every range is checked on Python ints (no 64-bit wrap), must lie
inside one mapped region and, for `write=True`, that region must be writable.
Anything else raises `DmaFault`; callers turn it into a Data Transfer Error (or
Invalid Field) completion.  Nothing outside a mapping is ever touched.

`NeedsMessageDma` is the special fault for memory the client mapped without an fd
(ROM, shadowed firmware ranges): it can only be reached with vfio-user
DMA_READ/DMA_WRITE messages, which the front-end performs on the worker's behalf.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol


class DmaFault(Exception):
    """A guest range that may not be accessed as asked."""

    def __init__(self, addr: int, length: int, reason: str) -> None:
        super().__init__(f"guest range {addr:#x}+{length:#x}: {reason}")
        self.addr = addr
        self.length = length
        self.reason = reason


class NeedsMessageDma(DmaFault):
    """The range is mapped, but without an fd: only DMA_READ/DMA_WRITE messages reach it."""


class GuestMemory(Protocol):
    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        """A view of [addr, addr+length) inside one region; raises DmaFault."""
        ...


@dataclass(slots=True)
class _Region:
    start: int
    size: int
    buf: memoryview | None  # None: mapped without fd (message DMA only)
    writable: bool


class FlatMemory:
    """A GuestMemory over in-process buffers, for tests and tools.

    Regions may not overlap.  `add(addr, buf, writable)`; `buf=None` models a
    region the client mapped without an fd.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[_Region] = []

    def add(self, addr: int, buf: bytearray | memoryview | None, writable: bool = True,
            size: int | None = None) -> None:
        n = len(buf) if buf is not None else size
        if n is None or n <= 0 or addr < 0:
            raise ValueError("region needs a positive size")
        i = bisect.bisect_right(self._starts, addr)
        if i > 0 and self._regions[i - 1].start + self._regions[i - 1].size > addr:
            raise ValueError("overlapping region")
        if i < len(self._regions) and addr + n > self._regions[i].start:
            raise ValueError("overlapping region")
        mv = memoryview(buf).cast("B") if buf is not None else None
        self._starts.insert(i, addr)
        self._regions.insert(i, _Region(addr, n, mv, writable))

    def regions(self) -> list[tuple[int, int, memoryview | None, bool, bool]]:
        """(addr, size, view or None, readable, writable) per region (see
        MappedGuestMemory.regions): the native data path addresses these directly."""
        return [(r.start, r.size, r.buf, True, r.writable) for r in self._regions]

    def remove(self, addr: int) -> None:
        i = self._starts.index(addr)
        del self._starts[i]
        del self._regions[i]

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        if addr < 0 or length < 0:
            raise DmaFault(addr, length, "negative address or length")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise DmaFault(addr, length, "not mapped")
        r = self._regions[i]
        off = addr - r.start
        if off + length > r.size:
            raise DmaFault(addr, length, "outside mapped memory")
        if write and not r.writable:
            raise DmaFault(addr, length, "region is read-only")
        if r.buf is None:
            raise NeedsMessageDma(addr, length, "mapped without fd")
        mv = r.buf[off:off + length]
        return mv if write else mv.toreadonly()


class WriteRecorder:
    """A GuestMemory that remembers the writable ranges it handed out.

    Dirty-page logging marks pages only after the device's write completed; a
    caller maps through this, writes, then marks each recorded range.
    """

    __slots__ = ("inner", "writes")

    def __init__(self, inner: GuestMemory) -> None:
        self.inner = inner
        self.writes: list[tuple[int, int]] = []

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        v = self.inner.view(addr, length, write)
        if write:
            self.writes.append((addr, length))
        return v
