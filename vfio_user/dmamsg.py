"""DMA_READ / DMA_WRITE (server -> client), in both the spec's and QEMU's layout.

Theory of operation (reference §3.9 and §6.10):

- The spec's payload is {u64 address, u64 count, data at +16}.
- QEMU (10.1 .. 11.1) uses a C struct {u64 offset, u32 count, char data[]}: data at
  payload +12, and the message it sends/expects is sizeof(struct) + count = 32 +
  count bytes, i.e. 4 unused trailing bytes.  QEMU's DMA_WRITE reply is header only;
  libvfio-user echoes {address, count}.

- A DMA_READ *request* is the same bytes in both: QEMU reads a u32 count where the
  spec has the low half of a u64 (little-endian), so we always send {u64, u64}.
- A DMA_READ *reply* is 32+count bytes in both layouts, so the reply alone does not
  say which layout it is.  In the spec layout payload[12:16] is the high half of a
  count < 2^32, i.e. zero; in QEMU's it is the first 4 data bytes.  Non-zero there
  proves QEMU; all-zero is ambiguous unless both readings give the same data.
  `decode_read_reply` reports what it could prove, the caller remembers it.
- A DMA_WRITE request must be sent in the layout the client reads.
"""
from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from .errors import ProtocolError
from .wire import Command

_SPEC = struct.Struct("<QQ")
_QEMU = struct.Struct("<QI")


class DmaLayout(enum.Enum):
    SPEC = "spec"
    QEMU = "qemu"


@dataclass(frozen=True, slots=True)
class DmaRw:
    """A DMA_READ request (data empty) or DMA_WRITE request (data = count bytes)."""

    address: int
    count: int
    data: bytes = b""

    def encode(self, command: int, layout: DmaLayout = DmaLayout.SPEC) -> bytes:
        if command == Command.DMA_READ or layout is DmaLayout.SPEC:
            return _SPEC.pack(self.address, self.count) + self.data
        # QEMU: data right after the u32 count, then pad to sizeof(struct) + count.
        return _QEMU.pack(self.address, self.count) + self.data + b"\0" * 4

    @classmethod
    def decode(cls, payload: bytes | memoryview, command: int,
               layout: DmaLayout = DmaLayout.SPEC, max_xfer: int = 1 << 20) -> "DmaRw":
        """Client side: decode a server's DMA_READ/DMA_WRITE request."""
        if len(payload) < 12:
            raise ProtocolError(errno.EINVAL, "DMA request too short")
        if layout is DmaLayout.QEMU:
            addr, count = _QEMU.unpack_from(payload, 0)
            data_at = 12
        else:
            if len(payload) < 16:
                raise ProtocolError(errno.EINVAL, "DMA request too short")
            addr, count = _SPEC.unpack_from(payload, 0)
            data_at = 16
        if count > max_xfer:
            raise ProtocolError(errno.E2BIG, f"DMA count {count} > {max_xfer}")
        if command == Command.DMA_WRITE:
            if len(payload) < data_at + count:
                raise ProtocolError(errno.EINVAL, "DMA_WRITE data shorter than count")
            return cls(addr, count, bytes(payload[data_at:data_at + count]))
        return cls(addr, count)


def encode_read_reply(address: int, data: bytes, layout: DmaLayout) -> bytes:
    """Client side: the DMA_READ reply payload (16 + count bytes in both layouts)."""
    if layout is DmaLayout.QEMU:
        return _QEMU.pack(address, len(data)) + data + b"\0" * 4
    return _SPEC.pack(address, len(data)) + data


def encode_write_reply(address: int, count: int, layout: DmaLayout) -> bytes:
    """Client side: the DMA_WRITE reply payload (QEMU sends none)."""
    return b"" if layout is DmaLayout.QEMU else _SPEC.pack(address, count)


def decode_read_reply(payload: bytes | memoryview, address: int, count: int,
                      fallback: DmaLayout) -> tuple[bytes, DmaLayout | None]:
    """Server side: the data of a DMA_READ reply and the layout it proved (or None).

    `fallback` is used only when the reply is ambiguous and the two readings differ.
    """
    if len(payload) < 16 + count:
        raise ProtocolError(errno.EINVAL, f"DMA_READ reply {len(payload)} < {16 + count}")
    addr, count32 = _QEMU.unpack_from(payload, 0)
    if addr != address or count32 != count & 0xFFFFFFFF:
        raise ProtocolError(errno.EINVAL, "DMA_READ reply address/count mismatch")
    qemu_data = bytes(payload[12:12 + count])
    if bytes(payload[12:16]) != b"\0\0\0\0":
        return qemu_data, DmaLayout.QEMU
    spec_data = bytes(payload[16:16 + count])
    if qemu_data == spec_data:
        return spec_data, None
    return (qemu_data if fallback is DmaLayout.QEMU else spec_data), None


def check_write_reply(payload: bytes | memoryview, address: int) -> None:
    """Server side: accept QEMU's header-only reply or an {address, count} echo."""
    if len(payload) == 0:
        return
    if len(payload) < 8:
        raise ProtocolError(errno.EINVAL, "DMA_WRITE reply too short")
    (addr,) = struct.unpack_from("<Q", payload, 0)
    if addr != address:
        raise ProtocolError(errno.EINVAL, "DMA_WRITE reply address mismatch")
