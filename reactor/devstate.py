"""Device state save/restore of one NVMe function (SEAMS S4): the front-end side.

Theory of operation
-------------------
`save_state(fn)` and `load_state(fn, data)` are the only ways a controller's state
leaves or enters a front-end: live migration (reactor/migctl.py, both wire schemes),
live upgrade (handover to a new process), `vnvmectl controller save` and start-up
from a saved file all call them.  The blob is migration.snapshot's format with the
sections of migration.nvmeimage.

Both need the controller *stopped*: every worker of the controller quiesced (fetching
stopped, every fetched command - slow path included - completed with its CQE posted)
and the admin poller idle.  Inside a vfio-user request the migration controller
arranges that; anyone else uses `await stop(fn)` ... `await start(fn)`.  Then:

- save: queue records are read from the queue table (nvme/qtable.py; final while the
  workers are quiesced), the controller model snapshots itself with them, and the doorbell page is read as the
  guest last wrote it - tails/heads written after the last poll are in it, not in any
  worker, and SQEs behind them are still in guest memory for whoever polls next.
- load: everything is checked before anything changes (format, identity against this
  controller's configuration, structure, every ring mapped in guest memory).  Then the
  PCI config and the doorbell page are restored, the controller model restores itself
  and re-creates the I/O queues on this front-end's workers (placement as usual, the
  workers are paused) and re-parks outstanding AERs.  `start()` then resumes every
  worker, whose first poll reads every doorbell: nothing written during the blackout
  is lost.  If applying fails half-way the controller is reset to power-on and the
  error is reported: a destination never runs a half-restored controller.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Iterable

from migration import nvmeimage
from migration.snapshot import Snapshot, SnapshotCorrupt, SnapshotError, StreamSplitter, encode
from nvme.memory import DmaFault
from nvme.state import plain

if TYPE_CHECKING:
    from nvme.state import CqState, SqState
    from reactor.nvmefn import NvmeFunction

log = logging.getLogger("vnvmed.migration")


def log_soon(msg: str, *args: Any) -> None:
    """log.info once the current vfio-user request's reply is out (the next turn of the
    front-end's loop; at once outside a loop).  A migration's stop, restore and start
    lines each cost 0.05-0.1 ms of the blackout on a busy host, before the reply."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.info(msg, *args)
        return
    loop.call_soon(functools.partial(log.info, msg, *args))


class RingsNotMapped(SnapshotError):
    """A queue of the snapshot lies in guest memory that is not mapped (yet)."""


def identity(fn: "NvmeFunction") -> dict[str, Any]:
    nss = []
    for ns in fn.namespaces.values():
        i = ns.info
        nss.append({"nsid": i.nsid, "block_size": i.block_size, "blocks": i.blocks,
                    "read_only": bool(i.read_only),
                    "fingerprint": nvmeimage.fingerprint(i.backend, fn.fingerprints.get(i.nsid))})
    return nvmeimage.identity(plain(fn.cfg), len(fn.bar), nss)


def precopy_state(fn: "NvmeFunction") -> bytes:
    """The pre-copy blob: identity only (the destination checks it while we run)."""
    return encode({"identity": identity(fn)}, required=["identity"])


def _io_records(fn: "NvmeFunction") -> tuple[list["SqState"], list["CqState"]]:
    """The controller's I/O queue records from the queue table (SEAMS S1; final while the
    workers are quiesced).  Only the queues the controller has: the table has a record
    for every doorbell (1536), scanning it would cost more than the rest of the save."""
    q = fn.ctrl.queues
    sqs = [r for r in (fn.qtable.get_sq(i) for i in sorted(q.sqs)) if r is not None]
    cqs = [r for r in (fn.qtable.get_cq(i) for i in sorted(q.cqs)) if r is not None]
    return sqs, cqs


def save_state(fn: "NvmeFunction") -> bytes:
    """The whole controller as one snapshot blob (the controller must be stopped)."""
    sqs, cqs = _io_records(fn)
    fn.ctrl.update_queue_records(sqs, cqs)
    sections = {
        "identity": identity(fn),
        "pci": fn.pci.snapshot(),
        "controller": fn.ctrl.snapshot(),
        "doorbells": nvmeimage.doorbell_words(fn.db_words),
    }
    fn.mig.trace.mark("save collected")
    return encode(sections, required=nvmeimage.SECTIONS)


def check(fn: "NvmeFunction", blob: Snapshot) -> None:
    """Early checks of one received blob (pre-copy or full): format and identity."""
    blob.check_known(nvmeimage.SECTIONS)
    nvmeimage.check_identity(blob.section("identity"), identity(fn))


def split(data: bytes | bytearray | memoryview) -> list[Snapshot]:
    sp = StreamSplitter()
    blobs = sp.feed(data)
    if sp.pending:
        raise SnapshotCorrupt(f"snapshot stream ends inside a blob ({sp.pending} bytes of it)")
    return blobs


def load_state(fn: "NvmeFunction", data: bytes | Iterable[Snapshot], *,
               shared_bar: bool = False) -> None:
    """Restore from a blob (or the blobs of a migration stream; the last full one counts).

    Raises SnapshotError (nothing changed, or the controller was reset to power-on).

    `shared_bar=True` (live upgrade): this function maps the BAR0 memfd of a controller
    another process still runs (and resumes if we fail), so the doorbell page is never
    written - the guest may have rung during the blackout, which the saved page would
    overwrite - and a failed restore is not reset (a reset zeroes that page): the caller
    discards this function instead.
    """
    blobs = split(data) if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    for b in blobs:
        check(fn, b)
    full = [b for b in blobs if "controller" in b]
    if not full:
        raise SnapshotError("the stream holds no controller state (pre-copy data only)")
    snap = full[-1]
    for name in nvmeimage.SECTIONS:
        if name not in snap:
            raise SnapshotError(f"snapshot lacks the {name!r} section")
    ctrl = snap.section("controller")
    nvmeimage.check_controller(ctrl, fn.cfg.max_io_queues, fn.cfg.mqes)
    pci = snap.section("pci")
    if not isinstance(pci, bytes) or len(pci) != 4096:
        raise SnapshotError("pci section is not a 4 KiB config space image")
    doorbells = nvmeimage.check_doorbells(snap.section("doorbells"), len(fn.db_words))
    for what, addr, size, write in nvmeimage.queue_ranges(ctrl):
        try:
            fn.mem.view(addr, size, write=write).release()
        except DmaFault as e:
            raise RingsNotMapped(f"{what} memory is not mapped here (map guest memory "
                                 f"before loading): {e}") from None
    fn.mig.trace.mark("load checked")
    try:
        _apply(fn, pci, None if shared_bar else doorbells, ctrl)
    except Exception as e:
        if shared_bar:
            raise SnapshotError(f"restoring the snapshot failed: {e}") from None
        log.exception("%s: restoring the snapshot failed; resetting the controller", fn.name)
        try:
            fn.ctrl.reset()
            fn.pci.reset()
        except Exception:
            log.exception("%s: reset after a failed restore", fn.name)
        raise SnapshotError(f"restoring the snapshot failed: {e}") from None
    log_soon("%s: controller state restored (snapshot %s, %d I/O queues)", fn.name, snap.version,
             len(ctrl["queues"]["sqs"]))


def _apply(fn: "NvmeFunction", pci: bytes, doorbells: list[tuple[int, int]] | None, ctrl: dict) -> None:
    fn.pci.restore(pci)
    words = fn.db_words
    if doorbells is not None:
        for i, _ in nvmeimage.doorbell_words(words):   # single aligned stores, as always here
            words[i] = 0
        for i, v in doorbells:
            words[i] = v
    # Queue creation messages go to the (paused) workers without a round trip each
    # (NvmeFunction.worker_batch).
    with fn.worker_batch():
        fn.ctrl.restore(ctrl)
    fn._update_routes()


async def stop(fn: "NvmeFunction") -> None:
    """Quiesce every worker of the controller and hold it (outside a vfio-user request)."""
    await fn.mig.hold()


async def start(fn: "NvmeFunction") -> None:
    await fn.mig.release_hold()
