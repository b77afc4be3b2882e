"""Asynchronous Event Requests: outstanding AER commands, queued events, masks.

Theory of operation (NVMe Base 1.4 5.2): the host parks up to AERL+1 AER commands
with the controller; each one is completed (DW0 = type | info << 8 | log << 16) when
an event occurs.  With none outstanding, events are queued and reported when the next
AER arrives.  Once an event of some type has been reported, that type is masked:
further events of the type stay queued until the host reads the associated log page
with RAE=0.  Disabling the controller aborts outstanding AERs *without* posting
completions (the admin CQ is being reset anyway).

Pure state: every method returns the (cid, dw0) completions the caller must post.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from nvme.errors import CommandError
from nvme.status import Status

MAX_QUEUED = 64  # same bound as QEMU's aer_max_queued: a misbehaving source cannot grow us


class AerType(IntEnum):
    ERROR = 0
    SMART = 1
    NOTICE = 2
    IO_COMMAND_SET = 6
    VENDOR = 7


class ErrorInfo(IntEnum):
    INVALID_DOORBELL_REGISTER = 0x00   # doorbell of a queue that does not exist
    INVALID_DOORBELL_VALUE = 0x01      # tail/head out of range for the queue
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL = 0x03
    TRANSIENT_INTERNAL = 0x04


class NoticeInfo(IntEnum):
    NS_ATTRIBUTE_CHANGED = 0x00


class LogId(IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NS = 0x04
    COMMAND_EFFECTS = 0x05


@dataclass(slots=True, frozen=True)
class AsyncEvent:
    type: int
    info: int
    log: int

    @property
    def dw0(self) -> int:
        return (self.type & 7) | ((self.info & 0xFF) << 8) | ((self.log & 0xFF) << 16)


class AerState:
    def __init__(self, limit: int) -> None:
        self.limit = limit                      # AERL + 1
        self.outstanding: deque[int] = deque()  # CIDs of parked AER commands, oldest first
        self.queued: list[AsyncEvent] = []
        self.masked: dict[int, int] = {}        # event type -> log page that unmasks it

    def submit(self, cid: int) -> list[tuple[int, int]]:
        """A new AER command; raises AER_LIMIT_EXCEEDED past the limit."""
        if len(self.outstanding) >= self.limit:
            raise CommandError(Status.AER_LIMIT_EXCEEDED, "too many outstanding AERs")
        self.outstanding.append(cid)
        return self._deliver()

    def post(self, ev: AsyncEvent) -> list[tuple[int, int]]:
        # An identical event already waiting says everything the new one would.
        if ev not in self.queued and len(self.queued) < MAX_QUEUED:
            self.queued.append(ev)
        return self._deliver()

    def log_read(self, log: int) -> list[tuple[int, int]]:
        """The host read `log` with RAE=0: unmask the event types it covers."""
        for t in [t for t, lid in self.masked.items() if lid == log]:
            del self.masked[t]
        return self._deliver()

    def _deliver(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while self.outstanding:
            ev = next((e for e in self.queued if e.type not in self.masked), None)
            if ev is None:
                break
            self.queued.remove(ev)
            self.masked[ev.type] = ev.log
            out.append((self.outstanding.popleft(), ev.dw0))
        return out

    def abort_outstanding(self) -> list[int]:
        """Forget parked AERs (controller disable / shutdown): no completions."""
        cids = list(self.outstanding)
        self.outstanding.clear()
        return cids

    def reset(self) -> None:
        self.outstanding.clear()
        self.queued.clear()
        self.masked.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"outstanding": list(self.outstanding),
                "queued": [[e.type, e.info, e.log] for e in self.queued],
                "masked": [[t, lid] for t, lid in sorted(self.masked.items())]}

    def load(self, d: dict[str, Any]) -> None:
        self.outstanding = deque(d["outstanding"])
        self.queued = [AsyncEvent(*e) for e in d["queued"]]
        self.masked = {t: lid for t, lid in d["masked"]}
