"""I/O commands on asynchronous namespaces: park now, complete when the backend answers.

Theory of operation
-------------------
`IoExecutor` validates a command exactly as for a synchronous backend (NSID, MDTS,
LBA range, write protection, data pointer).  If the namespace has a submitter in
`executor.aio_ns` (a worker put it there for a namespace whose backend has an
asynchronous engine, see workers/aio.py), the executor hands the backend request(s)
to it with an `AioCommand` as owner and returns None: the QueueRunner parks the
command (its CQ slot stays reserved, it counts as in flight for quiesce, SEAMS S2).
When every backend request of the command has come back, whoever reaps them calls
`finish()` for the status and `QueueRunner.complete(sqid, cid, status, 0)`.

Statuses from backend errnos: 0 -> success; a lost path to the storage (RETRYABLE:
connection refused/reset/not connected, timeouts) -> Namespace Not Ready with DNR
clear (`RETRY` flag), so the host retries; EROFS -> Namespace is Write Protected;
ENOSPC -> Capacity Exceeded; anything else -> Unrecovered Read Error for reads and
compares, Write Fault otherwise.  The first error of a multi-request command wins.

This module is pure: the operation numbers mirror backends.aio.Op (checked by the
worker at import) so nvme/ stays free of project imports.
"""
from __future__ import annotations

import errno
from typing import Any, Callable, Sequence

from ..status import RETRY, Status
from .opcodes import NAMESPACE_WRITE_PROTECTED, IoOpcode

OP_READ, OP_WRITE, OP_FLUSH, OP_WRITE_ZEROES, OP_DISCARD = 0, 1, 2, 3, 4

RETRYABLE_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                              errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                              errno.ECONNABORTED, errno.EAGAIN, errno.ECANCELED})

# submit(cmd, op, offset, length, bufs, fua) -> None: start one backend request for cmd.
Submit = Callable[["AioCommand", int, int, int, Sequence[memoryview], bool], None]


def status_for(opc: int, err: int) -> int:
    if not err:
        return Status.SUCCESS
    if err in RETRYABLE_ERRNOS:
        return Status.NAMESPACE_NOT_READY | RETRY
    if err == errno.EROFS:
        return NAMESPACE_WRITE_PROTECTED
    if err == errno.ENOSPC:
        return Status.CAPACITY_EXCEEDED
    if opc == IoOpcode.READ or opc == IoOpcode.COMPARE:
        return Status.UNRECOVERED_READ_ERROR
    return Status.WRITE_FAULT


class AioCommand:
    """One parked NVMe command and the backend requests it still waits for."""
    __slots__ = ("sqid", "cid", "opc", "pending", "status", "length", "compare", "bounce",
                 "dirty", "marks")

    def __init__(self, sqid: int, cid: int, opc: int, length: int = 0) -> None:
        self.sqid = sqid
        self.cid = cid
        self.opc = opc
        self.pending = 0
        self.status = 0
        self.length = length          # bytes moved (statistics)
        self.compare: Sequence[memoryview] | None = None   # Compare: the host's data
        self.bounce: bytearray | None = None                # Compare: what the backend holds
        self.dirty: Any = None        # a read while dirty logging: mark(addr, n) when done
        self.marks: Sequence[tuple[int, int]] | None = None  # the guest ranges it fills

    def part_done(self, err: int) -> bool:
        """One backend request of this command finished; True when the command is complete."""
        if err and not self.status:
            self.status = status_for(self.opc, err)
        self.pending -= 1
        return self.pending <= 0

    def finish(self) -> int:
        """The command's status (call once part_done returned True).

        A read under dirty logging marks the guest pages it filled here: the data has
        landed, the completion is not posted yet (migration.dirty).
        """
        if self.dirty is not None and self.marks:
            for addr, n in self.marks:
                self.dirty.mark(addr, n)
            self.dirty = self.marks = None
        if not self.status and self.compare is not None and self.bounce is not None:
            pos = 0
            stored = self.bounce
            for v in self.compare:
                n = len(v)
                if stored[pos:pos + n] != v:
                    self.status = Status.COMPARE_FAILURE
                    break
                pos += n
        self.compare = self.bounce = None
        return self.status


def park_rw(submit: Submit, sqid: int, cid: int, opc: int, offset: int, length: int,
            bufs: Sequence[memoryview], fua: bool, dirty: Any = None,
            marks: Sequence[tuple[int, int]] | None = None) -> tuple[int, int] | None:
    """Read or Write on an asynchronous namespace: one request, parked.

    `dirty`/`marks`: a read while dirty logging is on marks `marks` when it finishes.
    """
    cmd = AioCommand(sqid, cid, opc, length)
    cmd.pending = 1
    if dirty is not None and opc == IoOpcode.READ:
        cmd.dirty, cmd.marks = dirty, marks
    submit(cmd, OP_READ if opc == IoOpcode.READ else OP_WRITE, offset, length, bufs, fua)
    return None


def park_compare(submit: Submit, sqid: int, cid: int, offset: int, length: int,
                 host: Sequence[memoryview]) -> tuple[int, int] | None:
    cmd = AioCommand(sqid, cid, IoOpcode.COMPARE)
    cmd.pending = 1
    cmd.compare = host
    cmd.bounce = bytearray(length)
    submit(cmd, OP_READ, offset, length, [memoryview(cmd.bounce)], False)
    return None


def park_ranges(submit: Submit, sqid: int, cid: int, opc: int, op: int,
                ranges: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Write Zeroes / Deallocate / Flush: one request per range ((0, 0) for a flush)."""
    cmd = AioCommand(sqid, cid, opc)
    cmd.pending = len(ranges)
    for off, length in ranges:
        submit(cmd, op, off, length, (), False)
    return None
