"""Codec for every vfio-user message payload (the bytes after the 16-byte header).

Each message is a frozen slotted dataclass with `encode() -> bytes` and
`decode(payload) -> instance`.  The same classes serve both ends: the server
decodes requests and encodes replies, the test client does the reverse, so the
codec is exercised in both directions by every protocol test.

Decoders check *structure* only (lengths, argsz vs. the struct size, counts vs.
the payload, transfer limits) and raise `ProtocolError` with the errno the peer
should see: EINVAL for short or inconsistent payloads, E2BIG for region access
counts above the negotiated transfer size (MIG_DATA sizes above it: EINVAL, as
libvfio-user answers).  Semantic checks that need device knowledge (is this
region index valid, is this IRQ combination allowed for this index) live in the
pipeline / `irqs.py`.

Layouts follow the spec (QEMU docs/interop/vfio-user.rst); see
/work/shared/reference/vfio-user-protocol.md section 3.  DMA_READ/DMA_WRITE are in
`dmamsg.py` because QEMU's layout differs from the spec's.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from .errors import ProtocolError
from .wire import IrqSetFlag, RegionCap, RegionFlag

DEFAULT_MAX_XFER = 1 << 20


def _need(payload: bytes | memoryview, n: int, what: str) -> None:
    if len(payload) < n:
        raise ProtocolError(errno.EINVAL, f"{what}: payload {len(payload)} < {n} bytes")


def _argsz(argsz: int, n: int, what: str) -> None:
    if argsz < n:
        raise ProtocolError(errno.EINVAL, f"{what}: argsz {argsz} < {n}")


_F = TypeVar("_F", bound="_Fixed")


class _Fixed:
    """A message that is one struct, argsz first, its fields the dataclass's in order:
    encode packs them, decode checks the length and argsz against the struct."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    NAME: ClassVar[str]
    argsz: int

    def encode(self) -> bytes:
        names: tuple[str, ...] = self.__slots__    # the subclass's: its fields in order
        return self.STRUCT.pack(*[getattr(self, name) for name in names])

    @classmethod
    def decode(cls: type[_F], payload: bytes | memoryview) -> _F:
        n = cls.STRUCT.size
        _need(payload, n, cls.NAME)
        m = cls(*cls.STRUCT.unpack_from(payload, 0))
        _argsz(m.argsz, n, cls.NAME)
        return m


# --------------------------------------------------------------------- VERSION

_VERSION = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class Version:
    """VERSION payload, both directions.  `json` is the text without its NUL."""

    major: int
    minor: int
    json: str | None = None

    def encode(self) -> bytes:
        body = _VERSION.pack(self.major, self.minor)
        if self.json is not None:
            body += self.json.encode() + b"\0"
        return body

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "Version":
        _need(payload, 4, "VERSION")
        major, minor = _VERSION.unpack_from(payload, 0)
        rest = bytes(payload[4:])
        if not rest:
            return cls(major, minor, None)
        # The JSON is NUL-terminated; tolerate a missing NUL but not one in the middle
        # followed by garbage.
        text, _, tail = rest.partition(b"\0")
        if tail.strip(b"\0"):
            raise ProtocolError(errno.EINVAL, "VERSION: data after the JSON terminator")
        try:
            return cls(major, minor, text.decode("utf-8") if text else None)
        except UnicodeDecodeError as e:
            raise ProtocolError(errno.EINVAL, "VERSION: JSON is not UTF-8") from e


# ---------------------------------------------------------------- DMA_MAP/UNMAP

_DMA_MAP = struct.Struct("<IIQQQ")
_DMA_UNMAP = struct.Struct("<IIQQ")


@dataclass(frozen=True, slots=True)
class DmaMap(_Fixed):
    argsz: int
    flags: int
    offset: int
    address: int
    size: int

    SIZE = _DMA_MAP.size  # 32
    STRUCT = _DMA_MAP
    NAME = "DMA_MAP"


@dataclass(frozen=True, slots=True)
class DmaUnmap(_Fixed):
    argsz: int
    flags: int
    address: int
    size: int

    SIZE = _DMA_UNMAP.size  # 24
    STRUCT = _DMA_UNMAP
    NAME = "DMA_UNMAP"


_UNMAP_BITMAP = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class UnmapBitmap:
    """DMA_UNMAP with GET_DIRTY_BITMAP (v1 era, reference §4.6): the request appends
    {pgsize, size} after the 24-byte unmap struct; the reply appends the same descriptor
    and then `size` bytes of bitmap (bit i = page i of the unmapped region)."""

    pgsize: int
    size: int
    bitmap: bytes = b""

    SIZE = _UNMAP_BITMAP.size   # 16

    def encode(self) -> bytes:
        return _UNMAP_BITMAP.pack(self.pgsize, self.size) + self.bitmap

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "UnmapBitmap":
        """From a whole DMA_UNMAP payload (the descriptor sits after the unmap struct)."""
        _need(payload, DmaUnmap.SIZE + cls.SIZE, "DMA_UNMAP GET_DIRTY_BITMAP descriptor")
        pgsize, size = _UNMAP_BITMAP.unpack_from(payload, DmaUnmap.SIZE)
        return cls(pgsize, size, bytes(payload[DmaUnmap.SIZE + cls.SIZE:]))


# ------------------------------------------------------------- DEVICE_GET_INFO

_DEV_INFO = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class DeviceInfoMsg(_Fixed):
    """DEVICE_GET_INFO request and reply (same 16-byte struct)."""

    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    SIZE = _DEV_INFO.size  # 16
    STRUCT = _DEV_INFO
    NAME = "DEVICE_GET_INFO"


# ------------------------------------------------------ DEVICE_GET_REGION_INFO

_REGION_INFO = struct.Struct("<IIIIQQ")
_CAP_HDR = struct.Struct("<HHI")
_SPARSE_HDR = struct.Struct("<II")
_SPARSE_AREA = struct.Struct("<QQ")
_CAP_TYPE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class RegionInfoRequest:
    argsz: int
    index: int

    SIZE = _REGION_INFO.size  # 32

    def encode(self) -> bytes:
        return _REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "RegionInfoRequest":
        _need(payload, cls.SIZE, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = _REGION_INFO.unpack_from(payload, 0)
        _argsz(argsz, cls.SIZE, "DEVICE_GET_REGION_INFO")
        return cls(argsz, index)


@dataclass(frozen=True, slots=True)
class RegionInfoReply:
    """vfio_region_info plus its capability chain.

    `argsz` is the size the full reply needs; `encode(limit)` truncates to what the
    client allowed (its request argsz) and drops the CAPS flag when the chain does
    not fit, like libvfio-user, so the client retries with a bigger argsz.
    """

    argsz: int
    flags: int
    index: int
    size: int
    offset: int = 0
    sparse: tuple[tuple[int, int], ...] | None = None
    cap_type: tuple[int, int] | None = None

    def _caps(self) -> bytes:
        caps: list[tuple[int, bytes]] = []
        if self.sparse is not None:
            body = _SPARSE_HDR.pack(len(self.sparse), 0)
            body += b"".join(_SPARSE_AREA.pack(o, s) for o, s in self.sparse)
            caps.append((RegionCap.SPARSE_MMAP, body))
        if self.cap_type is not None:
            caps.append((RegionCap.TYPE, _CAP_TYPE.pack(*self.cap_type)))
        out = bytearray()
        pos = _REGION_INFO.size
        for i, (cap_id, body) in enumerate(caps):
            nxt = pos + _CAP_HDR.size + len(body) if i + 1 < len(caps) else 0
            out += _CAP_HDR.pack(cap_id, 1, nxt) + body
            pos += _CAP_HDR.size + len(body)
        return bytes(out)

    def full_size(self) -> int:
        return _REGION_INFO.size + len(self._caps())

    def encode(self, limit: int | None = None) -> bytes:
        caps = self._caps()
        need = _REGION_INFO.size + len(caps)
        fits = limit is None or limit >= need
        flags = self.flags
        if caps and fits:
            flags |= RegionFlag.CAPS
        else:
            flags &= ~int(RegionFlag.CAPS)   # int(): keep bits RegionFlag does not name
        head = _REGION_INFO.pack(need, flags, self.index,
                                 _REGION_INFO.size if caps and fits else 0,
                                 self.size, self.offset)
        return head + caps if fits else head

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "RegionInfoReply":
        _need(payload, _REGION_INFO.size, "REGION_INFO reply")
        argsz, flags, index, cap_off, size, offset = _REGION_INFO.unpack_from(payload, 0)
        sparse: tuple[tuple[int, int], ...] | None = None
        cap_type = None
        seen = 0
        while flags & RegionFlag.CAPS and cap_off:
            seen += 1
            if seen > 16 or cap_off + _CAP_HDR.size > len(payload):
                raise ProtocolError(errno.EINVAL, "REGION_INFO: bad capability chain")
            cap_id, _ver, nxt = _CAP_HDR.unpack_from(payload, cap_off)
            body = cap_off + _CAP_HDR.size
            if cap_id == RegionCap.SPARSE_MMAP:
                _need(payload, body + _SPARSE_HDR.size, "sparse cap")
                nr, _ = _SPARSE_HDR.unpack_from(payload, body)
                _need(payload, body + 8 + 16 * nr, "sparse areas")
                sparse = tuple(_SPARSE_AREA.unpack_from(payload, body + 8 + 16 * i)
                               for i in range(nr))
            elif cap_id == RegionCap.TYPE:
                _need(payload, body + 8, "type cap")
                cap_type = _CAP_TYPE.unpack_from(payload, body)
            cap_off = nxt
        return cls(argsz, flags, index, size, offset, sparse, cap_type)


# --------------------------------------------------------- DEVICE_GET_IRQ_INFO

_IRQ_INFO = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class IrqInfoMsg(_Fixed):
    """DEVICE_GET_IRQ_INFO request and reply (same 16-byte struct)."""

    argsz: int
    flags: int
    index: int
    count: int = 0

    SIZE = _IRQ_INFO.size
    STRUCT = _IRQ_INFO
    NAME = "DEVICE_GET_IRQ_INFO"


# ------------------------------------------------------------ DEVICE_SET_IRQS

_SET_IRQS = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class SetIrqs:
    """DEVICE_SET_IRQS request.  `data` holds the DATA_BOOL bytes only; eventfds
    travel as SCM_RIGHTS (QEMU sets argsz to 20 and puts no fd array inline)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    SIZE = _SET_IRQS.size  # 20

    def encode(self) -> bytes:
        return _SET_IRQS.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "SetIrqs":
        _need(payload, cls.SIZE, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload, 0)
        _argsz(argsz, cls.SIZE, "DEVICE_SET_IRQS")
        data = b""
        if flags & IrqSetFlag.DATA_BOOL:
            _need(payload, cls.SIZE + count, "DEVICE_SET_IRQS bool data")
            data = bytes(payload[cls.SIZE:cls.SIZE + count])
        return cls(argsz, flags, index, start, count, data)


# ----------------------------------------------------- REGION_READ/REGION_WRITE

_REGION_RW = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """REGION_READ/REGION_WRITE, both directions: data is present in a READ reply
    and a WRITE request, absent otherwise."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    SIZE = _REGION_RW.size  # 16

    def encode(self) -> bytes:
        return _REGION_RW.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes | memoryview, with_data: bool,
               max_xfer: int = DEFAULT_MAX_XFER) -> "RegionAccess":
        _need(payload, cls.SIZE, "REGION access")
        offset, region, count = _REGION_RW.unpack_from(payload, 0)
        if count > max_xfer:
            raise ProtocolError(errno.E2BIG, f"REGION access count {count} > {max_xfer}")
        if not with_data:
            return cls(offset, region, count)
        if len(payload) != cls.SIZE + count:
            raise ProtocolError(errno.EINVAL,
                                f"REGION data {len(payload) - cls.SIZE} != count {count}")
        return cls(offset, region, count, bytes(payload[cls.SIZE:]))


# ---------------------------------------------------------- REGION_WRITE_MULTI

_MULTI_CNT = struct.Struct("<Q")
_MULTI_ENTRY = struct.Struct("<QII8s")
MULTI_MAX = 200  # QEMU's VFIO_USER_MULTI_MAX


@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    offset: int
    region: int
    count: int
    data: bytes  # `count` bytes (<= 8)


@dataclass(frozen=True, slots=True)
class RegionWriteMulti:
    entries: tuple[WriteMultiEntry, ...]

    def encode(self) -> bytes:
        out = bytearray(_MULTI_CNT.pack(len(self.entries)))
        for e in self.entries:
            out += _MULTI_ENTRY.pack(e.offset, e.region, e.count, e.data.ljust(8, b"\0"))
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "RegionWriteMulti":
        _need(payload, 8, "REGION_WRITE_MULTI")
        (n,) = _MULTI_CNT.unpack_from(payload, 0)
        if n > MULTI_MAX:
            raise ProtocolError(errno.E2BIG, f"REGION_WRITE_MULTI wr_cnt {n} > {MULTI_MAX}")
        if len(payload) != 8 + n * _MULTI_ENTRY.size:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE_MULTI size != 8 + 24 * wr_cnt")
        entries = []
        for i in range(n):
            off, reg, cnt, data = _MULTI_ENTRY.unpack_from(payload, 8 + i * _MULTI_ENTRY.size)
            if cnt > 8:
                raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI entry count {cnt} > 8")
            entries.append(WriteMultiEntry(off, reg, cnt, data[:cnt]))
        return cls(tuple(entries))

    @staticmethod
    def encode_reply(n: int) -> bytes:
        return _MULTI_CNT.pack(n)


# -------------------------------------------------------------- DEVICE_FEATURE

_FEATURE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class DeviceFeature:
    argsz: int
    flags: int
    data: bytes = b""

    SIZE = _FEATURE.size  # 8

    def encode(self) -> bytes:
        return _FEATURE.pack(self.argsz, self.flags) + self.data

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> "DeviceFeature":
        _need(payload, cls.SIZE, "DEVICE_FEATURE")
        argsz, flags = _FEATURE.unpack_from(payload, 0)
        _argsz(argsz, cls.SIZE, "DEVICE_FEATURE")
        return cls(argsz, flags, bytes(payload[cls.SIZE:]))


# ------------------------------------------------------- MIG_DATA_READ/WRITE

_MIG = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class MigData:
    """MIG_DATA_READ request (no data) and reply, MIG_DATA_WRITE request."""

    argsz: int
    size: int
    data: bytes = b""

    SIZE = _MIG.size  # 8

    def encode(self) -> bytes:
        return _MIG.pack(self.argsz, self.size) + self.data

    @classmethod
    def decode_read(cls, payload: bytes | memoryview,
                    max_xfer: int = DEFAULT_MAX_XFER) -> "MigData":
        _need(payload, cls.SIZE, "MIG_DATA_READ")
        argsz, size = _MIG.unpack_from(payload, 0)
        if size > max_xfer:   # libvfio-user answers EINVAL here, not E2BIG
            raise ProtocolError(errno.EINVAL, f"MIG_DATA_READ size {size} > {max_xfer}")
        _argsz(argsz, cls.SIZE + size, "MIG_DATA_READ")
        return cls(argsz, size)

    @classmethod
    def decode_write(cls, payload: bytes | memoryview,
                     max_xfer: int = DEFAULT_MAX_XFER) -> "MigData":
        _need(payload, cls.SIZE, "MIG_DATA_WRITE")
        argsz, size = _MIG.unpack_from(payload, 0)
        if size > max_xfer:
            raise ProtocolError(errno.EINVAL, f"MIG_DATA_WRITE size {size} > {max_xfer}")
        if len(payload) != cls.SIZE + size:
            raise ProtocolError(errno.EINVAL, "MIG_DATA_WRITE data length != size")
        _argsz(argsz, cls.SIZE, "MIG_DATA_WRITE")
        return cls(argsz, size, bytes(payload[cls.SIZE:]))

    @classmethod
    def decode_reply(cls, payload: bytes | memoryview) -> "MigData":
        _need(payload, cls.SIZE, "MIG_DATA_READ reply")
        argsz, size = _MIG.unpack_from(payload, 0)
        _need(payload, cls.SIZE + size, "MIG_DATA_READ reply data")
        return cls(argsz, size, bytes(payload[cls.SIZE:cls.SIZE + size]))
