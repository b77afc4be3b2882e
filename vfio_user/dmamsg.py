"""DMA_READ / DMA_WRITE (server -> client), in both the spec's and QEMU's layout.

Theory of operation (reference §3.9 and §6.10):

- The spec's payload is {u64 address, u64 count, data at +16}.  QEMU 11.1.3 speaks it
  (seen on the wire: the reply to a DMA_READ of the reset vector carries the bytes at
  +16; a DMA_WRITE with a u32 count gets E2BIG, QEMU reading the first data bytes as the
  count's high half; the DMA_WRITE reply echoes {address, count}), as libvfio-user does.
- `DmaLayout.QEMU` is the layout of QEMU 10.1's source: a C struct {u64 offset, u32
  count, char data[]}, data at payload +12, messages sizeof(struct) + count = 32 +
  count bytes (4 unused trailing bytes), and a header-only DMA_WRITE reply.
- VERSION does not say which layout a QEMU speaks.  The server proves it: a DMA_WRITE
  goes out in the spec layout until proven, and its reply tells (header only: QEMU 10.1,
  which read our count's high half as 4 zero data bytes, then our data shifted by 4 -
  into the same [address, address+count), so re-sending in its layout repairs it before
  the command that owns those bytes completes).  A read reply proves what it can (below).

- A DMA_READ *request* is the same bytes in both: QEMU reads a u32 count where the
  spec has the low half of a u64 (little-endian), so we always send {u64, u64}.
- A DMA_READ *reply* is 32+count bytes in both layouts, so the reply alone does not
  say which layout it is.  In the spec layout payload[12:16] is the high half of a
  count < 2^32, i.e. zero; in QEMU's it is the first 4 data bytes.  Non-zero there
  proves QEMU; all-zero is ambiguous unless both readings give the same data (or the
  QEMU reading is all zero: its 4 trailing bytes are zero padding).  Left ambiguous,
  `decode_read_reply` returns no data and the caller probes: a 1-byte DMA_READ at the
  first non-zero byte of the QEMU reading (`probe_address`) has non-zero bytes 12..16
  exactly in QEMU's layout (`probe_layout`).
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
                      layout: DmaLayout | None) -> tuple[bytes | None, DmaLayout | None]:
    """Server side: (data, layout) of a DMA_READ reply; `layout` is the proven one or None.

    Returns the layout the reply proved (or the known one); (None, None) when the
    layout is unknown and the reply fits both with different data: probe, then decode
    again with the answer.
    """
    if len(payload) < 16 + count:
        raise ProtocolError(errno.EINVAL, f"DMA_READ reply {len(payload)} < {16 + count}")
    addr, count32 = _QEMU.unpack_from(payload, 0)
    if addr != address or count32 != count & 0xFFFFFFFF:
        raise ProtocolError(errno.EINVAL, "DMA_READ reply address/count mismatch")
    qemu_data = bytes(payload[12:12 + count])
    if layout is DmaLayout.QEMU:
        return qemu_data, layout
    if bytes(payload[12:16]) != b"\0\0\0\0":
        if layout is DmaLayout.SPEC:
            raise ProtocolError(errno.EINVAL, "DMA_READ reply count is not a u64 (spec layout)")
        return qemu_data, DmaLayout.QEMU
    spec_data = bytes(payload[16:16 + count])
    if layout is DmaLayout.SPEC:
        return spec_data, layout
    if qemu_data == spec_data:
        return spec_data, None
    if not any(qemu_data):
        return spec_data, DmaLayout.SPEC     # QEMU's reading would show zero padding there
    return None, None


def probe_address(payload: bytes | memoryview, address: int, count: int) -> int:
    """For an ambiguous reply: the guest address of the first non-zero byte in QEMU's reading."""
    qemu_data = bytes(payload[12:12 + count])
    return address + next(i for i, b in enumerate(qemu_data) if b)


def probe_layout(payload: bytes | memoryview) -> DmaLayout:
    """The layout a 1-byte DMA_READ reply at `probe_address` proves (see the module doc)."""
    if len(payload) < 17:
        raise ProtocolError(errno.EINVAL, "DMA_READ probe reply too short")
    return DmaLayout.QEMU if bytes(payload[12:16]) != b"\0\0\0\0" else DmaLayout.SPEC


def write_reply_layout(payload: bytes | memoryview, address: int) -> DmaLayout:
    """Server side: the layout a DMA_WRITE reply proves: header only = QEMU 10.1, echo = spec."""
    if len(payload) == 0:
        return DmaLayout.QEMU
    if len(payload) < 8:
        raise ProtocolError(errno.EINVAL, "DMA_WRITE reply too short")
    (addr,) = struct.unpack_from("<Q", payload, 0)
    if addr != address:
        raise ProtocolError(errno.EINVAL, "DMA_WRITE reply address mismatch")
    return DmaLayout.SPEC
