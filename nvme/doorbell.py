"""Doorbells: the BAR0 doorbell area and the shadow doorbell / EventIdx pages.

Theory of operation
-------------------
With CAP.DSTRD = 0 the doorbell for SQ y's tail is at 0x1000 + 8*y and CQ y's head at
0x1000 + 8*y + 4.  `Doorbells` wraps the area from BAR0 offset 0x1000 onward (a
memoryview of the shared doorbell page that the guest writes directly): it is cast
to 'I' once and every access is one aligned 32-bit load or store, because the guest
(or the front-end's trapped path) writes these words concurrently.

Shadow doorbells (Doorbell Buffer Config, admin 7Ch) put the same layout in two guest
pages: the shadow doorbell page, where the host writes tails/heads before deciding
whether to ring the real doorbell, and the EventIdx page, where the controller says
"ring me when you move past this value".  Both are read/written here as single
32-bit accesses.  The admin queue (qid 0) never uses shadow doorbells.
"""
from __future__ import annotations

from typing import Any

from .memory import GuestMemory
from .state import ShadowDoorbells

DOORBELL_BASE = 0x1000


def _as_words(area: memoryview) -> memoryview:
    if area.format == "I":
        return area
    mv = area if area.format == "B" else area.cast("B")
    return mv.cast("I")


class Doorbells:
    """The BAR0 doorbell area (offset 0x1000 onward), DSTRD = 0."""

    __slots__ = ("_w", "nqueues")

    def __init__(self, area: memoryview) -> None:
        self._w = _as_words(area)
        self.nqueues = len(self._w) // 2

    @property
    def words(self) -> memoryview:
        """The area as 32-bit words (SQ y tail = [2y], CQ y head = [2y+1]) for hot loops."""
        return self._w

    def sq_tail(self, qid: int) -> int:
        return self._w[qid << 1]

    def cq_head(self, qid: int) -> int:
        return self._w[(qid << 1) | 1]

    def set_sq_tail(self, qid: int, value: int) -> None:
        """Trapped path / tests: the host's 4-byte doorbell write."""
        self._w[qid << 1] = value & 0xFFFFFFFF

    def set_cq_head(self, qid: int, value: int) -> None:
        self._w[(qid << 1) | 1] = value & 0xFFFFFFFF

    def zero(self, qid: int) -> None:
        """On queue creation: old drivers may leave stale values behind."""
        self._w[qid << 1] = 0
        self._w[(qid << 1) | 1] = 0

    @staticmethod
    def decode(offset: int) -> tuple[int, bool]:
        """BAR0 offset (>= 0x1000) -> (qid, is_cq_head)."""
        rel = offset - DOORBELL_BASE
        return rel >> 3, bool(rel & 4)


class ShadowDoorbellView:
    """Shadow doorbell and EventIdx pages in guest memory, as 32-bit word arrays.

    Construction maps both pages (raises DmaFault if they are not mapped).  The
    shadow page is only read (read-only view); EventIdx is written.
    """

    __slots__ = ("cfg", "_db", "_ei", "dirty")

    def __init__(self, mem: GuestMemory, cfg: ShadowDoorbells, page_size: int = 4096) -> None:
        self.cfg = cfg
        self._db = mem.view(cfg.dbbuf, page_size, write=False).cast("I")
        self._ei = mem.view(cfg.eventidx, page_size, write=True).cast("I")
        # Dirty-page logging (migration): EventIdx stores are device writes to guest RAM.
        self.dirty: Any = None

    @property
    def words(self) -> tuple[memoryview, memoryview]:
        """(shadow doorbell words, EventIdx words) as 'I' views (native data path)."""
        return self._db, self._ei

    def sq_tail(self, qid: int) -> int:
        return self._db[qid << 1]

    def cq_head(self, qid: int) -> int:
        return self._db[(qid << 1) | 1]

    def set_sq_eventidx(self, qid: int, value: int) -> None:
        self._ei[qid << 1] = value & 0xFFFFFFFF
        if self.dirty is not None:
            self.dirty.mark(self.cfg.eventidx + (qid << 3), 4)

    def set_cq_eventidx(self, qid: int, value: int) -> None:
        self._ei[(qid << 1) | 1] = value & 0xFFFFFFFF
        if self.dirty is not None:
            self.dirty.mark(self.cfg.eventidx + (qid << 3) + 4, 4)

    def sq_eventidx(self, qid: int) -> int:
        return self._ei[qid << 1]

    def cq_eventidx(self, qid: int) -> int:
        return self._ei[(qid << 1) | 1]

    @property
    def nqueues(self) -> int:
        return len(self._db) // 2
