"""Guest memory mapped from the client's DMA_MAP fds: a `nvme.memory.GuestMemory`.

Theory of operation
-------------------
Each DMA_MAP with an fd becomes a MAP_SHARED mmap of that fd.  The mapping starts
at the map's file offset rounded down to the mapping granularity
(`max(st_blksize, ALLOCATIONGRANULARITY)`: on hugetlbfs st_blksize is the huge page
size) and covers `[offset, offset + size)`.  Before mapping we check
`offset + size <= fstat(fd).st_size`: touching a page past the end of the file
raises SIGBUS, which kills a Python process.  A memfd that is not sealed against
shrinking (F_SEAL_SHRINK) could still be truncated later by the client, and the next
worker access would kill a process that serves other controllers too: such a memfd
is refused (EINVAL).  QEMU seals its memory-backend-memfd by default (seal=on); a
client that wants to be served seals it.  An fd that cannot carry seals at all (a
regular or hugetlbfs file, shm_open memory) is accepted and flagged
`Mapping.shrinkable`: that file could be truncated too (by its owner), which is the
client's own memory and its administrator's business, not a guest's.

`view(addr, length, write)` is the hot path: a bisect in the `DmaTable`, permission
checks, and a slice of a memoryview kept for the whole mapping.  Read views are
slices of a read-only twin of that memoryview (no `toreadonly()` per call).  The
region of the last hit is cached as (start, end, Mapping): a guest's rings, PRP
lists and data usually sit in one region, so most calls skip the bisect.  The
cache is dropped on every map/unmap, and a hit still checks `Mapping.base is not
None` (unmap sets it to None), so a stale entry can never reach unmapped memory.  A region mapped without an fd raises `NeedsMessageDma` (it can only be
reached with DMA_READ/DMA_WRITE messages); every other refusal is `DmaFault`.

Unmapping and exported views: `mmap.close()` fails with BufferError while any
memoryview of it is alive.  We release our base view and close the mmap; if a caller
still holds a view, the mmap is parked (`zombies`) instead of closed: its pages stay
mapped, so the stale view can never touch unmapped memory (no use-after-munmap), and
we retry the close on every later map/unmap and `collect()`.  Callers should drop
views as soon as a command is done.

fd ownership: `map()` does not take the caller's fd; Python's mmap keeps its own dup
while the mapping lives.  The same class serves the front-end and the workers (which
receive the same fds over a socket).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass

from nvme.memory import DmaFault, NeedsMessageDma
from vfio_user.dma import DmaTable
from vfio_user.errors import ProtocolError

log = logging.getLogger(__name__)

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)


def _is_memfd(fd: int) -> bool:
    """memfd_create() files are named "/memfd:NAME (deleted)" in /proc."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return True     # cannot tell: treat it as the stricter case


@dataclass(slots=True)
class Mapping:
    mm: mmap.mmap | None          # None: mapped without fd
    base: memoryview | None       # view of exactly [offset, offset+size) of the file
    readable: bool
    writable: bool
    shrinkable: bool = False
    rbase: memoryview | None = None   # read-only twin of base (read views are its slices)


def _granularity(st: os.stat_result) -> int:
    g = max(mmap.ALLOCATIONGRANULARITY, st.st_blksize or 0)
    # Round up to a multiple of the allocation granularity (mmap's offset rule).
    a = mmap.ALLOCATIONGRANULARITY
    return (g + a - 1) // a * a


class MappedGuestMemory:
    def __init__(self, max_regions: int = 65535) -> None:
        self.table = DmaTable(max_regions=max_regions)
        self.zombies: list[mmap.mmap] = []
        # Last region hit by view(): (start, end, Mapping).  Python ints, so
        # `start <= addr <= addr + length <= end` never wraps.
        self._hit: tuple[int, int, Mapping] | None = None

    def __len__(self) -> int:
        return len(self.table)

    # ------------------------------------------------------------------ map
    def map(self, iova: int, size: int, offset: int, fd: int | None,
            readable: bool, writable: bool) -> None:
        """Map [iova, iova+size) onto fd at offset (or record an fd-less region).

        Raises ProtocolError: EINVAL (bad range, past the end of the file, fd not
        mappable), EEXIST (overlap), ENOSPC (too many regions).
        """
        self.collect()
        self._hit = None
        if not (readable or writable):
            raise ProtocolError(errno.EINVAL, "DMA region neither readable nor writable")
        if offset < 0:
            raise ProtocolError(errno.EINVAL, "negative file offset")
        # Refuse bad ranges/overlaps before creating any mapping.
        entry = self.table.add(iova, size, readable, writable, None)
        try:
            entry.handle = self._make_mapping(size, offset, fd, readable, writable)
        except BaseException:
            self.table.remove(iova, size)
            raise

    @staticmethod
    def _make_mapping(size: int, offset: int, fd: int | None,
                      readable: bool, writable: bool) -> Mapping:
        if fd is None:
            return Mapping(None, None, readable, writable)
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolError(errno.EINVAL, f"DMA fd unusable: {e}") from e
        if offset + size > st.st_size:
            # A mapping past the end of the file would SIGBUS on first touch.
            raise ProtocolError(errno.EINVAL,
                                f"DMA map {offset:#x}+{size:#x} past end of fd ({st.st_size:#x})")
        shrinkable = True
        try:
            shrinkable = not (fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK)
        except OSError:
            pass        # a file on a disk filesystem: it cannot carry seals
        else:
            # tmpfs and hugetlbfs files answer F_GET_SEALS too (F_SEAL_SEAL: "cannot be
            # sealed") although they are files, not memfds: QEMU's memory-backend-file on
            # /dev/shm or /dev/hugepages, DPDK's hugepage files (SPDK's own client).
            if shrinkable and _is_memfd(fd):
                raise ProtocolError(errno.EINVAL, "DMA fd is a memfd not sealed against shrinking "
                                    "(F_SEAL_SHRINK): truncating it would crash the worker")
        gran = _granularity(st)
        start = offset - offset % gran
        delta = offset - start
        prot = (mmap.PROT_READ if readable or writable else 0) | (mmap.PROT_WRITE if writable else 0)
        try:
            mm = mmap.mmap(fd, delta + size, flags=mmap.MAP_SHARED, prot=prot, offset=start)
        except (OSError, ValueError, OverflowError) as e:
            raise ProtocolError(getattr(e, "errno", None) or errno.EINVAL,
                                f"mmap of DMA fd failed: {e}") from e
        base = memoryview(mm)[delta:delta + size]
        return Mapping(mm, base, readable, writable, shrinkable, base.toreadonly())

    # ---------------------------------------------------------------- unmap
    def unmap(self, iova: int, size: int) -> None:
        """Remove exactly one mapped range (ENOENT / EINVAL otherwise)."""
        entry = self.table.remove(iova, size)
        self._hit = None
        self._close(entry.handle)
        self.collect()

    def unmap_all(self) -> None:
        self._hit = None
        for entry in self.table.remove_all():
            self._close(entry.handle)
        self.collect()

    def _close(self, m: Mapping | None) -> None:
        if m is None or m.mm is None:
            return
        if m.base is not None:
            # base = None first: view()'s cache checks it, whatever happens below.
            base, rbase = m.base, m.rbase
            m.base = m.rbase = None
            for b in (rbase, base):
                if b is not None:
                    try:
                        b.release()   # fails only if someone re-exported *this* object
                    except BufferError:
                        pass
        try:
            m.mm.close()
        except BufferError:
            # A caller still holds a view: keep the pages mapped until it is gone.
            self.zombies.append(m.mm)

    def collect(self) -> int:
        """Retry closing parked mappings; returns how many are still parked."""
        still = []
        for mm in self.zombies:
            try:
                mm.close()
            except BufferError:
                still.append(mm)
        self.zombies = still
        return len(still)

    # ----------------------------------------------------------------- view
    def mapping_at(self, addr: int) -> Mapping:
        entry, _ = self._find(addr, 0)
        return entry.handle

    def _find(self, addr: int, length: int):
        try:
            return self.table.find(addr, length)
        except ProtocolError:
            raise DmaFault(addr, length, "not inside one mapped region") from None

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        hit = self._hit
        if hit is not None and hit[0] <= addr <= addr + length <= hit[1]:
            m = hit[2]
            start = hit[0]
        else:
            entry, _ = self._find(addr, length)
            m = entry.handle
            start = entry.iova
            self._hit = (start, entry.iova + entry.size, m)
        off = addr - start
        if write:
            if not m.writable:
                raise DmaFault(addr, length, "region is read-only")
            base = m.base
        else:
            if not m.readable:
                raise DmaFault(addr, length, "region is write-only")
            base = m.rbase
        if base is None:
            raise NeedsMessageDma(addr, length, "mapped without fd")
        return base[off:off + length]

    def regions(self) -> list[tuple[int, int, memoryview | None, bool, bool]]:
        """(iova, size, view of the whole mapping or None without fd, readable, writable)
        per region, in address order: what the native data path addresses directly."""
        return [(e.iova, e.size, e.handle.base if e.handle is not None else None,
                 e.readable, e.writable) for e in self.table]

    def read(self, addr: int, length: int) -> bytes:
        with self.view(addr, length) as v:
            return bytes(v)

    def write(self, addr: int, data: bytes) -> None:
        with self.view(addr, len(data), write=True) as v:
            v[:] = data
