"""Get Features (0Ah) / Set Features (09h), NVMe Base 1.4 section 5.21.

Supported features and their capabilities (SEL=011b answer) live in one table,
`FEATURE_CAPS`; anything not in it is INVALID_FIELD.  Nothing is saveable, so SV=1
is FEATURE_NOT_SAVEABLE and SEL=010b (saved) reports the default.  Values reset to
their defaults on controller reset (none is persistent across reset).  Number of
Queues is granted once per reset: later Sets report the same allocation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from nvme.errors import CommandError
from nvme.state import plain
from nvme.status import Status

from .command import AdminCmd, from_host, to_host

if TYPE_CHECKING:
    from nvme.controller import Controller


class Fid(IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B
    TIMESTAMP = 0x0E


class Sel(IntEnum):
    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED = 3


CAP_SAVEABLE, CAP_NS_SPECIFIC, CAP_CHANGEABLE = 1, 2, 4
FEATURE_CAPS: dict[int, int] = {fid: CAP_CHANGEABLE for fid in Fid}
FEATURE_CAPS[Fid.ERROR_RECOVERY] |= CAP_NS_SPECIFIC

AEC_SUPPORTED = 0x1FF     # SMART critical warnings [7:0], NS attribute notices [8]
AEC_NS_ATTRIBUTE = 1 << 8
WCTEMP = 0x157


@dataclass(slots=True)
class FeatureState:
    arbitration: int = 0
    power_management: int = 0
    temp_over: int = WCTEMP
    temp_under: int = 0
    error_recovery: int = 0
    volatile_write_cache: int = 1
    interrupt_coalescing: int = 0
    coalescing_exempt: list[int] = field(default_factory=list)  # vectors with CD=1
    write_atomicity: int = 0
    async_event_config: int = 0
    timestamp_ms: int = 0            # host value at `timestamp_at`
    timestamp_at: float = 0.0        # controller clock when set (or at reset)
    timestamp_origin: int = 0        # 0: counted from reset, 1: set by Set Features

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureState":
        return cls(**d)


def _timestamp(c: "Controller", fs: FeatureState) -> bytes:
    now_ms = fs.timestamp_ms + int((c.clock() - fs.timestamp_at) * 1000)
    attrs = (fs.timestamp_origin & 7) << 1
    return (now_ms & 0xFFFFFFFFFFFF).to_bytes(6, "little") + bytes([attrs, 0])


def _value(c: "Controller", fs: FeatureState, fid: int, cmd: AdminCmd, current: bool) -> int:
    match fid:
        case Fid.ARBITRATION: return fs.arbitration
        case Fid.POWER_MANAGEMENT: return fs.power_management
        case Fid.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = (cmd.cdw11 >> 16) & 0xF, (cmd.cdw11 >> 20) & 3
            if tmpsel != 0 or thsel > 1:
                raise CommandError(Status.INVALID_FIELD, "temperature sensor/threshold")
            return (fs.temp_under if thsel else fs.temp_over) | (thsel << 20)
        case Fid.ERROR_RECOVERY: return fs.error_recovery
        case Fid.VOLATILE_WRITE_CACHE: return fs.volatile_write_cache
        case Fid.NUMBER_OF_QUEUES:
            alloc = c.queues.allocated if current else None
            nsq, ncq = alloc or (c.cfg.max_io_queues, c.cfg.max_io_queues)
            return (nsq - 1) | ((ncq - 1) << 16)
        case Fid.INTERRUPT_COALESCING: return fs.interrupt_coalescing
        case Fid.INTERRUPT_VECTOR_CONFIG:
            iv = cmd.cdw11 & 0xFFFF
            if iv >= c.cfg.msix_vectors:
                raise CommandError(Status.INVALID_FIELD, f"vector {iv}")
            return iv | ((iv in fs.coalescing_exempt) << 16)
        case Fid.WRITE_ATOMICITY: return fs.write_atomicity
        case Fid.ASYNC_EVENT_CONFIG: return fs.async_event_config
        case Fid.TIMESTAMP: return 0
    raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}")


def handle_get_features(c: "Controller", cmd: AdminCmd) -> int:
    fid, sel = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 7
    if fid not in FEATURE_CAPS:
        raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}")
    if sel == Sel.SUPPORTED:
        return FEATURE_CAPS[fid]
    if sel > Sel.SUPPORTED:
        raise CommandError(Status.INVALID_FIELD, f"SEL {sel}")
    current = sel == Sel.CURRENT
    fs = c.features if current else FeatureState(timestamp_at=c.clock())
    value = _value(c, fs, fid, cmd, current)
    if fid == Fid.TIMESTAMP:
        to_host(c.mem, cmd, _timestamp(c, fs) if current else bytes(8))
    return value


def handle_set_features(c: "Controller", cmd: AdminCmd) -> int:
    fid, save = cmd.cdw10 & 0xFF, bool(cmd.cdw10 >> 31)
    if fid not in FEATURE_CAPS:
        raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}")
    if save:
        raise CommandError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
    if not FEATURE_CAPS[fid] & CAP_NS_SPECIFIC and cmd.nsid not in (0, 0xFFFFFFFF):
        raise CommandError(Status.FEATURE_NOT_NS_SPECIFIC, f"feature {fid:#x}")
    fs, v = c.features, cmd.cdw11
    match fid:
        case Fid.ARBITRATION:
            fs.arbitration = v & 0xFFFFFF07
        case Fid.POWER_MANAGEMENT:
            if v & 0x1F:                 # NPSS = 0: only power state 0 exists
                raise CommandError(Status.INVALID_FIELD, "power state")
            fs.power_management = v & 0xFF
        case Fid.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = (v >> 16) & 0xF, (v >> 20) & 3
            if tmpsel not in (0, 0xF) or thsel > 1:
                raise CommandError(Status.INVALID_FIELD, "temperature sensor/threshold")
            if thsel:
                fs.temp_under = v & 0xFFFF
            else:
                fs.temp_over = v & 0xFFFF
        case Fid.ERROR_RECOVERY:
            if v & (1 << 16):            # DULBE needs deallocated-block errors (NSFEAT bit 2)
                raise CommandError(Status.INVALID_FIELD, "DULBE unsupported")
            fs.error_recovery = v & 0xFFFF
        case Fid.VOLATILE_WRITE_CACHE:
            fs.volatile_write_cache = v & 1
        case Fid.NUMBER_OF_QUEUES:
            return _set_number_of_queues(c, v)
        case Fid.INTERRUPT_COALESCING:
            fs.interrupt_coalescing = v & 0xFFFF
            _coalescing_changed(c)
        case Fid.INTERRUPT_VECTOR_CONFIG:
            iv = v & 0xFFFF
            if iv >= c.cfg.msix_vectors:
                raise CommandError(Status.INVALID_FIELD, f"vector {iv}")
            exempt = set(fs.coalescing_exempt)
            (exempt.add if v & (1 << 16) else exempt.discard)(iv)
            fs.coalescing_exempt = sorted(exempt)
            _coalescing_changed(c)
        case Fid.WRITE_ATOMICITY:
            fs.write_atomicity = v & 1
        case Fid.ASYNC_EVENT_CONFIG:
            fs.async_event_config = v & AEC_SUPPORTED
        case Fid.TIMESTAMP:
            raw = from_host(c.mem, cmd, 8)
            fs.timestamp_ms = int.from_bytes(raw[:6], "little")
            fs.timestamp_at = c.clock()
            fs.timestamp_origin = 1
    return 0


def _set_number_of_queues(c: "Controller", v: int) -> int:
    nsqr, ncqr = v & 0xFFFF, v >> 16
    if nsqr == 0xFFFF or ncqr == 0xFFFF:
        raise CommandError(Status.INVALID_FIELD, "65536 queues requested")
    if c.queues.allocated is None:
        if c.queues.sqs or c.queues.cqs:
            raise CommandError(Status.COMMAND_SEQUENCE_ERROR, "I/O queues already exist")
        m = c.cfg.max_io_queues
        c.queues.allocated = (min(nsqr + 1, m), min(ncqr + 1, m))
    nsq, ncq = c.queues.allocated
    return (nsq - 1) | ((ncq - 1) << 16)


def _coalescing_changed(c: "Controller") -> None:
    fs = c.features
    c.hooks.coalescing_changed(fs.interrupt_coalescing & 0xFF,
                               (fs.interrupt_coalescing >> 8) & 0xFF, set(fs.coalescing_exempt))
