"""vfio-user wire constants and the 16-byte message header.

Integers on the wire are the host's byte order; vnvmed runs only on x86-64 (start-up
refuses anything else, see nvme/fence.py), which is little-endian, and the codec says
'<' explicitly so the format does not silently depend on the host.
Numbers are the final spec's (QEMU docs/interop/vfio-user.rst): DEVICE_FEATURE is
16, MIG_DATA_READ/WRITE 17/18 (an early draft had 15..17).
"""
from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass

from .errors import ProtocolError, StreamError

HEADER_SIZE = 16
_HDR = struct.Struct("<HHIII")


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14          # migration v1 only; removed from the current spec
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(enum.IntEnum):
    COMMAND = 0
    REPLY = 1


class HeaderFlag(enum.IntFlag):
    TYPE_MASK = 0xF
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


# Bits a peer may legitimately set; anything else in a header means garbage.
KNOWN_HEADER_FLAGS = 0xF | HeaderFlag.NO_REPLY | HeaderFlag.ERROR


class Region(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    MIGRATION = 9             # libvfio-user v1 migration region index


class Irq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class DeviceFlag(enum.IntFlag):
    RESET = 1
    PCI = 2


class RegionFlag(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class RegionCap(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class DmaMapFlag(enum.IntFlag):
    READ = 1
    WRITE = 2


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1      # v1 era: {pgsize, size} after the struct, bitmap in the reply
    ALL = 2


class FeatureFlag(enum.IntFlag):
    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header that starts every message.

    `size` is the whole message, header included.  `error` is only meaningful in
    replies with ERROR set.
    """

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    @property
    def msg_type(self) -> int:
        return self.flags & HeaderFlag.TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.msg_type == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    def encode(self) -> bytes:
        return _HDR.pack(self.msg_id & 0xFFFF, self.command & 0xFFFF, self.size,
                         self.flags, self.error)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "Header":
        if len(data) < HEADER_SIZE:
            raise ProtocolError(_errno.EINVAL, f"short header ({len(data)} bytes)")
        return cls(*_HDR.unpack_from(data, 0))

    def validate_framing(self, max_size: int) -> None:
        """Checks that decide whether the stream can still be trusted."""
        if self.size < HEADER_SIZE:
            raise StreamError(_errno.EINVAL, f"header size {self.size} < 16")
        if self.size > max_size:
            raise StreamError(_errno.E2BIG, f"message size {self.size} > {max_size}")
        if self.msg_type not in (MsgType.COMMAND, MsgType.REPLY):
            raise StreamError(_errno.EINVAL, f"message type {self.msg_type}")

    def reply(self, payload_len: int = 0) -> "Header":
        """The reply header for this command (same id and command)."""
        return Header(self.msg_id, self.command, HEADER_SIZE + payload_len, MsgType.REPLY, 0)

    def error_reply(self, err: int) -> "Header":
        return Header(self.msg_id, self.command, HEADER_SIZE,
                      MsgType.REPLY | HeaderFlag.ERROR, err)


def command_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"CMD{cmd}"
