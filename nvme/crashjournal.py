"""Worker crash recovery, the pure part: the journal in the queue records and the
arithmetic that tells, from shared state alone, where a dead worker's queues were.

Theory of operation
-------------------
A worker that dies leaves behind only what is in shared memory: the queue records
(nvme.qtable), the doorbell page, the rings in guest memory.  The runner publishes
SQ head / CQ tail at the end of each batch (and at each park), so at a crash:

* CQEs the dead worker posted after its last published CQ tail are in the ring with
  the current phase: `scan_cq` walks from the published tail while the phase matches
  (a CQE's DW3 - CID, status, phase - is one store written last, so a matching phase
  means a whole entry).  Their SQID/CID/SQHD say which commands are done.
* An SQ's true position is past its published head by the commands of the dead batch
  that completed (their CQEs are in the scan) or parked (a park publishes the head at
  once); the next one is the command that was executing, or nothing.  `resume_head`
  walks the SQ ring from the published head, skipping entries whose CID has a scanned
  CQE, up to the tail the worker had read (entries below any SQHD it reported may be
  re-used by the host, never entries at or past it; the walk only reads those).
  The command found there is executed again by the new worker: every NVM I/O command
  we implement is idempotent (a read, or a write of the same data to the same LBAs
  by a command the host has not seen complete).
* Parked commands (slow path in the front-end, asynchronous backends) are behind the
  published head and their SQ slots may already hold new entries.  The journal keeps
  their CIDs in the SQ's journal (QueueTable.journal(qid), after the records):

      words 0..3   occupancy bitmap of 128 CID slots (bit 31 of word 3: OVERFLOW,
                   more than 127 parked at once: recovery cannot be exact)
      words 4..67  two 16-bit CIDs each

  Parking writes the CID half-word, then sets its occupancy bit (two aligned 32-bit
  stores, only on the parking path; the runner remembers CID -> slot); a parked
  command's completion writes its CQE entry, clears the occupancy bit (one store),
  then publishes the CQ tail - so a crash in between leaves a journaled CID whose CQE
  the scan finds (done), never a completion that is both posted and retried.
  Fast-path commands cost nothing: the scan finds them.  The native data path
  (issue 14) keeps the same two rules.

After recovery the new worker re-parks what the front-end's slow path still runs and
completes every other journaled command with Command Interrupted, DNR clear (the host
retries it: Linux does for any status without DNR).  An OVERFLOW journal cannot be
trusted: the caller falls back to controller-fatal (CSTS.CFS) for that controller.
"""
from __future__ import annotations

from dataclasses import dataclass

SLOTS = 127                    # the 128th bit is OVERFLOW
OVERFLOW_WORD, OVERFLOW = 3, 1 << 31
CIDS = 4                       # first word of the CID half-words
# Command Interrupted (NVMe 1.4, generic 21h): "the host should retry"; posted with
# DNR clear.
COMMAND_INTERRUPTED = 0x021


def park_cid(j: memoryview, cid: int) -> int:
    """Journal a parked CID; returns its slot, or -1 (and OVERFLOW set) if none is free."""
    for w in range(4):
        occ = j[w]
        free = ~occ & (0x7FFFFFFF if w == OVERFLOW_WORD else 0xFFFFFFFF)
        if free:
            b = (free & -free).bit_length() - 1
            slot = 32 * w + b
            cw = CIDS + (slot >> 1)
            shift = 16 * (slot & 1)
            j[cw] = (j[cw] & ~(0xFFFF << shift)) | ((cid & 0xFFFF) << shift)   # the CID first
            j[w] = occ | (1 << b)                                                # then it counts
            return slot
    j[OVERFLOW_WORD] |= OVERFLOW
    return -1


def unpark_slot(j: memoryview, slot: int, none_left: bool) -> None:
    """Forget a journaled command (between writing its CQE and publishing the CQ tail).

    `slot` -1: the command overflowed the journal (nothing to clear).  `none_left`: the
    SQ has no parked command any more, so an OVERFLOW no longer matters.
    """
    if slot >= 0:
        j[slot >> 5] &= ~(1 << (slot & 31))
    if none_left and j[OVERFLOW_WORD] & OVERFLOW:
        j[OVERFLOW_WORD] &= ~OVERFLOW


def journaled(j: memoryview) -> tuple[list[int], bool]:
    """(parked CIDs, overflowed) from an SQ's journal."""
    out = []
    for w in range(4):
        occ = j[w] & (0x7FFFFFFF if w == OVERFLOW_WORD else 0xFFFFFFFF)
        while occ:
            b = (occ & -occ).bit_length() - 1
            occ &= occ - 1
            slot = 32 * w + b
            out.append((j[CIDS + (slot >> 1)] >> (16 * (slot & 1))) & 0xFFFF)
    return out, bool(j[OVERFLOW_WORD] & OVERFLOW)


@dataclass(frozen=True, slots=True)
class Posted:
    sqid: int
    cid: int
    sqhd: int


def scan_cq(ring: memoryview, tail: int, phase: int, size: int) -> tuple[list[Posted], int, int]:
    """CQEs posted after the published (tail, phase); returns them, new tail, new phase.

    `ring` is the CQ as 32-bit words (4 per entry).  At most size - 1 entries can be
    outstanding, so the walk is bounded even over a ring of garbage.
    """
    out: list[Posted] = []
    t, p = tail, phase
    for _ in range(size - 1):
        dw3 = ring[4 * t + 3]
        if (dw3 >> 16) & 1 != p:
            break
        dw2 = ring[4 * t + 2]
        out.append(Posted(dw2 >> 16, dw3 & 0xFFFF, dw2 & 0xFFFF))
        t += 1
        if t == size:
            t, p = 0, p ^ 1
    return out, t, p


def resume_head(sq_ring: memoryview, head: int, tail: int, size: int, done_cids: set[int]) -> int:
    """Where the new worker fetches next: the first SQ entry from `head` (up to `tail`)
    whose CID has no scanned CQE.  `sq_ring` is the SQ as 32-bit words (16 per entry);
    `done_cids` is consumed (a CID matches once)."""
    h = head
    while h != tail and done_cids:
        cid = sq_ring[16 * h] >> 16
        if cid not in done_cids:
            break
        done_cids.discard(cid)
        h = h + 1 if h + 1 < size else 0
    return h
