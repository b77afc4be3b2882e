"""Dirty-page logging: a byte per 4 KiB guest page, folded into the client's bitmaps.

Theory of operation
-------------------
While logging is on, every process that writes guest memory on the device's behalf
(workers: read data, CQEs, EventIdx; the front-end: admin data and admin CQEs)
marks the pages it wrote, *after* the write completed, in a byte map per DMA region
(SEAMS S3).  The maps live in shared memory the front-end creates (one memfd per
region, see reactor/dirtylog.py); this module only sees memoryviews of them.

    map byte k of a region  <->  guest page (first_page + k), page = addr >> 12

Marking is a slice store of 1s: each byte is its own store, so concurrent markers
never tear each other's bytes and no lock is needed.

Read-and-clear (`report`): copy the bytes of the range, then zero exactly the runs
that were 1 in the copy.  A mark that lands between the copy and the zeroing is
either outside those runs (kept: reported next time) or inside one, i.e. on a page
this report already names - and the write behind that mark completed before the
mark, so before the zeroing, so before the reply: the client, which copies the page
after it has the reply, copies the new data.  Nothing is lost.  (memcpy of a run
writes only inside the run, so a neighbour's fresh mark is never overwritten.)

Folding into the client's page size (any power of two): a client page is dirty if
any 4 KiB page overlapping it is; with client pages smaller than 4 KiB every client
page inside a dirty 4 KiB page is reported.  Bitmaps are u64 words, LSB first:
bit i = client page i of the range (VFIO DMA_LOGGING_REPORT §5.5, DIRTY_PAGES §4.6).
"""
from __future__ import annotations

import bisect
import errno
import re
from dataclasses import dataclass
from typing import Any

from vfio_user.errors import ProtocolError

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
_RUNS = re.compile(rb"[^\x00]+")
_ONES = b"\x01" * 4096


def map_size(iova: int, size: int) -> int:
    """Bytes of byte map a region [iova, iova+size) needs (one per 4 KiB page it touches)."""
    return ((iova + size + PAGE - 1) >> PAGE_SHIFT) - (iova >> PAGE_SHIFT)


def bitmap_size(length: int, pgsize: int) -> int:
    """Bytes of a client bitmap for `length` bytes at `pgsize` (whole u64 words)."""
    pages = (length + pgsize - 1) // pgsize
    return (pages + 63) // 64 * 8


def check_pgsize(pgsize: int) -> None:
    if pgsize <= 0 or pgsize & (pgsize - 1):
        raise ProtocolError(errno.EINVAL, f"dirty bitmap page size {pgsize} is not a power of two")


@dataclass(slots=True, eq=False)
class RegionMap:
    iova: int
    size: int
    first: int               # page number of byte 0
    bm: memoryview           # map_size(iova, size) bytes, format 'B'
    end: int = 0             # iova + size (a field: mark() reads it on every call)

    def __post_init__(self) -> None:
        self.end = self.iova + self.size


class DirtyLog:
    """The byte maps of one controller's DMA regions (front-end or worker side)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[RegionMap] = []
        self._hit: RegionMap | None = None

    def __len__(self) -> int:
        return len(self._maps)

    def regions(self) -> list[RegionMap]:
        return list(self._maps)

    def add(self, iova: int, size: int, bm: memoryview) -> RegionMap:
        bm = bm if bm.format == "B" else bm.cast("B")
        if len(bm) < map_size(iova, size):
            raise ValueError(f"dirty map of {len(bm)} bytes for a {size:#x}-byte region")
        m = RegionMap(iova, size, iova >> PAGE_SHIFT, bm[:map_size(iova, size)])
        i = bisect.bisect_left(self._starts, iova)
        if i < len(self._starts) and self._starts[i] == iova:
            raise ValueError(f"dirty map for {iova:#x} exists")
        self._starts.insert(i, iova)
        self._maps.insert(i, m)
        self._hit = None
        return m

    def remove(self, iova: int) -> RegionMap | None:
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova:
            return None
        del self._starts[i]
        m = self._maps.pop(i)
        self._hit = None
        return m

    def clear(self) -> None:
        self._starts.clear()
        self._maps.clear()
        self._hit = None

    # -- marking (hot: once per read command / per CQ batch) ---------------------------
    def mark(self, addr: int, length: int) -> None:
        """The device wrote [addr, addr+length) (call after the write completed).

        Hot (once per read command, once per CQ per batch): the region of the last hit
        is tried first, every value is read once.
        """
        end = addr + length
        m = self._hit
        if m is not None and m.iova <= addr and end <= m.end and length > 0:
            first = m.first
            a = (addr >> 12) - first
            b = ((end - 1) >> 12) - first + 1
            if b - a == 1:
                m.bm[a] = 1
            elif b - a <= 4096:
                m.bm[a:b] = _ONES[:b - a]
            else:
                m.bm[a:b] = b"\x01" * (b - a)
        elif length > 0:
            self._mark_slow(addr, end)

    def _mark_slow(self, addr: int, end: int) -> None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            i = 0
        for m in self._maps[i:]:
            if m.iova >= end:
                break
            lo, hi = max(addr, m.iova), min(end, m.end)
            if lo >= hi:
                continue
            self._hit = m
            self.mark(lo, hi - lo)

    # -- reporting (front-end) ----------------------------------------------------------
    def report(self, iova: int, length: int, pgsize: int) -> bytes:
        """Read-and-clear the range as a client bitmap (see the module doc)."""
        check_pgsize(pgsize)
        if length <= 0 or iova < 0 or iova % PAGE or length % PAGE:
            raise ProtocolError(errno.EINVAL, f"dirty report range {iova:#x}+{length:#x}: "
                                f"needs 4 KiB alignment and a non-zero length")
        end = iova + length
        covered = iova
        bits = 0
        npages = (length + pgsize - 1) // pgsize
        for m in self._maps:
            if m.end <= iova or m.iova >= end:
                continue
            if m.iova > covered:
                break
            lo, hi = max(iova, m.iova), min(end, m.end)
            a = (lo >> PAGE_SHIFT) - m.first
            b = ((hi - 1) >> PAGE_SHIFT) - m.first + 1
            snap = bytes(m.bm[a:b])
            for run in _RUNS.finditer(snap):
                r0, r1 = run.span()
                m.bm[a + r0:a + r1] = bytes(r1 - r0)       # zero exactly this run
                p0 = (m.first + a + r0) << PAGE_SHIFT       # guest address of the run
                p1 = (m.first + a + r1) << PAGE_SHIFT
                j0 = max(0, (p0 - iova) // pgsize)
                j1 = min(npages, (p1 - 1 - iova) // pgsize + 1)
                if j1 > j0:
                    bits |= ((1 << (j1 - j0)) - 1) << j0
            covered = max(covered, hi)
        if covered < end:
            raise ProtocolError(errno.EINVAL, f"dirty report range {iova:#x}+{length:#x} is not "
                                f"all in logged (fd-mapped) DMA regions")
        return bits.to_bytes(bitmap_size(length, pgsize), "little")

    def dirty_pages(self) -> set[int]:
        """Every marked 4 KiB page number (tests and diagnostics; does not clear)."""
        out: set[int] = set()
        for m in self._maps:
            for run in _RUNS.finditer(bytes(m.bm)):
                out.update(range(m.first + run.start(), m.first + run.end()))
        return out


class MarkingMemory:
    """A GuestMemory that marks every writable view it hands out (front-end admin path).

    Only for a single-threaded user whose REPORTs cannot run between taking a view and
    writing through it (the front-end): the mark precedes the write by a few bytecodes.
    Workers mark after their writes instead (DirtyLog.mark).
    """

    def __init__(self, mem: Any, log: DirtyLog) -> None:
        self.inner = mem
        self.log = log

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        v = self.inner.view(addr, length, write)
        if write:
            self.log.mark(addr, length)
        return v

    def read(self, addr: int, length: int) -> bytes:
        return self.inner.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.inner.write(addr, data)
        self.log.mark(addr, len(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
