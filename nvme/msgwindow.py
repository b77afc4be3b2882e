"""Message-write windows: guest ranges where the device's data writes go by DMA_WRITE.

Why
---
Under QEMU's TCG the guest's code is translated and cached; a store by another
process into the shared guest RAM (our mapping of the DMA_MAP fd) does not invalidate
that cache, a vfio-user DMA_WRITE does (QEMU writes through its own memory API).
Firmware loads code over code it has just run: the MBR at 0x7c00 relocates itself and
reads the partition's boot sector into 0x7c00; every real-mode INT 13h read lands
below 1 MiB.  So read payloads bound for such ranges must travel as messages.

How
---
`MessageWriteWindows` wraps the data path's `GuestMemory`.  A *writable* view that
overlaps a window is first checked against the real memory (so an unmapped or
read-only range still faults as `DmaFault`, and nothing outside the mapping is ever
touched), then refused with `NeedsMessageDma`: the worker parks the command and the
front-end's slow path (`reactor/slowpath.py`) runs it into a scratch buffer and sends
the bytes with DMA_WRITE.  Reads (SQEs, PRP lists, write payloads) and every other
writer (CQEs, admin data, shadow doorbells) use the mapping as before: only data the
device lands in guest memory can become code.

Cost when no command touches a window: one comparison per writable view (Linux
reserves the first MiB, so its I/O never does).  With no windows `view` is the
wrapped memory's own bound method: no cost at all.
"""
from __future__ import annotations

from typing import Iterable

from .memory import GuestMemory, NeedsMessageDma

ADDR_LIMIT = (1 << 64) - 1      # the largest end a u64 (msgpack, wire) can carry
MAX_WINDOWS = 16
Window = tuple[int, int]          # [start, end): end exclusive
LOW_MEMORY: tuple[Window, ...] = ((0, 1 << 20),)   # real-mode memory: MBR, boot sectors, INT 13h


def normalize(windows: Iterable[Iterable[int]]) -> tuple[Window, ...]:
    """Sorted, checked windows.  ValueError on an empty, inverted, out-of-range or
    overlapping window, or more than MAX_WINDOWS of them."""
    out: list[Window] = []
    for w in windows:
        start, end = (int(x) for x in w)
        if not 0 <= start < end <= ADDR_LIMIT:
            raise ValueError(f"window {start:#x}-{end:#x}: need 0 <= start < end <= {ADDR_LIMIT:#x}")
        out.append((start, end))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 < e0:
            raise ValueError(f"windows {s0:#x}-{e0:#x} and {s1:#x}-{e1:#x} overlap")
    if len(out) > MAX_WINDOWS:
        raise ValueError(f"{len(out)} windows: at most {MAX_WINDOWS}")
    return tuple(out)


def overlaps(windows: tuple[Window, ...], addr: int, length: int) -> bool:
    """Does [addr, addr+length) share a byte with a window?  (Empty ranges never do.)"""
    end = addr + length
    return length > 0 and any(s < end and addr < e for s, e in windows)


class MessageWriteWindows:
    """A GuestMemory whose writable views inside a window raise NeedsMessageDma."""

    def __init__(self, base: GuestMemory, windows: Iterable[Iterable[int]] = LOW_MEMORY) -> None:
        self.base = base
        self.windows = normalize(windows)
        if not self.windows:
            self.view = base.view          # type: ignore[method-assign]  # off: no wrapper at all
            return
        # Bounds of all windows: most views miss them with one comparison.
        self._lo = self.windows[0][0]
        self._hi = self.windows[-1][1]

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        if write and addr < self._hi and addr + length > self._lo \
                and overlaps(self.windows, addr, length):
            # Fault exactly as the memory would (unmapped, read-only, fd-less) first.
            self.base.view(addr, length, True).release()
            raise NeedsMessageDma(addr, length, "inside a message-write window (DMA_WRITE)")
        return self.base.view(addr, length, write)
