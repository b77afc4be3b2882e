"""The front-end's migration controller: engine + both wire adapters + dirty logging.

Theory of operation (how a state change meets the quiesce barrier)
------------------------------------------------------------------
Every request that may change the migration state - DEVICE_FEATURE SET of
MIG_DEVICE_STATE (v2), a REGION_WRITE of region 9's device_state (v1) - is a
quiesce command of the request pipeline: before its handler runs, the pipeline
awaits `NvmeFunction.quiesce()`, and for these requests the function quiesces
*every* worker of the controller (`quiesce_set`), not only those holding queues,
because a restore places new queues on any of them.  The handler walks the state
table; the stop arc only marks the controller *held* (`stop`), and after the
handler the pipeline's `resume()` does nothing while held.  So the controller stays
drained from the stop arc until an arc back to RUNNING (`start`) releases the hold,
and that request's `resume()` restarts the workers, whose first poll reads every
doorbell.  Other quiesce commands while held (DMA_MAP/UNMAP, RESET, a teardown CC
write) find the controller quiesced already and leave it so; a DEVICE_RESET or a
disconnect ends the migration and releases the hold.

While held the admin poller is idle (the coordinator is PAUSED), workers are paused,
and guest doorbell writes accumulate in the doorbell page for whoever resumes.
"""
from __future__ import annotations

import base64
import errno
import logging
import mmap
import os
from typing import TYPE_CHECKING, Any

from migration.dirty import bitmap_size as bitmap_size_for, check_pgsize
from migration.engine import MigrationEngine
from migration.snapshot import Snapshot, SnapshotError
from migration.states import MigState
from migration.trace import GcWatch, PhaseTrace
from migration.v1region import AREA_SIZE, DATA_OFFSET, REGION_SIZE, V1Region
from migration.v2 import V2Adapter
from reactor import devstate
from reactor.coordinator import Phase
from reactor.device import RegionInfo
from reactor.dirtylog import DirtyLogger
from vfio_user.errors import ProtocolError
from vfio_user.migmsg import MIG_REGION_SUBTYPE, MIG_REGION_TYPE, DirtyPages, DirtyPagesFlag, Feature
from vfio_user.negotiate import SERVER_MAX_XFER, ClientCaps, migration_pgsize
from vfio_user.wire import RegionFlag

if TYPE_CHECKING:
    from reactor.nvmefn import NvmeFunction

log = logging.getLogger("vnvmed.migration")


class MigrationController:
    def __init__(self, fn: "NvmeFunction") -> None:
        self.fn = fn
        self.engine = MigrationEngine(self)
        self.dirty = DirtyLogger(fn)
        self.v2 = V2Adapter(self.engine, self.dirty, self._max_xfer)
        self.area_fd = os.memfd_create(f"vnvmed-{fn.name}-migr", os.MFD_CLOEXEC)
        os.ftruncate(self.area_fd, REGION_SIZE)
        self._area = mmap.mmap(self.area_fd, REGION_SIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self.v1 = V1Region(self.engine, memoryview(self._area)[DATA_OFFSET:])
        self.held = False
        self._full_quiesce = False
        self._restored = False
        self.operator_hold = False                 # stopped by `vnvmectl controller save`
        self.pending: list[Snapshot] | None = None  # a saved snapshot to start from
        self.pending_file = ""
        # Phase marks of the blackout (migration/trace.py), shown by `controller list`.
        self.trace = PhaseTrace()
        self._gc = GcWatch(self.trace)
        self._gc.install()
        self.trace_resume = False      # the next RESUME asks workers for their first poll
        self.quiesce_inflight: dict[int, int] = {}   # worker -> commands it drained (last quiesce)
        self.quiesce_waiting: dict[int, int] = {}    # ... of which not started on the backend yet

    # -- DeviceOps (called by the engine, inside the pipeline's quiesce bracket) -------
    def stop(self) -> None:
        if self.fn.coord.phase not in (Phase.PAUSED, Phase.FAULTED):
            raise RuntimeError("migration stop arc without a quiesced controller")
        self.held = True
        self.trace.mark("quiesced")
        devstate.log_soon("%s: stopped for migration (%s)", self.fn.name, self.engine.scheme)

    def start(self) -> None:
        self.held = False
        self.trace.mark("start")
        self.trace_resume = True
        if self._restored:
            # Interrupts the source had coalesced but not fired are nowhere in the
            # snapshot: one interrupt per enabled CQ vector (spurious at worst) makes the
            # guest look at every CQ once.
            self._restored = False
            vectors = {c.iv for c in self.fn.ctrl.queues.cqs.values() if c.ien}
            if self.fn.ctrl.admin_queue_state() is not None:
                vectors.add(0)
            for iv in sorted(vectors):
                self.fn.irq(iv)
        devstate.log_soon("%s: running again after migration state %s", self.fn.name,
                 self.engine.state.name)

    def precopy(self) -> bytes:
        return devstate.precopy_state(self.fn)

    def save(self) -> bytes:
        blob = devstate.save_state(self.fn)
        self.trace.mark("saved")
        return blob

    def check(self, blob: Snapshot) -> None:
        devstate.check(self.fn, blob)

    def is_full(self, blob: Snapshot) -> bool:
        return "controller" in blob

    def load(self, blobs: list[Snapshot]) -> None:
        devstate.load_state(self.fn, blobs)
        self._restored = True
        self.trace.mark("loaded")

    # -- pipeline hooks ------------------------------------------------------------------
    def feature_needs_quiesce(self, flags: int, data: bytes) -> bool:
        if V2Adapter.needs_quiesce(flags, data):
            self._full_quiesce = True
            self.trace.mark("state request")
            return True
        return False

    def region_needs_quiesce(self, offset: int, data: bytes) -> bool:
        if V1Region.needs_quiesce(offset, data):
            self._full_quiesce = True
            self.trace.mark("state request")
            return True
        return False

    def quiesce_set(self, busy: set[int]) -> set[int]:
        full, self._full_quiesce = self._full_quiesce, False
        if full:
            self.trace.mark("quiesce sent")
        return set(self.fn.links) if full else busy & set(self.fn.links)

    def region_info(self) -> RegionInfo:
        return RegionInfo(size=REGION_SIZE, flags=RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP,
                          sparse=((DATA_OFFSET, AREA_SIZE),),
                          cap_type=(MIG_REGION_TYPE, MIG_REGION_SUBTYPE), fd=self.area_fd)

    def region_read(self, offset: int, count: int) -> bytes:
        try:
            return self.v1.read(offset, count)
        finally:
            self.trace.mark("region9 read")

    def region_write(self, offset: int, data: bytes) -> None:
        try:
            self.v1.write(offset, data)
        finally:
            self.trace.mark("region9 write")

    def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        try:
            return self.v2.feature(argsz, flags, data)
        finally:
            f = flags & 0xFFFF
            self.trace.mark(f"feature {Feature(f).name if f in Feature._value2member_map_ else f}")

    def mig_data_read(self, size: int) -> bytes:
        try:
            return self.v2.data_read(size)
        finally:
            self.trace.mark("data read")

    def mig_data_write(self, data: bytes) -> None:
        self.trace.mark("data write in")
        try:
            self.v2.data_write(data)
        finally:
            self.trace.mark("data write out")

    # -- phase trace hooks (reactor/nvmefn.py) --------------------------------------------
    def worker_acked(self, wid: int, what: str, ack: dict) -> None:
        """A worker's ack carrying its stamps (rx: message read, t: ack sent, arr: ack read
        by us); the callback runs later still (asyncio scheduling)."""
        if "rx" in ack:
            self.trace.mark(f"w{wid} {what} rx", ack["rx"])
        if "inflight" in ack:
            self.quiesce_inflight[wid] = ack["inflight"]
            self.quiesce_waiting[wid] = ack.get("waiting", 0)
        if "t" in ack:
            self.trace.mark(f"w{wid} {what} ack", ack["t"])
        if "arr" in ack:
            self.trace.mark(f"w{wid} {what} ack read", ack["arr"])
        self.trace.mark(f"w{wid} {what} ack done")

    def worker_trace(self, wid: int, msg: dict) -> None:
        self.trace.mark(f"w{wid} resume rx", msg.get("resume_rx", 0))
        self.trace.mark(f"w{wid} first poll", msg.get("first_poll", 0))

    def _max_xfer(self) -> int:
        s = self.fn.session
        caps = getattr(s, "client_caps", None)
        return min(caps.max_data_xfer_size, SERVER_MAX_XFER) if caps is not None else SERVER_MAX_XFER

    def dirty_pages(self, m: DirtyPages, caps: ClientCaps | None) -> bytes:
        """VFIO_USER_DIRTY_PAGES (14, v1 era): only for a client that negotiated `migration`."""
        pgsize = migration_pgsize(caps) if caps is not None else None
        if pgsize is None:
            raise ProtocolError(errno.ENOTSUP, "DIRTY_PAGES needs the migration capability")
        try:
            return self._dirty_pages(m, pgsize)
        finally:
            self.trace.mark("dirty pages")

    def _dirty_pages(self, m: DirtyPages, pgsize: int) -> bytes:
        if m.flags == DirtyPagesFlag.START:
            self.dirty.start(pgsize)
            return b""
        if m.flags == DirtyPagesFlag.STOP:
            self.dirty.stop()
            return b""
        if m.flags != DirtyPagesFlag.GET_BITMAP:
            raise ProtocolError(errno.EINVAL, f"DIRTY_PAGES flags {m.flags:#x}")
        if m.argsz > SERVER_MAX_XFER:
            raise ProtocolError(errno.EINVAL, f"DIRTY_PAGES argsz {m.argsz} too large")
        _check_bitmap("DIRTY_PAGES", m.size, m.pgsize, m.bitmap_size)
        need = DirtyPages.SIZE + DirtyPages.RANGE_SIZE + m.bitmap_size
        if m.argsz < need:      # libvfio-user: header only, with the argsz it needs
            return DirtyPages(need, m.flags).encode(with_range=False)
        bm = self.dirty.report(m.iova, m.size, m.pgsize)
        return DirtyPages(need, m.flags, m.iova, m.size, m.pgsize, m.bitmap_size, bm).encode()

    def unmap_dirty_bitmap(self, iova: int, size: int, pgsize: int, bitmap_size: int) -> bytes:
        """DMA_UNMAP with GET_DIRTY_BITMAP (v1 era): the region's marks, read and cleared,
        before it goes (logging must be on: DIRTY_PAGES START or DMA_LOGGING_START)."""
        _check_bitmap("DMA_UNMAP", size, pgsize, bitmap_size)
        if bitmap_size > SERVER_MAX_XFER:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP bitmap of {bitmap_size} bytes too large")
        return self.dirty.report(iova, size, pgsize)

    # -- life cycle ------------------------------------------------------------------------
    def reset(self, resume: bool) -> None:
        """Device reset or disconnect: the migration ends, the controller runs again.

        `resume`: also restart the workers (a disconnect; a DEVICE_RESET is inside the
        pipeline's quiesce bracket, whose resume() does that).
        """
        was_held = self.held
        self.operator_hold = False
        if self.engine.state is not MigState.RUNNING:
            log.info("%s: migration state %s ends (reset)", self.fn.name, self.engine.state.name)
        self.engine.reset()
        self.v1.reset()
        self.held = False
        if was_held and resume and self.fn.coord.phase in (Phase.PAUSED, Phase.FAULTED):
            self.fn.coord.resume(recovered=not self.fn.ctrl.fatal)
            self.fn.admin_kick.set()

    async def hold(self) -> None:
        """Stop the controller outside a vfio-user request (upgrade, `controller save`):
        every worker quiesced, the admin poller idle.  Waits for a request's own
        quiesce bracket to end first (NvmeFunction.qlock); requests that come while held
        find the controller drained and leave it so."""
        async with self.fn.qlock:
            if self.held:
                return
            await self.fn.coord.quiesce(set(self.fn.links))
            self.held = True

    async def release_hold(self) -> None:
        async with self.fn.qlock:
            if not self.held or not self.engine.running:
                return  # a migration keeps the controller stopped: only its arcs release it
            self.held = False
            self.operator_hold = False
            self.fn.coord.resume(recovered=not self.fn.ctrl.fatal)
            self.fn.admin_kick.set()

    # -- operator: save to a file, start from a file -------------------------------------
    async def save_for_operator(self, resume: bool) -> dict[str, Any]:
        """`vnvmectl controller save`: the snapshot (base64); the controller stays stopped
        (an offline migration: the VM is paused and must not run on here) unless `resume`."""
        if self.engine.state is not MigState.RUNNING:
            raise RuntimeError(f"a migration is in progress (state {self.engine.state.name})")
        await self.hold()
        try:
            data = devstate.save_state(self.fn)
        except BaseException:
            await self.release_hold()
            raise
        if resume:
            await self.release_hold()
        else:
            self.operator_hold = True
        log.info("%s: controller state saved for the operator (%d bytes); %s", self.fn.name,
                 len(data), "running" if resume else "stopped until `controller resume` or disconnect")
        return {"name": self.fn.name, "bytes": len(data), "stopped": not resume,
                "snapshot": base64.b64encode(data).decode()}

    async def resume_for_operator(self) -> dict[str, Any]:
        if not self.operator_hold:
            raise RuntimeError("the controller was not stopped by `controller save`")
        await self.release_hold()
        return {"name": self.fn.name, "stopped": self.held}

    def restore_from_file(self, path: str) -> None:
        """Start-up with `restore = FILE`: checked now, applied once guest memory is mapped."""
        try:
            with open(path, "rb") as f:
                blobs = devstate.split(f.read())
            for b in blobs:
                devstate.check(self.fn, b)
            if not any("controller" in b for b in blobs):
                raise SnapshotError("no controller state in it")
        except (OSError, SnapshotError) as e:
            log.error("%s: restore from %s refused, starting fresh: %s", self.fn.name, path, e)
            return
        self.pending, self.pending_file = blobs, path
        log.info("%s: will resume from %s once the client has mapped guest memory", self.fn.name, path)

    def try_pending_restore(self) -> None:
        """After each DMA map: the pending snapshot's rings all mapped -> restore now."""
        if self.pending is None:
            return
        try:
            devstate.load_state(self.fn, self.pending)
        except devstate.RingsNotMapped:
            return                              # more memory to come
        except SnapshotError as e:
            log.error("%s: restore from %s failed, starting fresh: %s", self.fn.name,
                      self.pending_file, e)
        else:
            log.info("%s: resumed from %s", self.fn.name, self.pending_file)
        self.pending = None

    def info(self) -> dict[str, Any]:
        return {"state": self.engine.state.name, "scheme": self.engine.scheme or None,
                "held": self.held, "dirty_logging": self.dirty.info(),
                "current": self.engine.stats.to_dict() if self.engine.stats.role else None,
                "last": self.engine.last, "trace": self.trace.marks(),
                "quiesce_inflight": {str(w): n for w, n in self.quiesce_inflight.items()},
                "quiesce_waiting": {str(w): n for w, n in self.quiesce_waiting.items()}}

    def close(self) -> None:
        self._gc.remove()
        self.dirty.stop()
        self.v1.area.release()
        try:
            self._area.close()
        except BufferError:
            pass
        os.close(self.area_fd)


def _check_bitmap(what: str, size: int, pgsize: int, bitmap_size: int) -> None:
    """A client's bitmap request: a page size we can fold into, the exact bitmap size."""
    check_pgsize(pgsize)
    if size < pgsize or bitmap_size != bitmap_size_for(size, pgsize):
        raise ProtocolError(errno.EINVAL, f"{what} bitmap size {bitmap_size} does not fit "
                            f"{size:#x} bytes of {pgsize}-byte pages")
