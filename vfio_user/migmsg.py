"""Codecs for the migration payloads: DEVICE_FEATURE data, DIRTY_PAGES, region-9 registers.

The DEVICE_FEATURE header (argsz, flags) and MIG_DATA_READ/WRITE are in messages.py;
this module decodes what rides inside them (reference §3.12, §5.2-5.5) and the v1
DIRTY_PAGES command (§4.6), so the server and the test client share one codec.
Decoders check structure only and raise ProtocolError(EINVAL).
"""
from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from .errors import ProtocolError


class Feature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlag(enum.IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class DirtyPagesFlag(enum.IntFlag):
    START = 1 << 0
    STOP = 1 << 1
    GET_BITMAP = 1 << 2


def _need(data: bytes | memoryview, n: int, what: str) -> None:
    if len(data) < n:
        raise ProtocolError(errno.EINVAL, f"{what}: {len(data)} bytes, need {n}")


# ----------------------------------------------------------- feature data

_U64 = struct.Struct("<Q")
_MIG_STATE = struct.Struct("<Ii")


def encode_migration_flags(flags: int) -> bytes:
    return _U64.pack(flags)


def decode_migration_flags(data: bytes) -> int:
    _need(data, 8, "MIGRATION feature")
    return _U64.unpack_from(data, 0)[0]


@dataclass(frozen=True, slots=True)
class MigDeviceState:
    """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data: device_state u32, data_fd s32 (-1, unused)."""

    device_state: int
    data_fd: int = -1

    SIZE = _MIG_STATE.size   # 8

    def encode(self) -> bytes:
        return _MIG_STATE.pack(self.device_state, self.data_fd)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "MigDeviceState":
        _need(data, cls.SIZE, "MIG_DEVICE_STATE")
        return cls(*_MIG_STATE.unpack_from(data, 0))


_LOG_START = struct.Struct("<QII")
_RANGE = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class DmaLoggingStart:
    """DMA_LOGGING_START data: page_size u64, num_ranges u32, reserved, ranges inline."""

    page_size: int
    ranges: tuple[tuple[int, int], ...] = ()

    def encode(self) -> bytes:
        return _LOG_START.pack(self.page_size, len(self.ranges), 0) + b"".join(
            _RANGE.pack(a, n) for a, n in self.ranges)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "DmaLoggingStart":
        _need(data, _LOG_START.size, "DMA_LOGGING_START")
        page_size, n, _ = _LOG_START.unpack_from(data, 0)
        _need(data, _LOG_START.size + n * _RANGE.size, "DMA_LOGGING_START ranges")
        ranges = tuple(_RANGE.unpack_from(data, _LOG_START.size + i * _RANGE.size) for i in range(n))
        return cls(page_size, ranges)

    def with_page_size(self, page_size: int) -> bytes:
        """The same data with the page size the server picked (the SET reply echoes it)."""
        return DmaLoggingStart(page_size, self.ranges).encode()


_REPORT = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class DmaLoggingReport:
    """DMA_LOGGING_REPORT: iova, length, page_size; the GET reply appends the bitmap."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""

    SIZE = _REPORT.size   # 24

    def encode(self) -> bytes:
        return _REPORT.pack(self.iova, self.length, self.page_size) + self.bitmap

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "DmaLoggingReport":
        _need(data, cls.SIZE, "DMA_LOGGING_REPORT")
        iova, length, page_size = _REPORT.unpack_from(data, 0)
        return cls(iova, length, page_size, bytes(data[cls.SIZE:]))


# ----------------------------------------------------------- DIRTY_PAGES (14, v1)

_DP = struct.Struct("<II")
_BMRANGE = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class DirtyPages:
    """VFIO_USER_DIRTY_PAGES: argsz, flags; GET_BITMAP adds {iova, size, pgsize, bitmap size}
    and its reply appends the bitmap after that 32-byte range struct."""

    argsz: int
    flags: int
    iova: int = 0
    size: int = 0
    pgsize: int = 0
    bitmap_size: int = 0
    bitmap: bytes = b""

    SIZE = _DP.size             # 8
    RANGE_SIZE = _BMRANGE.size  # 32

    def encode(self, with_range: bool | None = None) -> bytes:
        rng = self.flags & DirtyPagesFlag.GET_BITMAP if with_range is None else with_range
        out = _DP.pack(self.argsz, self.flags)
        if rng:
            out += _BMRANGE.pack(self.iova, self.size, self.pgsize, self.bitmap_size) + self.bitmap
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "DirtyPages":
        _need(data, cls.SIZE, "DIRTY_PAGES")
        argsz, flags = _DP.unpack_from(data, 0)
        if argsz < cls.SIZE:
            raise ProtocolError(errno.EINVAL, f"DIRTY_PAGES: argsz {argsz} < {cls.SIZE}")
        if flags & DirtyPagesFlag.GET_BITMAP:
            _need(data, cls.SIZE + cls.RANGE_SIZE, "DIRTY_PAGES GET_BITMAP range")
            iova, size, pgsize, bms = _BMRANGE.unpack_from(data, cls.SIZE)
            return cls(argsz, flags, iova, size, pgsize, bms,
                       bytes(data[cls.SIZE + cls.RANGE_SIZE:]))
        return cls(argsz, flags)

    @classmethod
    def decode_reply(cls, data: bytes | memoryview) -> "DirtyPages":
        """A GET_BITMAP reply may be the 8-byte header alone (argsz = the size it needs)."""
        if len(data) == cls.SIZE:
            return cls(*_DP.unpack_from(data, 0))
        return cls.decode(data)


# ----------------------------------------------------------- region 9 (v1)

MIG_REGION_TYPE = 3          # VFIO_REGION_TYPE_MIGRATION
MIG_REGION_SUBTYPE = 1       # VFIO_REGION_SUBTYPE_MIGRATION

# struct vfio_device_migration_info: offset -> (name, size)
REG_DEVICE_STATE = 0
REG_RESERVED = 4
REG_PENDING_BYTES = 8
REG_DATA_OFFSET = 16
REG_DATA_SIZE = 24
MIG_INFO_SIZE = 32
MIG_REGISTERS = {REG_DEVICE_STATE: 4, REG_PENDING_BYTES: 8, REG_DATA_OFFSET: 8, REG_DATA_SIZE: 8}
