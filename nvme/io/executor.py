"""NVM I/O command execution: one SQE in, (status, DW0) out.

Theory of operation
-------------------
`IoExecutor.execute(sqe)` is the data-path hot loop's only call.  The SQE (a view
of guest memory) is cast to 16 dwords once and each field is read exactly once,
then dispatched through a 256-slot list indexed by opcode (no dict lookups beyond
the namespace).  Helpers raise `CommandError(status)`; execute turns it into the
status.  Backend OSErrors become media errors (Unrecovered Read Error for reads,
Write Fault for writes).  A DmaFault from helpers is a Data Transfer Error.
`NeedsMessageDma` is the only exception that leaves execute: the caller may run
the command again on the front-end's slow path (message-based DMA).  On a namespace
with an asynchronous backend (`aio_ns`, set by a worker) execute returns None after
validation: the command is parked and completed later (nvme/io/aio.py).

Dirty-page logging (live migration): while `dirty` is set (a DirtyLog from the
worker), every read marks the guest pages it filled, after the data landed; the
test costs one attribute load per read when logging is off.

Checks, in order: FUSE (not supported -> INVALID_FIELD), NSID (INVALID_NAMESPACE),
MDTS for data-moving commands (INVALID_FIELD), SLBA+NLB on Python ints
(LBA_OUT_OF_RANGE), write to read-only namespace (NAMESPACE_WRITE_PROTECTED), then
the data pointer (PRP/SGL statuses).
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import CommandError
from ..memory import DmaFault, GuestMemory, NeedsMessageDma, WriteRecorder
from ..namespace import Namespace
from ..prp import list_is_contiguous, map_dptr
from ..status import Status
from .aio import OP_DISCARD, OP_FLUSH, OP_WRITE_ZEROES, AioCommand, Submit, park_compare, park_ranges, park_rw
from .opcodes import NAMESPACE_WRITE_PROTECTED, IoOpcode

BROADCAST_NSID = 0xFFFFFFFF
DSM_ATTR_DEALLOCATE = 1 << 2
WZ_DEAC = 1 << 25

Result = tuple[int, int]
_OK: Result = (0, 0)
_EMPTY = memoryview(b"")


class IoExecutor:
    def __init__(self, namespaces: dict[int, Namespace], mem: GuestMemory, mdts_bytes: int,
                 page_size: int = 4096) -> None:
        self.namespaces = namespaces   # shared reference: attach/detach is seen at once
        self.mem = mem
        self.mdts_bytes = mdts_bytes   # 0 = no limit
        self.page_size = page_size
        table: list[Callable[[memoryview], Result | None] | None] = [None] * 256
        table[IoOpcode.FLUSH] = self._flush
        table[IoOpcode.WRITE] = self._write
        table[IoOpcode.READ] = self._read
        table[IoOpcode.COMPARE] = self._compare
        table[IoOpcode.WRITE_ZEROES] = self._write_zeroes
        table[IoOpcode.DATASET_MANAGEMENT] = self._dsm
        self._table = table
        self._one: list[memoryview] = [_EMPTY]   # reused one-element iovec list (no per-I/O list)
        # Successful Reads, Writes, bytes read, bytes written: counted here, where the
        # numbers are at hand, so callers need no per-command wrapper for statistics.
        self.io: list[int] = [0, 0, 0, 0]
        # Namespaces served asynchronously (nvme.io.aio): nsid -> submitter.  Empty for
        # the front-end's slow path and for ram/null, so the fast path pays one falsy test.
        self.aio_ns: dict[int, Submit] = {}
        # Of those, the ones the native data path submits to an io_uring ring itself
        # (nsid -> nvme.native.uring.NativeRing; workers/aio.py): SQEs Python still gets
        # for them (Compare, Write Zeroes, ...) go the aio_ns way.
        self.native_rings: dict[int, Any] = {}
        self._sqid = 0
        self.dirty: Any = None                   # mark(addr, length) while logging

    def set_memory(self, mem: GuestMemory) -> None:
        self.mem = mem

    # -- entry ------------------------------------------------------------------
    def execute(self, sqe: memoryview, sqid: int = 0) -> Result | None:
        """(status, dw0), or None: parked on an asynchronous backend (nvme.io.aio)."""
        self._sqid = sqid
        d = sqe if sqe.format == "I" else sqe.cast("I")
        dw0 = d[0]
        opc = dw0 & 0xFF
        # Fast path: Read/Write with PRPs, no fuse, data in one contiguous run.  Same
        # checks in the same order as the general path (see the module docstring);
        # anything unusual falls through to it.
        if (opc == 2 or opc == 1) and not dw0 & 0xC300:
            ns = self.namespaces.get(d[1])
            if ns is None:
                return (Status.INVALID_NAMESPACE, 0)
            slba = d[10] | (d[11] << 32)
            nlb = (d[12] & 0xFFFF) + 1
            length = nlb << ns.lba_shift
            mdts = self.mdts_bytes
            if mdts and length > mdts:
                return (Status.INVALID_FIELD, 0)
            if slba + nlb > ns.blocks:
                return (Status.LBA_OUT_OF_RANGE, 0)
            read = opc == 2
            if not read and ns.read_only:
                return (NAMESPACE_WRITE_PROTECTED, 0)
            prp1 = d[6] | (d[7] << 32)
            page = self.page_size
            first = page - (prp1 & (page - 1))
            rest = length - first
            if prp1 & 3:
                pass                     # general path reports the bad offset
            elif (rest <= 0
                  or (rest <= page and d[8] | (d[9] << 32) == prp1 + first)
                  or (rest > page and list_is_contiguous(self.mem, d[8] | (d[9] << 32), prp1 + first,
                                                         (rest + page - 1) // page, page))):
                # One page, two physically contiguous pages, or a PRP list of
                # contiguous pages (one buffer, the common case for large I/O): one
                # view, one copy.  prp1 + first is page aligned, so the PRP2 == test
                # also checks PRP2's offset.  Anything else: the general path.
                try:
                    view = self.mem.view(prp1, length, read)
                except NeedsMessageDma:
                    raise
                except DmaFault:
                    # Not one mapping (e.g. the run straddles two DMA regions)
                    # or not mapped: the general path splits or reports it.
                    return self._general(d, opc, dw0)
                if self.aio_ns:
                    sub = self.aio_ns.get(d[1])
                    if sub is not None:
                        dirty = self.dirty if read else None   # marked when the data landed
                        return park_rw(sub, sqid, dw0 >> 16, opc, slba << ns.lba_shift, length, [view],
                                       bool(d[12] & (1 << 30)), dirty, [(prp1, length)])
                one = self._one
                one[0] = view
                try:
                    if read:
                        ns.backend.read_into(slba << ns.lba_shift, one)
                    else:
                        ns.backend.write_from(slba << ns.lba_shift, one)
                        if d[12] & (1 << 30):
                            ns.backend.flush()
                except OSError:
                    return (Status.UNRECOVERED_READ_ERROR if read else Status.WRITE_FAULT, 0)
                finally:
                    one[0] = _EMPTY      # drop the view: the mapping may go away later
                io = self.io
                if read:
                    if self.dirty is not None:
                        self.dirty.mark(prp1, length)   # after the data landed
                    io[0] += 1
                    io[2] += length
                else:
                    io[1] += 1
                    io[3] += length
                return _OK
        return self._general(d, opc, dw0)

    def _general(self, d: memoryview, opc: int, dw0: int) -> Result | None:
        handler = self._table[opc]
        if handler is None:
            return (Status.INVALID_OPCODE, 0)
        if dw0 & 0x300:
            return (Status.INVALID_FIELD, 0)
        try:
            return handler(d)
        except CommandError as e:
            return (e.status, 0)
        except NeedsMessageDma:
            raise
        except DmaFault:
            return (Status.DATA_TRANSFER_ERROR, 0)
        except OSError:
            if opc == IoOpcode.READ or opc == IoOpcode.COMPARE:
                return (Status.UNRECOVERED_READ_ERROR, 0)
            return (Status.WRITE_FAULT, 0)

    # -- helpers ----------------------------------------------------------------
    def _async(self, ns: Namespace) -> Submit | None:
        return self.aio_ns.get(ns.nsid) if self.aio_ns else None

    def _ns(self, nsid: int) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid}")
        return ns

    def _rw_range(self, d: memoryview, ns: Namespace, mdts: bool) -> tuple[int, int]:
        slba = d[10] | (d[11] << 32)
        nlb = (d[12] & 0xFFFF) + 1
        length = nlb << ns.lba_shift
        if mdts and self.mdts_bytes and length > self.mdts_bytes:
            raise CommandError(Status.INVALID_FIELD, "transfer exceeds MDTS")
        if slba + nlb > ns.blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE)
        return slba << ns.lba_shift, length

    # -- commands ---------------------------------------------------------------
    def _read(self, d: memoryview) -> Result | None:
        ns = self._ns(d[1])
        off, length = self._rw_range(d, ns, True)
        rec = WriteRecorder(self.mem) if self.dirty is not None else None
        views = map_dptr(rec or self.mem, d, length, True, self.page_size)
        sub = self._async(ns)
        if sub is not None:
            return park_rw(sub, self._sqid, d[0] >> 16, IoOpcode.READ, off, length, views, False,
                           self.dirty, rec.writes if rec is not None else None)
        ns.backend.read_into(off, views)
        if rec is not None:
            for addr, n in rec.writes:                  # after the data landed
                self.dirty.mark(addr, n)
        io = self.io
        io[0] += 1
        io[2] += length
        return _OK

    def _write(self, d: memoryview) -> Result | None:
        ns = self._ns(d[1])
        off, length = self._rw_range(d, ns, True)
        if ns.read_only:
            return (NAMESPACE_WRITE_PROTECTED, 0)
        views = map_dptr(self.mem, d, length, False, self.page_size)
        sub = self._async(ns)
        if sub is not None:
            return park_rw(sub, self._sqid, d[0] >> 16, IoOpcode.WRITE, off, length, views,
                           bool(d[12] & (1 << 30)))
        ns.backend.write_from(off, views)
        if d[12] & (1 << 30):          # FUA: make this write durable before completing
            ns.backend.flush()
        io = self.io
        io[1] += 1
        io[3] += length
        return _OK

    def _compare(self, d: memoryview) -> Result | None:
        ns = self._ns(d[1])
        off, length = self._rw_range(d, ns, True)
        views = map_dptr(self.mem, d, length, False, self.page_size)
        sub = self._async(ns)
        if sub is not None:
            return park_compare(sub, self._sqid, d[0] >> 16, off, length, views)
        stored = bytearray(length)
        ns.backend.read_into(off, [memoryview(stored)])
        pos = 0
        for v in views:
            n = len(v)
            if stored[pos:pos + n] != v:
                return (Status.COMPARE_FAILURE, 0)
            pos += n
        return _OK

    def _write_zeroes(self, d: memoryview) -> Result | None:
        ns = self._ns(d[1])
        off, length = self._rw_range(d, ns, False)   # Write Zeroes moves no data: no MDTS
        if ns.read_only:
            return (NAMESPACE_WRITE_PROTECTED, 0)
        sub = self._async(ns)
        if sub is not None:
            return park_ranges(sub, self._sqid, d[0] >> 16, IoOpcode.WRITE_ZEROES,
                               OP_DISCARD if d[12] & WZ_DEAC else OP_WRITE_ZEROES, [(off, length)])
        if d[12] & WZ_DEAC:
            ns.backend.discard(off, length)          # every backend reads discarded blocks as zero
        else:
            ns.backend.write_zeroes(off, length)
        return _OK

    def _flush(self, d: memoryview) -> Result | None:
        nsid = d[1]
        if nsid == BROADCAST_NSID:
            seen: set[int] = set()
            subs: list[Submit] = []
            for ns in self.namespaces.values():
                if id(ns.backend) not in seen:
                    seen.add(id(ns.backend))
                    sub = self._async(ns)
                    if sub is not None:
                        subs.append(sub)
                    else:
                        ns.backend.flush()
            if not subs:
                return _OK
            cmd = AioCommand(self._sqid, d[0] >> 16, IoOpcode.FLUSH)
            cmd.pending = len(subs)
            for sub in subs:
                sub(cmd, OP_FLUSH, 0, 0, (), False)
            return None
        ns = self._ns(nsid)
        sub = self._async(ns)
        if sub is not None:
            return park_ranges(sub, self._sqid, d[0] >> 16, IoOpcode.FLUSH, OP_FLUSH, [(0, 0)])
        ns.backend.flush()
        return _OK

    def _dsm(self, d: memoryview) -> Result | None:
        ns = self._ns(d[1])
        nr = (d[10] & 0xFF) + 1                       # up to 256 ranges
        if not d[11] & DSM_ATTR_DEALLOCATE:
            return _OK                                # IDR/IDW are hints only
        if ns.read_only:
            return (NAMESPACE_WRITE_PROTECTED, 0)
        views = map_dptr(self.mem, d, nr * 16, False, self.page_size)   # read-only views
        raw = b"".join(views) if len(views) > 1 else bytes(views[0])
        words = memoryview(raw).cast("I")
        ranges: list[tuple[int, int]] = []
        for i in range(nr):
            nlb = words[4 * i + 1]
            slba = words[4 * i + 2] | (words[4 * i + 3] << 32)
            if nlb == 0:
                continue
            ranges.append(ns.byte_range(slba, nlb))   # LBA_OUT_OF_RANGE before touching data
        sub = self._async(ns)
        if sub is not None and ranges:
            return park_ranges(sub, self._sqid, d[0] >> 16, IoOpcode.DATASET_MANAGEMENT, OP_DISCARD, ranges)
        for off, length in ranges:
            ns.backend.discard(off, length)
        return _OK
