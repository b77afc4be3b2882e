"""The NVMe controller model: registers, controller state, admin queue, events.

Theory of operation
-------------------
The front-end owns the process plumbing (vfio-user socket, workers, eventfds) and
reaches the model through a handful of calls; the model reaches back through
`ControllerHooks`.  Nothing here blocks or does I/O except through those hooks.

* Registers below 0x1000: `read_register` / `write_register`.  A CC write is decoded
  into state-table events (nvme.cstate): EN 0->1 validates the admin queue registers
  and starts an admin `QueueRunner`; EN 1->0 and CC.SHN tear everything down.  Before
  a write that tears queues down (`cc_write_tears_down` / `register_write_tears_down`)
  the front-end quiesces the workers; the teardown then deletes each I/O queue through
  the hooks, which return when the worker has let go of it.
* The admin queue runs in the front-end: `poll_admin()` fetches admin SQEs from guest
  memory and executes them through the capability table (nvme.admin.table).
* Asynchronous events (doorbell errors, namespace changes) go through `AerState`;
  completions for parked AER commands are collected and posted after the executor
  returns, never from inside it.
* `scan_doorbells()` looks for host writes to doorbells of queues that do not exist
  (the doorbell page is shared memory, nothing traps them).
* `snapshot()` / `restore()` cover everything needed to continue elsewhere, as plain
  dicts (msgpack-able).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Protocol

from nvme.admin.aer import AerState, AerType, AsyncEvent, LogId, NoticeInfo
from nvme.admin.caps import DEFAULT_IO_EFFECTS
from nvme.admin.command import AdminCmd
from nvme.admin.features import AEC_NS_ATTRIBUTE, FeatureState
from nvme.admin.logs import ChangedNsList, ErrorLog, IoStats
from nvme.admin.queues import IoQueues
from nvme.admin.table import build_admin_table
from nvme.config import ControllerConfig
from nvme.cstate import CEvent, CState, StateTable, cc_en, decode_cc_write
from nvme.doorbell import Doorbells
from nvme.errors import CommandError
from nvme.memory import DmaFault, GuestMemory
from nvme.qtable import QueueTable
from nvme.regs import (CC_WRITABLE, CSTS_CFS, CSTS_NSSRO, CSTS_RDY, CSTS_SHST_SHIFT,
                       NSSR_MAGIC, Reg, RegisterFile)
from nvme.state import CqState, ShadowDoorbells, SqState
from nvme.status import Status

from nvme.qpair import QueueRunner

_NONZERO = re.compile(rb"[^\x00]")

log = logging.getLogger(__name__)
SNAPSHOT_VERSION = 1


class ControllerHooks(Protocol):
    def irq(self, vector: int) -> None: ...
    def io_cq_created(self, cq: CqState) -> None: ...
    def io_sq_created(self, sq: SqState) -> None: ...
    def io_sq_deleted(self, sqid: int) -> None: ...
    def sq_busy(self, sqid: int) -> bool: ...
    def io_cq_deleted(self, cqid: int) -> None: ...
    def shadow_doorbells_changed(self, shadow: ShadowDoorbells) -> None: ...
    def coalescing_changed(self, threshold: int, time_100us: int, exempt_vectors: set[int]) -> None: ...
    def fatal(self, reason: str) -> None: ...


class Controller:
    def __init__(self, cfg: ControllerConfig, namespaces: Mapping[int, Any], doorbells: memoryview,
                 mem: GuestMemory, hooks: ControllerHooks, *,
                 io_effects: Mapping[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 qtable: QueueTable | None = None) -> None:
        self.cfg = cfg
        self.namespaces: dict[int, Any] = dict(namespaces)
        self.mem = mem
        self.hooks = hooks
        self.clock = clock
        self.db = Doorbells(doorbells)
        self._db_area = doorbells
        # Every queue's head/tail/phase (nvme.qtable): the admin queue's records are
        # written by our runner, the I/O queues' by the workers running them.
        self.qtable = qtable if qtable is not None else QueueTable.private(self.db.nqueues)
        self.regs = RegisterFile.for_config(cfg)
        self.table = StateTable()
        self.io_effects: dict[int, int] = dict(io_effects if io_effects is not None else DEFAULT_IO_EFFECTS)
        self.admin_table = build_admin_table(cfg)
        self.aer = AerState(cfg.aerl + 1)
        self.errlog = ErrorLog(cfg.elpe + 1)
        self.stats = IoStats()
        # Set by the front-end: what the workers counted so far (reactor/nvmefn.py).
        self.live_io: Callable[[], dict[str, int]] | None = None
        # Set by the front-end: told of each admin command's result before its CQE is
        # posted (front-end crash recovery, reactor/rescue.py).
        self.admin_note: Callable[[int, tuple[int, int] | None], None] | None = None
        self.changed_ns = ChangedNsList()
        self.features = FeatureState(timestamp_at=clock())
        self.queues = IoQueues()
        self.shadow = ShadowDoorbells()
        self.nssro = False
        self.fatal_reason = ""
        self._fatal_rdy = False
        self._born = clock()
        self._runner: QueueRunner | None = None
        self.dirty: Any = None           # dirty-page log while migrating (set_dirty)
        self.sq_deletions: dict[int, int] = {}   # SQ id -> CID of its parked Delete I/O SQ
        self._aer_out: list[tuple[int, int]] = []

    # -- status -------------------------------------------------------------------
    @property
    def state(self) -> CState:
        return self.table.state

    @property
    def fatal(self) -> bool:
        return self.table.state is CState.FATAL

    @property
    def ready(self) -> bool:
        return self.table.state is CState.READY

    @property
    def enabled(self) -> bool:
        return cc_en(self.regs.cc)

    @property
    def csts(self) -> int:
        st = self.table.state
        rdy = st in (CState.READY, CState.SHUTTING_DOWN) or (
            st is CState.SHUTDOWN_COMPLETE and self.enabled) or (st is CState.FATAL and self._fatal_rdy)
        v = CSTS_RDY if rdy else 0
        if st is CState.FATAL:
            v |= CSTS_CFS
        if st is CState.SHUTTING_DOWN:
            v |= 1 << CSTS_SHST_SHIFT
        elif st is CState.SHUTDOWN_COMPLETE:
            v |= 2 << CSTS_SHST_SHIFT
        if self.nssro:
            v |= CSTS_NSSRO
        return v

    def uptime(self) -> float:
        return self.clock() - self._born

    # -- registers ----------------------------------------------------------------
    def read_register(self, offset: int, size: int) -> int:
        return self.regs.read(offset, size, self.csts)

    def cc_write_tears_down(self, value: int) -> bool:
        if self.table.state is CState.DISABLED:
            return False
        evs = decode_cc_write(self.regs.cc, value & CC_WRITABLE)
        return any(e in (CEvent.DISABLE, CEvent.SHUTDOWN) and self.table.can(e) for e in evs)

    def register_write_tears_down(self, offset: int, size: int, value: int) -> bool:
        """Whether this register write deletes I/O queues (front-end quiesces first)."""
        if offset == Reg.CC and size == 4:
            return self.cc_write_tears_down(value)
        if offset == Reg.NSSR and size == 4:
            return self.cfg.nssr_supported and value == NSSR_MAGIC
        return False

    def write_register(self, offset: int, size: int, value: int) -> None:
        res = self.regs.write(offset, size, value)
        if res is None:
            return
        reg, old, new = res
        if reg is Reg.CC:
            self._cc_changed(old, new)
        elif reg is Reg.CSTS and new & CSTS_NSSRO:
            self.nssro = False                 # NSSRO is RW1C
        elif reg is Reg.NSSR and self.cfg.nssr_supported and new == NSSR_MAGIC:
            self.reset()
            self.nssro = True
        self._flush_aer()

    def _cc_changed(self, old: int, new: int) -> None:
        for ev in decode_cc_write(old, new):
            if not self.table.can(ev):
                log.info("ignoring CC write %#x -> %#x in state %s", old, new, self.state.name,
                         extra={"ratelimit": "CC write ignored"})
                continue
            if ev is CEvent.DISABLE:
                self._teardown()
                self._reset_controller_state()
                self.table.apply(CEvent.DISABLE)
            elif ev is CEvent.ENABLE:
                self._enable()
            elif ev is CEvent.SHUTDOWN:
                self.table.apply(CEvent.SHUTDOWN)      # SHST = 01b
                self._teardown()
                self._flush_namespaces()
                self.table.apply(CEvent.SHUTDOWN_DONE)  # SHST = 10b

    def _enable_error(self) -> str | None:
        cc, aqa = self.regs.cc, self.regs.aqa
        if (cc >> 7) & 0xF:
            return "CC.MPS: only 4 KiB pages"
        if (cc >> 4) & 7:
            return "CC.CSS: only the NVM command set"
        if (cc >> 11) & 7:
            return "CC.AMS: only round robin"
        asqs, acqs = (aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1
        if asqs < 2 or acqs < 2:
            return "AQA: admin queues need at least 2 entries"
        if self.regs.asq & 0xFFF or self.regs.acq & 0xFFF:
            return "ASQ/ACQ not page aligned"
        try:
            self.mem.view(self.regs.asq, asqs * 64)
            self.mem.view(self.regs.acq, acqs * 16, write=True)
        except DmaFault as e:
            # e.g. guest RAM not shared with us (libvfio-user #757): fail, do not hang
            return f"admin queue memory: {e}"
        return None

    def _enable(self) -> None:
        err = self._enable_error()
        if err is not None:
            self._fatal_rdy = False
            self.table.apply(CEvent.ENABLE_FAILED)
            self.fatal_reason = err
            self.hooks.fatal(err)
            return
        # Doorbells read as their reset value at every enable (DESIGN §4): a host may
        # have written them while EN=0 (a tail would fetch SQEs it never submitted, a
        # head would break the admin CQ).  No queue exists yet, so nobody else reads them.
        self._zero_doorbell_page()
        aqa = self.regs.aqa
        sq = SqState(sqid=0, cqid=0, base=self.regs.asq, size=(aqa & 0xFFF) + 1)
        cq = CqState(cqid=0, base=self.regs.acq, size=((aqa >> 16) & 0xFFF) + 1, iv=0, ien=True)
        self._start_admin(sq, cq)
        self.table.apply(CEvent.ENABLE)

    def _start_admin(self, sq: SqState, cq: CqState) -> None:
        runner = QueueRunner(doorbells=self.db, mem=self.mem, execute=self._execute,
                             irq=self.hooks.irq, doorbell_error=self.doorbell_error,
                             fault=self._admin_fault, table=self.qtable)
        runner.add_cq(cq)   # raises DmaFault if unmapped (checked by the callers)
        runner.add_sq(sq)
        runner.set_dirty(self.dirty)
        self._runner = runner

    def set_dirty(self, log: Any) -> None:
        """Dirty-page logging for the admin queue's CQEs (migration; None = off)."""
        self.dirty = log
        if self._runner is not None:
            self._runner.set_dirty(log)

    def admin_queue_state(self) -> tuple[SqState, CqState] | None:
        """The admin SQ/CQ records as they are now (None while disabled)."""
        if self._runner is None:
            return None
        return self._runner.sq_state(0), self._runner.cq_state(0)

    def _admin_fault(self, qid: int, reason: str) -> None:
        self.fail(f"admin queue {qid}: {reason}")

    def _repark_aers(self) -> None:
        """After restore: the outstanding AER CIDs are parked commands of the new runner
        (without it complete() would drop the AER completion)."""
        assert self._runner is not None
        for cid in self.aer.outstanding:
            self._runner.park(0, cid)

    # -- teardown / reset ---------------------------------------------------------
    def _teardown(self, zero_doorbells: bool = True) -> None:
        """EN 1->0, shutdown, reset: AERs dropped (no completions), I/O queues deleted."""
        self.aer.abort_outstanding()
        self._aer_out.clear()
        self.sq_deletions.clear()          # parked deletes die with the admin queue
        for sqid in sorted(self.queues.sqs):
            self.hooks.io_sq_deleted(sqid)
        for cqid in sorted(self.queues.cqs):
            self.hooks.io_cq_deleted(cqid)
        self.queues.sqs.clear()
        self.queues.cqs.clear()
        if self.shadow.enabled:
            self.shadow = ShadowDoorbells()
            self.hooks.shadow_doorbells_changed(self.shadow)
        self._runner = None
        self.qtable.clear_sq(0)
        self.qtable.clear_cq(0)
        if zero_doorbells:   # doorbell registers reset to 0 (not on restore: page migrates)
            self._zero_doorbell_page()

    def _zero_doorbell_page(self) -> None:
        for qid in range(self.db.nqueues):
            self.db.zero(qid)     # aligned 32-bit stores: workers may be reading

    def _reset_controller_state(self) -> None:
        """What a controller reset returns to defaults (error log and SMART persist)."""
        self.aer.reset()
        self.queues = IoQueues()
        self.features = FeatureState(timestamp_at=self.clock())

    def _flush_namespaces(self) -> None:
        for ns in self.namespaces.values():
            flush = getattr(ns, "flush", None) or getattr(getattr(ns, "backend", None), "flush", None)
            if callable(flush):
                try:
                    flush()
                except OSError as e:
                    log.warning("flush of namespace %s failed at shutdown: %s", ns, e)

    def reset(self) -> None:
        """vfio-user DEVICE_RESET / NVM subsystem reset: power-on state."""
        self._teardown()
        self._reset_controller_state()
        self.table.apply(CEvent.RESET)
        self.regs.reset()
        self.nssro = False
        self._fatal_rdy = False
        self.fatal_reason = ""

    def fail(self, reason: str) -> None:
        """Internal failure (e.g. a quiesce that never completed): CSTS.CFS."""
        if self.table.can(CEvent.FAULT):
            self._fatal_rdy = self.csts & CSTS_RDY != 0
            self.table.apply(CEvent.FAULT)
            self.fatal_reason = reason
            self.hooks.fatal(reason)

    # -- admin queue --------------------------------------------------------------
    def poll_admin(self, budget: int = 64) -> int:
        if self.table.state is not CState.READY or self._runner is None:
            return 0
        n = self._runner.poll(budget)
        self._flush_aer()
        return n

    def _execute(self, sqe: memoryview, sqid: int) -> tuple[int, int] | None:
        cmd = AdminCmd.decode(sqe)
        spec = self.admin_table.get(cmd.opcode)
        res: tuple[int, int] | None
        try:
            if spec is None:
                raise CommandError(Status.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
            if cmd.fuse or cmd.psdt:
                raise CommandError(Status.INVALID_FIELD, "fused or SGL admin command")
            dw0 = spec.handler(self, cmd)
            res = None if dw0 is None else (Status.SUCCESS, dw0)
        except CommandError as e:
            self.errlog.add(sqid, cmd.cid, e.status)
            res = (e.status, 0)
        if self.admin_note is not None:
            self.admin_note(cmd.cid, res)
        return res

    def sq_quiet(self, sqid: int) -> None:
        """The front-end finished its last command of SQ sqid: a parked Delete I/O SQ
        of it can complete now (called from the front-end loop, outside poll_admin)."""
        cid = self.sq_deletions.pop(sqid, None)
        if cid is None or self._runner is None or sqid not in self.queues.sqs:
            return
        from nvme.admin.queues import delete_io_sq
        delete_io_sq(self, sqid)
        self._runner.complete(0, cid, Status.SUCCESS, 0)

    def post_aer_completions(self, done: list[tuple[int, int]]) -> None:
        self._aer_out.extend(done)

    def _flush_aer(self) -> None:
        if self._runner is None:
            self._aer_out.clear()
            return
        out, self._aer_out = self._aer_out, []
        for cid, dw0 in out:
            self._runner.complete(0, cid, Status.SUCCESS, dw0)

    # -- doorbells and events ------------------------------------------------------
    def zero_doorbells(self, qid: int, sq: bool) -> None:
        """Reset a queue's doorbell (and shadow/EventIdx) slot: one aligned store each."""
        if sq:
            self.db.set_sq_tail(qid, 0)
        else:
            self.db.set_cq_head(qid, 0)
        if self.shadow.enabled:
            slot = (qid << 1) | (0 if sq else 1)
            try:
                self.mem.view(self.shadow.dbbuf, 4096, write=True).cast("I")[slot] = 0
                self.mem.view(self.shadow.eventidx, 4096, write=True).cast("I")[slot] = 0
            except DmaFault:
                pass  # shadow pages vanished: set_memory() drops shadow mode

    def scan_doorbells(self) -> None:
        if self.table.state is not CState.READY:
            return
        # Find non-zero doorbell words at C speed (one copy + a regex scan over ~12 KiB);
        # only those few are looked at in Python.  Word i: qid i//2, SQ tail if even.
        area = self._db_area.tobytes()
        seen: set[int] = set()
        for m in _NONZERO.finditer(area, 8):
            word = m.start() // 4
            if word in seen:
                continue
            seen.add(word)
            qid, is_cq = divmod(word, 2)
            if is_cq:
                if qid not in self.queues.cqs and self.db.cq_head(qid):
                    self.db.set_cq_head(qid, 0)
                    self._doorbell_event(0x00, qid)
            elif qid not in self.queues.sqs and self.db.sq_tail(qid):
                self.db.set_sq_tail(qid, 0)
                self._doorbell_event(0x00, qid)
        self._flush_aer()

    def doorbell_error(self, info: int, qid: int) -> None:
        """Invalid doorbell write (01h) or write to a non-existent queue (00h)."""
        self._doorbell_event(info, qid)
        self._flush_aer()

    def _doorbell_event(self, info: int, qid: int) -> None:
        self.errlog.add(qid, 0xFFFF, 0)
        if self.table.state is not CState.READY:
            return  # a late report from a worker of a torn-down queue: log only
        self.post_aer_completions(self.aer.post(AsyncEvent(AerType.ERROR, info, LogId.ERROR)))

    def add_io_stats(self, *, bytes_read: int = 0, bytes_written: int = 0, reads: int = 0,
                     writes: int = 0, media_errors: int = 0) -> None:
        s = self.stats
        s.bytes_read += bytes_read
        s.bytes_written += bytes_written
        s.read_commands += reads
        s.write_commands += writes
        s.media_errors += media_errors

    def io_totals(self) -> IoStats:
        """SMART counters: our own plus what the workers have counted (live_io)."""
        s = replace(self.stats)
        if self.live_io is not None:
            for k, v in self.live_io().items():
                if hasattr(s, k):
                    setattr(s, k, getattr(s, k) + int(v))
        return s

    def log_error(self, sqid: int, cid: int, status: int, lba: int = 0, nsid: int = 0) -> None:
        """An I/O command failed: keep an Error Information entry (no AER, spec 5.14.1.1)."""
        self.errlog.add(sqid, cid, status, lba=lba, nsid=nsid)

    # -- namespaces ----------------------------------------------------------------
    def namespaces_changed(self, nsids: list[int]) -> None:
        self.changed_ns.add(nsids)
        if self.features.async_event_config & AEC_NS_ATTRIBUTE:
            ev = AsyncEvent(AerType.NOTICE, NoticeInfo.NS_ATTRIBUTE_CHANGED, LogId.CHANGED_NS)
            self.post_aer_completions(self.aer.post(ev))
        self._flush_aer()

    def add_namespace(self, ns: Any) -> None:
        self.namespaces[ns.nsid] = ns
        self.namespaces_changed([ns.nsid])

    def remove_namespace(self, nsid: int) -> None:
        if self.namespaces.pop(nsid, None) is not None:
            self.namespaces_changed([nsid])

    def resize_namespace(self, nsid: int) -> None:
        """The namespace object already reports its new size; tell the host."""
        self.namespaces_changed([nsid])

    # -- memory --------------------------------------------------------------------
    def set_memory(self, mem: GuestMemory) -> None:
        self.mem = mem
        if self._runner is not None:
            self._runner.set_memory(mem)
        if self.shadow.enabled:
            try:
                mem.view(self.shadow.dbbuf, 4096, write=True)
                mem.view(self.shadow.eventidx, 4096, write=True)
            except DmaFault:
                # Shadow pages were unmapped: fall back to BAR0 doorbells (as SPDK does).
                self.shadow = ShadowDoorbells()
                self.hooks.shadow_doorbells_changed(self.shadow)

    # -- snapshot --------------------------------------------------------------------
    def update_queue_records(self, sqs: Iterable[SqState], cqs: Iterable[CqState]) -> None:
        """The front-end hands back the workers' current I/O queue records."""
        for sq in sqs:
            if sq.sqid in self.queues.sqs:
                self.queues.sqs[sq.sqid] = sq
        for cq in cqs:
            if cq.cqid in self.queues.cqs:
                self.queues.cqs[cq.cqid] = cq

    def snapshot(self) -> dict[str, Any]:
        from nvme.controller_snapshot import snapshot_controller
        return snapshot_controller(self)

    def restore(self, d: dict[str, Any]) -> None:
        from nvme.controller_snapshot import restore_controller
        restore_controller(self, d)
