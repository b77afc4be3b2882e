"""Everything a worker holds for one controller: memory, doorbells, namespaces, queues.

A slot is driven by the messages its front-end sends over the channel (see
`reactor/channel.py` for the transport and `handle()` below for the vocabulary).  The
data path itself is `nvme.qpair.QueueRunner` with `nvme.io.IoExecutor`; a command that
touches guest memory mapped without an fd is parked and handed to the front-end
(`slow`), which performs it with vfio-user DMA messages and answers `slow_done`.

Deep idle (the probe): an idle worker wakes every ~40 ms and would poll every slot -
runner, queues, records, admin watch: cold Python objects, ~10 us a slot.  Instead, the
first poll of a deep-idle wake-up that finds nothing leaves a probe behind: a copy of
the doorbell words that poll read (admin doorbells for the admin watch, and every
queue's SQ tail / CQ head, plus their shadow copies in guest memory), taken *before*
that poll.  While they all still hold the copied values (one memoryview comparison,
aligned 64-bit loads) the next poll would do nothing and is skipped.  Anything else
that could give a poll work drops the probe: any message for the slot (handle()),
asynchronous backend requests, work left over, interrupts pending (coalescing),
failures to report (QueueRunner.idle_watch).  A write the copy missed happened
before the copy, so the poll after the copy saw it.

Quiesce (worker side of the coordinator's barrier): on `quiesce` the runner stops
fetching new SQEs; once no command is parked the slot acks.  While quiesced the front-
end may change the memory map; nothing here touches guest memory until `resume`.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from array import array
from time import perf_counter_ns
from typing import Any, Callable

from backends.aio import DEFAULT_DEPTH
from backends.base import open_backend
from migration.dirty import DirtyLog
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor
from nvme.memory import NeedsMessageDma
from nvme.msgwindow import LOW_MEMORY, MessageWriteWindows
from nvme.namespace import Namespace
from nvme.qpair import SQ_DELETE_DRAIN_S, QueueRunner
from nvme.qtable import QueueTable, table_bytes
from nvme.state import NamespaceInfo, ShadowDoorbells
from reactor.channel import Channel
from reactor.guestmem import MappedGuestMemory
from workers.aio import BackendIo

log = logging.getLogger("vnvmed.worker")
DB_OFFSET = 0x1000  # doorbells start at BAR0 + 0x1000 (DSTRD 0)


class Slot:
    def __init__(self, name: str, chan: Channel,
                 load: Callable[[], int] = lambda: 0, datapath: str = "python") -> None:
        self.name = name
        self.datapath = datapath   # "native": nvme.native.NativeQueueRunner (C loop + Python)
        self._load = load          # queues this worker runs for all controllers
        self.chan = chan
        self.mem = MappedGuestMemory()
        self.db_map: mmap.mmap | None = None
        self.dbw: memoryview | None = None        # doorbell words (the admin watch reads 0, 1)
        self.admin_watch: tuple[int, int] | None = None   # (admin SQ tail, CQ head) the front-end took
        self._zero: list[tuple[memoryview, memoryview]] = []  # doorbells of absent queues (admin watch)
        self.dbq: memoryview | None = None        # the doorbell page as 64-bit words (qid q = word q)
        self._probe: list[tuple[memoryview, memoryview]] | None = None   # see "Deep idle" above
        self.qt_map: mmap.mmap | None = None      # the controller's queue table (nvme.qtable)
        self.namespaces: dict[int, Namespace] = {}
        self.executor: IoExecutor | None = None
        self.runner: QueueRunner | None = None
        self.vectors: dict[int, int] = {}      # MSI-X vector -> eventfd (or INTx fd for all)
        self.paused = False
        self.quiesce_seq: int | None = None
        self.quiesce_rx = 0
        self.quiesce_n = 0                       # commands in flight when it came
        self.quiesce_waiting = 0
        self.trace_resume: int | None = None     # a traced RESUME's arrival (ns)
        self.nqueues = 0
        self.stats = {"commands": 0, "slow": 0, "dberr": 0}
        self.lat = [0] * 48         # per-batch service time per command, log2 ns buckets
        self.dead = False
        # Trapped doorbells (the front-end's hello says so): every doorbell write of this
        # controller kicks us, so the worker may sleep without polling once prepare_sleep()
        # armed EventIdx.
        self.trapped = False
        # Asynchronous backends (workers/aio.py): parked commands complete from here.
        # Made now, not at hello: the worker's epoll set may be built before hello arrives.
        self.aio: BackendIo | None = BackendIo(self._aio_complete, signal=self._aio_signal)
        self.aio_woke = False      # the worker's epoll reported self.aio's fd ready
        # Dirty-page logging (migration, SEAMS S3): byte maps shared with the front-end.
        self.dirty = DirtyLog()
        self._dirty_maps: dict[int, mmap.mmap] = {}

    # --- set-up ---------------------------------------------------------------------
    def _hello(self, msg: dict[str, Any]) -> None:
        db_fd, qt_fd = self.chan.take_fds(msg["tok"])
        try:
            self.db_map = mmap.mmap(db_fd, msg["db_size"], mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            self.qt_map = mmap.mmap(qt_fd, table_bytes(msg["nqueues"]), mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(db_fd)
            os.close(qt_fd)
        for info in msg["ns"]:
            self._ns_add(info)
        # Read payloads bound for a message-write window (firmware code) go by DMA_WRITE.
        data_mem = MessageWriteWindows(self.mem, msg.get("wwin", LOW_MEMORY))
        self.executor = IoExecutor(self.namespaces, data_mem, msg["mdts"])
        assert self.aio is not None
        self.aio.bind(self.executor)
        for nsid, ns in self.namespaces.items():
            self._aio_attach(nsid, ns)
        self.trapped = bool(msg.get("trapped", False))
        doorbells = Doorbells(memoryview(self.db_map)[DB_OFFSET:])
        self.dbw = doorbells.words
        self.dbq = memoryview(self.db_map)[DB_OFFSET:].cast("Q")
        kw: dict[str, Any] = dict(doorbells=doorbells, mem=self.mem,
                                  execute=self._execute, irq=self._irq,
                                  doorbell_error=self._doorbell_error, lazy_eventidx=self.trapped,
                                  table=QueueTable(self.qt_map, msg["nqueues"]))
        if self.datapath == "native":
            from nvme.native import NativeQueueRunner
            # The C loop writes the vectors' eventfds itself (rebuilt after every message,
            # so an `irqs` change is seen before the next poll).
            self.runner = NativeQueueRunner(executor=self.executor,
                                            irq_fd=lambda v: self.vectors.get(v), **kw)
            self.aio.serve_native(self.runner)    # file namespaces: io_uring from C
        else:
            self.runner = QueueRunner(**kw)

    def _ns_add(self, info: dict[str, Any]) -> None:
        ni = NamespaceInfo(**info)
        old = self.namespaces.pop(ni.nsid, None)
        if old is not None:
            if self.aio is not None:
                self.aio.detach(ni.nsid)
            old.backend.close()
        try:
            backend = open_backend(ni.backend)
        except ValueError as e:
            # Destroyed meanwhile (the daemon is stopping, or the namespace was removed
            # while this worker was being restarted): serve the controller without it.
            log.error("%s: namespace %d not attached: %s", self.name, ni.nsid, e)
            return
        ns = Namespace(ni, backend)
        self.namespaces[ni.nsid] = ns
        self._aio_attach(ni.nsid, ns)

    def _aio_attach(self, nsid: int, ns: Namespace) -> None:
        if self.aio is not None and self.executor is not None:
            self.aio.attach(nsid, ns.backend, getattr(ns.backend, "depth", None) or DEFAULT_DEPTH)

    # --- callbacks from BackendIo: post each finished command, one interrupt per batch ---
    def _aio_complete(self, sqid: int, cid: int, status: int, dw0: int) -> None:
        if self.runner is not None:
            self.runner.complete(sqid, cid, status, dw0, signal=False)

    def _aio_signal(self) -> None:
        if self.runner is not None:
            self.runner.signal_pending()

    # --- callbacks from the runner --------------------------------------------------
    def _execute(self, sqe: memoryview, sqid: int) -> tuple[int, int] | None:
        try:
            return self.executor.execute(sqe, sqid)  # type: ignore[union-attr]
        except NeedsMessageDma:
            self.stats["slow"] += 1
            self.chan.send({"op": "slow", "sqid": sqid, "sqe": bytes(sqe)})
            return None

    def _irq(self, vector: int) -> None:
        fd = self.vectors.get(vector)
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _doorbell_error(self, info: int, qid: int) -> None:
        self.stats["dberr"] += 1
        self.chan.send({"op": "dberr", "info": info, "qid": qid})

    # --- the loop's entry points ----------------------------------------------------
    def idle_poll(self) -> int:
        """poll() for a worker in deep idle: skipped while the probe holds, else a poll
        that leaves a probe when it finds nothing (see "Deep idle" above)."""
        p = self._probe
        if p is not None and not self.aio_woke:
            for view, copy in p:
                if view != copy:
                    break
            else:
                return 0               # nothing the poll reads has changed
            self._probe = None
        probe = self._probe_copy()
        n = self.poll()
        if not n and probe is not None and self._idle():
            self._probe = probe
        return n

    def _probe_copy(self) -> list[tuple[memoryview, memoryview]] | None:
        """The doorbell words the next poll reads, and a copy of them (one aligned load
        per word); None if there is no doorbell page yet."""
        q = self.dbq
        if q is None or self.dead:
            return None
        top = 0
        shadow: memoryview | None = None
        r = self.runner
        if r is not None and self.nqueues and not self.paused:
            w = r.idle_watch()
            if w is None:
                return None
            top, shadow = w
        views = [q[0:top + 1]]
        if shadow is not None:
            views.append(shadow.cast("B").cast("Q")[0:top + 1])
        return [(v, memoryview(array("Q", v.tolist()))) for v in views]

    def _idle(self) -> bool:
        """Nothing but a doorbell write can give the next poll work (see above)."""
        aio = self.aio
        if aio is not None and (aio.outstanding or self.aio_woke or aio.new):
            return False
        r = self.runner
        return r is None or not self.nqueues or self.paused or r.idle_watch() is not None

    def needs_idle_poll(self) -> bool:
        """False while poll() cannot do anything but return 0: no queues here, no admin
        watch, no asynchronous namespace.  All three change only with a message (the
        worker asks again after one; a watch that fired leaves this True, harmlessly)."""
        aio = self.aio
        return bool(self.nqueues or self.admin_watch is not None or self.trace_resume is not None
                    or (aio is not None and (aio.queues or aio.outstanding)))

    @property
    def probe(self) -> list[tuple[memoryview, memoryview]] | None:
        return self._probe

    def drop_probe(self) -> None:
        self._probe = None

    def poll(self) -> int:
        if self.admin_watch is not None:
            self._check_admin_watch()
        if self.trace_resume is not None:
            self._trace_first_poll()
        r = self.runner
        done = 0
        aio = self.aio
        if aio is not None and (aio.outstanding or self.aio_woke):
            # Also while paused: parked commands must finish for the quiesce ack.  Native
            # rings are reaped by the poll below when there is one (one C call, not two).
            woke, self.aio_woke = self.aio_woke, False
            try:
                done = aio.service(woke, native=r is None or self.paused or self.nqueues == 0)
            except Exception:
                self.aio = None        # our bug: the worker faults this controller; no log flood
                raise
        if r is None or self.paused or self.nqueues == 0:
            if r is not None and r.failed:
                self._report_failures(r)
            return done
        t0 = perf_counter_ns()
        n = r.poll()
        if r.failed:
            self._report_failures(r)
        if aio is not None and (aio.new or aio.native):
            done += aio.push()       # parked on a backend: submitted now, counted as work
        if n:
            # Service time per command of this batch, log2 buckets of ns (bucket k holds
            # [2^(k-1), 2^k)); one clock pair per batch keeps it off the per-I/O budget.
            self.lat[min(((perf_counter_ns() - t0) // n).bit_length(), 47)] += n
            self.stats["commands"] += n
        return n + done

    def _report_failures(self, r: QueueRunner) -> None:
        """Failed commands go to the front-end's Error Information log (and SMART media
        errors); at most 64 per poll, the rest counted."""
        errs = r.take_failures()
        dropped, r.failed_dropped = r.failed_dropped, 0
        self.chan.send({"op": "ioerr", "errs": errs, "dropped": dropped})

    def _check_admin_watch(self) -> None:
        """The front-end sleeps in deep idle and left its admin doorbells to us: a host
        write to either wakes it (one message; the watch is re-armed by the front-end)."""
        sq, cq = self.admin_watch  # type: ignore[misc]
        w = self.dbw
        if w is not None and (w[0] != sq or w[1] != cq):
            self._kick_admin()

    def check_absent(self) -> None:
        """Part of the admin watch, called by the worker about once a second (every 32nd
        deep-idle wake-up, every 1024th round): one comparison per range, too dear for
        every poll and not part of the probe (64 queues' words are 9 cache lines).  A
        doorbell of a queue that does not exist was written (Write to Invalid Doorbell
        Register, which the front-end's scan reports; it used to scan every 5 s)."""
        for view, zero in self._zero:
            if view != zero:
                self._kick_admin()
                return

    def _kick_admin(self) -> None:
        self.admin_watch = None
        self._zero = []
        self.chan.send({"op": "admin_kick"})

    def _op_admin_watch(self, msg: dict[str, Any]) -> None:
        self.admin_watch = (int(msg["sq"]), int(msg["cq"]))
        # "zero": [[first, end), ...] qids none of whose doorbells exist: both words stay 0.
        q = self.dbq
        self._zero = []
        if q is None:
            return
        for a, b in msg.get("zero", ()):
            a, b = max(1, int(a)), min(len(q), int(b))
            if a < b:
                self._zero.append((q[a:b], memoryview(bytes(8 * (b - a))).cast("Q")))

    def prepare_sleep(self) -> bool:
        """Trapped mode, about to sleep with no timeout worth the name: arm EventIdx.

        False: work turned up (or may have, see QueueRunner.prepare_sleep): poll first.
        A paused slot needs nothing: the resume message wakes the worker.
        """
        r = self.runner
        if r is None or self.paused or self.nqueues == 0:
            return True
        return r.prepare_sleep()

    def sleep_deadline(self) -> int | None:
        """monotonic_ns by which poll() must run again (coalesced interrupts), or None."""
        r = self.runner
        return None if r is None or self.paused else r.coalesce_deadline()

    def check_quiesced(self) -> None:
        if self.quiesce_seq is not None and (self.runner is None or self.runner.inflight() == 0):
            # rx/t (CLOCK_MONOTONIC ns): when we read the QUIESCE and when we ack it, for
            # the migration's phase trace (migration/trace.py).
            self.chan.send({"op": "ack", "seq": self.quiesce_seq, "rx": self.quiesce_rx,
                            "t": time.monotonic_ns(), "inflight": self.quiesce_n,
                            "waiting": self.quiesce_waiting})
            self.quiesce_seq = None

    def _trace_first_poll(self) -> None:
        """The first poll after a RESUME that asked for it: tell the front-end when (the
        end of a migration's blackout as the guest sees it, migration/trace.py)."""
        rx, self.trace_resume = self.trace_resume, None
        self.chan.send({"op": "trace", "resume_rx": rx, "first_poll": time.monotonic_ns()})

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        fn: Callable[[dict[str, Any]], None] | None = getattr(self, "_op_" + str(op), None)
        if fn is None:
            log.error("%s: unknown message %r from front-end", self.name, op)
            return
        # The native data path describes memory, namespaces, queues and dirty maps to its
        # C loop and holds the buffers behind them: any message may change or close them,
        # so it lets go first (and describes them afresh at its next poll).
        self._probe = None          # the message may give the next poll work (or unmap)
        invalidate = getattr(self.runner, "invalidate", None)
        if invalidate is not None:
            invalidate()
        fn(msg)

    def _ack(self, msg: dict[str, Any], **extra: Any) -> None:
        if "seq" in msg:
            self.chan.send({"op": "ack", "seq": msg["seq"], **extra})

    def _op_hello(self, msg: dict[str, Any]) -> None:
        self._hello(msg)
        self._ack(msg)

    def _op_map(self, msg: dict[str, Any]) -> None:
        fds = self.chan.take_fds(msg["tok"]) if "tok" in msg else []
        fd = fds[0] if fds else None
        try:
            self.mem.map(msg["iova"], msg["size"], msg["off"], fd, msg["r"], msg["w"])
        except Exception as e:
            # The front-end mapped the same fd with the same checks, so this is ours
            # (address space, ENOMEM): serving on without the region would turn every
            # command that touches it into a guest-visible error.  The controller goes fatal.
            reason = f"cannot map guest memory {msg['iova']:#x}+{msg['size']:#x}: {e}"
            log.error("%s: %s", self.name, reason)
            self.chan.send({"op": "fault", "reason": reason})
            self._ack(msg, error=reason)
            return
        finally:
            if fd is not None:
                os.close(fd)
        self._ack(msg)

    def _op_unmap(self, msg: dict[str, Any]) -> None:
        if msg.get("all"):
            self.mem.unmap_all()
        else:
            try:
                self.mem.unmap(msg["iova"], msg["size"])
            except Exception as e:
                log.error("%s: unmap %#x: %s", self.name, msg["iova"], e)
        self._ack(msg)

    def _op_irqs(self, msg: dict[str, Any]) -> None:
        fds = self.chan.take_fds(msg["tok"]) if "tok" in msg else []
        for fd in set(self.vectors.values()):
            os.close(fd)
        self.vectors = {}
        # vec: list of (vector, index into fds)
        for vector, idx in msg["vec"]:
            self.vectors[vector] = os.dup(fds[idx])
        for fd in fds:
            os.close(fd)
        self._ack(msg)

    # Queues: the front-end has written the record into the queue table (SEAMS S1);
    # we run it from there and leave it there when we let go.
    def _op_add_cq(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        self.runner.attach_cq(int(msg["cqid"]))
        self.nqueues += 1
        self._ack(msg)

    def _op_add_sq(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        self.runner.attach_sq(int(msg["sqid"]))
        self.nqueues += 1
        self._ack(msg, t=time.monotonic_ns())      # a restore's phase trace reads it

    def _op_adopt(self, msg: dict[str, Any]) -> None:
        """Commands a dead predecessor had parked on an SQ we now run (reactor/recovery.py):
        `park` ones complete later (slow path), `retry` ones complete now with `status`
        (Command Interrupted, DNR clear: the host retries them)."""
        assert self.runner is not None
        sqid = int(msg["sqid"])
        for cid in msg["park"]:
            self.runner.park(sqid, int(cid))
        for cid in msg["retry"]:
            self.runner.park(sqid, int(cid))
            self.runner.complete(sqid, int(cid), int(msg["status"]), 0)
        self._ack(msg)

    def _op_del_sq(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        # The front-end sends this only once its slow-path commands on the SQ are done
        # (their slow_done messages came before this one on the ring).  Commands parked on
        # an asynchronous backend finish first (bounded: a stalled server must not hang the
        # worker), so no backend read lands in guest memory after the SQ is gone; anything
        # still parked then completes as ABORTED_SQ_DELETION.
        deadline = time.monotonic() + SQ_DELETE_DRAIN_S
        aio = self.aio
        while aio is not None and aio.outstanding and self.runner.inflight(msg["sqid"]) \
                and time.monotonic() < deadline:
            if not aio.service(True):
                time.sleep(0.0005)
        sq = self.runner.remove_sq(msg["sqid"])
        self.nqueues -= 1
        self._ack(msg, sq=sq.to_dict() if sq is not None else None)

    def _op_del_cq(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        cq = self.runner.remove_cq(msg["cqid"])
        self.nqueues -= 1
        self._ack(msg, cq=cq.to_dict() if cq is not None else None)

    def _op_shadow(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        sh = ShadowDoorbells(msg["dbbuf"], msg["eventidx"]) if msg["dbbuf"] else None
        self.runner.set_shadow(sh)
        self._ack(msg)

    def _op_coalesce(self, msg: dict[str, Any]) -> None:
        assert self.runner is not None
        self.runner.set_coalescing(msg["thr"], msg["time"], set(msg["exempt"]))
        self._ack(msg)

    def _op_quiesce(self, msg: dict[str, Any]) -> None:
        self.quiesce_rx = time.monotonic_ns()
        self.paused = True
        if self.runner is not None:
            self.runner.pause_fetch(True)
        self.quiesce_seq = msg["seq"]
        self.quiesce_n = self.runner.inflight() if self.runner is not None else 0
        # Of those, requests not yet started on the backend (queued behind its depth bound).
        self.quiesce_waiting = (sum(len(q.wait) for q in self.aio.queues.values())
                                if self.aio is not None else 0)
        self.check_quiesced()

    def _op_resume(self, msg: dict[str, Any]) -> None:
        if msg.get("trace"):
            self.trace_resume = time.monotonic_ns()
        self.paused = False
        if self.runner is not None:
            self.runner.pause_fetch(False)
        self._ack(msg)

    def _op_slow_done(self, msg: dict[str, Any]) -> None:
        if self.runner is not None:
            self.runner.complete(msg["sqid"], msg["cid"], msg["status"], msg["dw0"])

    def _op_ns_add(self, msg: dict[str, Any]) -> None:
        self._ns_add(msg["ns"])
        self._ack(msg)

    def _op_ns_del(self, msg: dict[str, Any]) -> None:
        ns = self.namespaces.pop(msg["nsid"], None)
        if ns is not None:
            if self.aio is not None:
                self.aio.detach(msg["nsid"])
            ns.backend.close()
        self._ack(msg)

    def _op_load(self, msg: dict[str, Any]) -> None:
        self._ack(msg, queues=self._load())

    def _op_stats(self, msg: dict[str, Any]) -> None:
        r, w, br, bw = self.executor.io if self.executor is not None else (0, 0, 0, 0)
        native_io = getattr(self.runner, "native_io", None)
        nr = nw = 0
        if native_io is not None:           # what the C loop completed is counted there
            nr, nw, nbr, nbw = native_io()
            r, w, br, bw = r + nr, w + nw, br + nbr, bw + nbw
        err = self.runner.errors if self.runner is not None else 0
        self._ack(msg, stats=dict(self.stats, nqueues=self.nqueues,
                                  read_commands=r, write_commands=w, bytes_read=br,
                                  bytes_written=bw, io_errors=err, lat_log2_ns=list(self.lat),
                                  backends=self.aio.stats() if self.aio is not None else {},
                                  datapath=self.datapath, native_commands=nr + nw))

    def _op_dirty_add(self, msg: dict[str, Any]) -> None:
        (fd,) = self.chan.take_fds(msg["tok"])
        try:
            mm = mmap.mmap(fd, msg["len"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.dirty.add(msg["iova"], msg["size"], memoryview(mm))
        self._dirty_maps[msg["iova"]] = mm
        self._set_dirty(self.dirty)
        self._ack(msg)

    def _op_dirty_del(self, msg: dict[str, Any]) -> None:
        self._drop_dirty(msg["iova"])
        self._ack(msg)

    def _op_dirty_off(self, msg: dict[str, Any]) -> None:
        self._set_dirty(None)
        for iova in list(self._dirty_maps):
            self._drop_dirty(iova)
        self._ack(msg)

    def _set_dirty(self, log: DirtyLog | None) -> None:
        if self.executor is not None:
            self.executor.dirty = log
        if self.runner is not None:
            self.runner.set_dirty(log)

    def _drop_dirty(self, iova: int) -> None:
        m = self.dirty.remove(iova)
        mm = self._dirty_maps.pop(iova, None)
        if m is not None:
            m.bm.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def _op_bye(self, msg: dict[str, Any]) -> None:
        self._ack(msg)
        self.close()

    def pinned(self) -> int:
        """After close(): guest mappings and rings a live view still pins (0 when close()
        released everything, as it must: see Worker._check_released)."""
        return self.mem.collect() + (0 if self.chan.closed else 1)

    def close(self) -> None:
        if self.dead:
            return
        self.dead = True
        if self.aio is not None:
            # First, while the runner and the interrupt routes still exist: commands
            # parked on the backend finish (bounded) and post their CQEs - with the
            # runner gone they crashed the worker (a front-end killed with file I/O in
            # flight); a command still unfinished stays in the crash journal, which
            # the front-end that takes over retries (reactor/revive.py).
            self.aio.close()
            self.aio = None
        if self.runner is not None:
            # Drop the runner's views of the rings (and the C loop's buffer exports) now:
            # anything that still refers to the runner (a backend request's owner, an
            # object cycle) would otherwise pin the guest mappings and their descriptors
            # after unmap_all (a front-end kill storm with file I/O grew a worker by 2
            # guest-memory fds per kill).
            self.runner.release_views()
        self.runner = None
        self._set_dirty(None)
        for iova in list(self._dirty_maps):
            self._drop_dirty(iova)
        for fd in set(self.vectors.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.vectors = {}
        self.mem.unmap_all()
        for ns in self.namespaces.values():
            ns.backend.close()
        self.namespaces = {}
        self.dbw = None
        self.admin_watch = None
        self._probe = None
        self._zero = []
        self.dbq = None
        for name in ("db_map", "qt_map"):
            m = getattr(self, name)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a view is still alive somewhere; the mapping dies with the process
                setattr(self, name, None)
        self.chan.close(unlink=False)
