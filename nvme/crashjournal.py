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
  their CIDs in the SQ record's reserved words J0..J3 (nvme.qtable):

      J0  bits 0..5   occupancy of the 6 CID slots        J1..J3  two 16-bit CIDs each
          bit  31     OVERFLOW: more than 6 were parked at once (recovery cannot be exact)

  Parking writes the CID half-word, then sets its occupancy bit (two aligned 32-bit
  stores, only on the parking path); a parked command's completion writes its CQE
  entry, clears the occupancy bit, then publishes the CQ tail - so a crash in between
  leaves a journaled CID whose CQE the scan finds (done), never a completion that is
  both posted and retried.  Fast-path commands cost nothing: the scan finds them.
  The native data path (issue 14) keeps the same two rules.

After recovery the new worker re-parks what the front-end's slow path still runs and
completes every other journaled command with Command Interrupted, DNR clear (the host
retries it: Linux does for any status without DNR).  An OVERFLOW journal cannot be
trusted: the caller falls back to controller-fatal (CSTS.CFS) for that controller.
"""
from __future__ import annotations

from dataclasses import dataclass

from .qtable import J0, J1

SLOTS = 6
OCCUPANCY = (1 << SLOTS) - 1
OVERFLOW = 1 << 31
# Command Interrupted (NVMe 1.4, generic 21h): "the host should retry"; posted with
# DNR clear.
COMMAND_INTERRUPTED = 0x021


def park_cid(r: memoryview, cid: int) -> bool:
    """Journal a parked CID in SQ record r; False (and OVERFLOW set) if no slot is free."""
    occ = r[J0]
    free = ~occ & OCCUPANCY
    if not free:
        r[J0] = occ | OVERFLOW
        return False
    i = (free & -free).bit_length() - 1
    w = J1 + (i >> 1)
    shift = 16 * (i & 1)
    r[w] = (r[w] & ~(0xFFFF << shift)) | ((cid & 0xFFFF) << shift)   # the CID first
    r[J0] = occ | (1 << i)                                           # then it counts
    return True


def unpark_cid(r: memoryview, cid: int) -> None:
    """Forget a journaled CID (call between writing its CQE and publishing the CQ tail)."""
    occ = r[J0]
    for i in range(SLOTS):
        if occ & (1 << i) and (r[J1 + (i >> 1)] >> (16 * (i & 1))) & 0xFFFF == cid:
            occ &= ~(1 << i)
            break
    if not occ & OCCUPANCY:
        occ = 0                  # nothing parked: OVERFLOW no longer matters
    r[J0] = occ


def journaled(r: memoryview) -> tuple[list[int], bool]:
    """(parked CIDs, overflowed) from an SQ record."""
    occ = r[J0]
    cids = [(r[J1 + (i >> 1)] >> (16 * (i & 1))) & 0xFFFF for i in range(SLOTS) if occ & (1 << i)]
    return cids, bool(occ & OVERFLOW)


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
