"""Pure ring arithmetic for NVMe submission/completion queues (NVMe Base §3.3.1).

Theory of operation
-------------------
A queue of `size` slots holds at most size-1 entries: it is empty when head == tail
and full when tail + 1 == head (mod size).  The controller owns SQ head and CQ tail;
the host reports SQ tail and CQ head through doorbells, which we validate here:

* an SQ tail is valid iff 0 <= tail < size.  Any such tail is a legal ring state; a
  tail that covers more SQEs than the CQ can absorb is still valid, the runner just
  fetches at most `cq_free - inflight` of them (SQ-side flow control, so the CQ can
  never overflow);
* a CQ head is valid iff it is < size and moves forward no further than the entries
  the controller has posted (head may only advance inside (old head .. tail]).

Posting a CQE: DW0..DW2 are written first, then DW3 (CID, phase, status) LAST as one
aligned 32-bit store through a memoryview cast to 'I'.  The host polls DW3's phase
bit; a store that passes through an intermediate value (struct.pack_into zeroes
then fills) could show it a half-written entry.  On x86 (TSO) stores become visible
in program order; CPython issues each item store as one C store.  The tail advances
after the store and the phase flips when it wraps to 0.
"""
from __future__ import annotations

from .state import CqState, SqState
from .status import dw3

SQE_SIZE = 64
CQE_SIZE = 16


def used(head: int, tail: int, size: int) -> int:
    """Entries between head and tail."""
    return (tail - head) % size


def free_slots(head: int, tail: int, size: int) -> int:
    """Entries that can still be added (one slot always stays empty)."""
    return size - 1 - (tail - head) % size


def cq_free_slots(cq: CqState) -> int:
    return free_slots(cq.head, cq.tail, cq.size)


def sq_pending(sq: SqState) -> int:
    """SQEs the host has submitted that we have not fetched yet."""
    return (sq.tail - sq.head) % sq.size


def valid_sq_tail(sq: SqState, tail: int) -> bool:
    return 0 <= tail < sq.size


def valid_cq_head(cq: CqState, head: int) -> bool:
    """head < size and within the entries posted since the last head (inclusive of none)."""
    return cq_head_ok(cq.head, cq.tail, cq.size, head)


def cq_head_ok(old_head: int, tail: int, size: int, head: int) -> bool:
    """valid_cq_head on plain ints (the runner keeps queue state in table records)."""
    if not 0 <= head < size:
        return False
    return (head - old_head) % size <= (tail - old_head) % size


def fetch_budget(sq: SqState, cq: CqState, inflight_on_cq: int) -> int:
    """How many new SQEs may be fetched now: pending, bounded by CQ room minus in-flight."""
    room = cq_free_slots(cq) - inflight_on_cq
    if room <= 0:
        return 0
    pend = sq_pending(sq)
    return pend if pend < room else room


def post_cqe(cq_mem: memoryview, cq: CqState, dw0: int, sqhd: int, sqid: int, cid: int,
             status: int) -> None:
    """Write one CQE at cq.tail (DW3 last, one store) and advance tail/phase.

    `cq_mem` is a writable view of the whole CQ ring; cast it to 'I' once and pass
    the cast view to avoid a cast per completion.  The caller checks for room.
    """
    m = cq_mem if cq_mem.format == "I" else cq_mem.cast("I")
    write_cqe(m, cq.tail, cq.phase, dw0, sqhd, sqid, cid, status)
    t = cq.tail + 1
    if t == cq.size:
        t = 0
        cq.phase ^= 1
    cq.tail = t


def write_cqe(m: memoryview, slot: int, phase: int, dw0: int, sqhd: int, sqid: int, cid: int,
              status: int) -> None:
    """The one definition of a CQE store sequence: DW0, DW1, DW2, then DW3 in one store.

    `m` is the CQ ring cast to 'I'.  QueueRunner's hot loop inlines exactly these four
    stores (tests/unit/test_cqe_store_order.py records them on the real path).
    """
    i = slot << 2
    m[i] = dw0 & 0xFFFFFFFF
    m[i + 1] = 0                                    # DW1 reserved
    m[i + 2] = (sqhd & 0xFFFF) | ((sqid & 0xFFFF) << 16)
    m[i + 3] = dw3(cid, status, phase)              # the publishing store: last
