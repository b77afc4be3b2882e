"""Get Log Page (admin 02h) and the state behind the pages.

Pages: 01h Error Information (a ring of the newest ELPE+1 entries, newest first),
02h SMART / Health (controller-wide; counters fed by `IoStats`), 03h Firmware Slot,
04h Changed Namespace List, 05h Commands Supported and Effects.

Length is (NUMDU:NUMDL)+1 dwords at byte offset LPOU:LPOL (dword aligned).  Reading
a page with RAE=0 ends the "retain asynchronous event" condition: the AER type the
page belongs to is unmasked, and the Changed NS list is cleared.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nvme.errors import CommandError
from nvme.state import plain
from nvme.status import Status, status_field

from .aer import LogId
from .caps import effects_log
from .command import AdminCmd, to_host

if TYPE_CHECKING:
    from nvme.controller import Controller

ERROR_ENTRY_SIZE = 64
CHANGED_NS_MAX = 1024


@dataclass(slots=True)
class ErrorEntry:
    count: int
    sqid: int
    cid: int
    status: int          # (SCT << 8) | SC, 0 for errors not tied to a command
    pel: int = 0xFFFF    # parameter error location, FFFFh: not specific
    lba: int = 0
    nsid: int = 0

    def pack(self) -> bytes:
        b = bytearray(ERROR_ENTRY_SIZE)
        struct.pack_into("<QHHHHQI", b, 0, self.count, self.sqid, self.cid,
                         status_field(self.status) if self.status else 0, self.pel,
                         self.lba, self.nsid)
        return bytes(b)


class ErrorLog:
    """The newest `capacity` error entries; Error Count never repeats (64-bit)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.entries: list[ErrorEntry] = []   # oldest first

    def add(self, sqid: int, cid: int, status: int, pel: int = 0xFFFF, lba: int = 0,
            nsid: int = 0) -> ErrorEntry:
        self.count += 1
        e = ErrorEntry(self.count, sqid & 0xFFFF, cid & 0xFFFF, status, pel, lba, nsid)
        self.entries.append(e)
        if len(self.entries) > self.capacity:
            del self.entries[0]
        return e

    def page(self) -> bytes:
        data = b"".join(e.pack() for e in reversed(self.entries))
        return data.ljust(self.capacity * ERROR_ENTRY_SIZE, b"\0")

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "entries": [plain(e) for e in self.entries]}

    def load(self, d: dict[str, Any]) -> None:
        self.count = d["count"]
        self.entries = [ErrorEntry(**e) for e in d["entries"]]


@dataclass(slots=True)
class IoStats:
    """Counters behind SMART; the front-end adds what workers report."""
    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0
    media_errors: int = 0
    power_cycles: int = 1
    unsafe_shutdowns: int = 0

    def to_dict(self) -> dict[str, int]:
        return plain(self)


@dataclass(slots=True)
class ChangedNsList:
    nsids: list[int] = field(default_factory=list)
    overflow: bool = False

    def add(self, nsids: list[int]) -> None:
        for n in nsids:
            if n not in self.nsids:
                self.nsids.append(n)
        if len(self.nsids) > CHANGED_NS_MAX:
            self.overflow = True

    def page(self) -> bytes:
        ids = [0xFFFFFFFF] if self.overflow else sorted(self.nsids)
        return struct.pack(f"<{len(ids)}I", *ids).ljust(CHANGED_NS_MAX * 4, b"\0")

    def clear(self) -> None:
        self.nsids.clear()
        self.overflow = False


def _u128(b: bytearray, off: int, value: int) -> None:
    b[off:off + 16] = min(value, (1 << 128) - 1).to_bytes(16, "little")


def smart_page(c: "Controller") -> bytes:
    s = c.io_totals()
    b = bytearray(512)
    b[0] = 0                                    # critical warning: none
    struct.pack_into("<H", b, 1, 313)           # composite temperature 40 C (Kelvin)
    b[3] = 100                                  # available spare
    b[4] = 10                                   # available spare threshold
    b[5] = 0                                    # percentage used
    # Data units are thousands of 512-byte units, rounded up (1.4 figure 196).
    _u128(b, 32, -(-s.bytes_read // 512_000))
    _u128(b, 48, -(-s.bytes_written // 512_000))
    _u128(b, 64, s.read_commands)
    _u128(b, 80, s.write_commands)
    _u128(b, 112, s.power_cycles)
    _u128(b, 128, int(c.uptime() // 3600))
    _u128(b, 144, s.unsafe_shutdowns)
    _u128(b, 160, s.media_errors)
    _u128(b, 176, c.errlog.count)
    return bytes(b)


def firmware_slot_page(c: "Controller") -> bytes:
    b = bytearray(512)
    b[0] = 0x01                                 # AFI: slot 1 active
    b[8:16] = c.cfg.firmware_field.encode()
    return bytes(b)


def build_page(c: "Controller", lid: int, nsid: int) -> bytes:
    match lid:
        case LogId.ERROR:
            return c.errlog.page()
        case LogId.SMART:
            # LPA bit 0 clear: SMART is controller-wide only.
            if nsid not in (0, 0xFFFFFFFF):
                raise CommandError(Status.INVALID_FIELD, "per-namespace SMART unsupported")
            return smart_page(c)
        case LogId.FIRMWARE_SLOT:
            return firmware_slot_page(c)
        case LogId.CHANGED_NS:
            return c.changed_ns.page()
        case LogId.COMMAND_EFFECTS:
            return effects_log({op: spec.effects for op, spec in c.admin_table.items()},
                               c.io_effects)
    raise CommandError(Status.INVALID_LOG_PAGE, f"log {lid:#x}")


def handle_get_log_page(c: "Controller", cmd: AdminCmd) -> int:
    lid = cmd.cdw10 & 0xFF
    rae = bool(cmd.cdw10 & (1 << 15))
    numd = (cmd.cdw10 >> 16) | ((cmd.cdw11 & 0xFFFF) << 16)
    length = (numd + 1) * 4
    offset = cmd.cdw12 | (cmd.cdw13 << 32)
    if c.cfg.max_transfer and length > c.cfg.max_transfer:
        raise CommandError(Status.INVALID_FIELD, f"log length {length} > MDTS")
    page = build_page(c, lid, cmd.nsid)
    if offset & 3 or offset > len(page):
        raise CommandError(Status.INVALID_FIELD, f"log offset {offset:#x}")
    data = page[offset:offset + length].ljust(length, b"\0")
    to_host(c.mem, cmd, data)
    if not rae:
        if lid == LogId.CHANGED_NS:
            c.changed_ns.clear()
        c.post_aer_completions(c.aer.log_read(lid))
    return 0
