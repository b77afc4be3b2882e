"""SGL walking: turn SGL descriptors into data memoryviews (NVMe Base §4.4).

Theory of operation
-------------------
SGL1 (in the SQE, DW6..DW9) is one 16-byte descriptor: address (8 bytes), length
(4), 3 reserved bytes and a type byte (type in bits 7:4, subtype in 3:0).  Types:

* 0 Data Block  - `length` bytes of data at `address`;
* 1 Bit Bucket  - `length` bytes of controller-to-host data to discard (Read only);
* 2 Segment     - a list of descriptors at `address`, `length` bytes (multiple of
                  16); if it continues, its LAST descriptor is a Segment or Last
                  Segment pointing at the next list;
* 3 Last Segment- like Segment, but the list it points to may contain no further
                  segment descriptors.

Only subtype 0 (address) is accepted; keyed/transport descriptors are refused.
Segments are read through read-only views (the device never writes them).  The
descriptors must describe exactly `length` bytes: we do not advertise the SGL
"excess length" capability, so both too little and too much -> DATA_SGL_LENGTH_INVALID.
Data addresses need no alignment (SGLS[1:0] = 01b).  A guest may build a segment
loop; the descriptor budget `MAX_DESCRIPTORS` bounds the walk.

Bit-bucket ranges appear in the result as scratch bytearrays so a backend can read
into them uniformly (discarded afterwards).
"""
from __future__ import annotations

from enum import IntEnum

from .errors import CommandError
from .memory import DmaFault, GuestMemory, NeedsMessageDma
from .status import Status

MAX_DESCRIPTORS = 4096


class SglType(IntEnum):
    DATA_BLOCK = 0
    BIT_BUCKET = 1
    SEGMENT = 2
    LAST_SEGMENT = 3


def _view(mem: GuestMemory, addr: int, n: int, write: bool) -> memoryview:
    try:
        return mem.view(addr, n, write=write)
    except NeedsMessageDma:
        raise
    except DmaFault as e:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(e)) from None


def map_sgl(mem: GuestMemory, addr: int, dlen: int, type_byte: int, length: int,
            to_guest: bool) -> list[memoryview]:
    """Data views for a transfer of `length` bytes described by SGL1."""
    out: list[memoryview] = []
    total = 0
    budget = MAX_DESCRIPTORS
    in_last = False  # are we inside a Last Segment's list?
    desc: tuple[int, int, int] | None = (addr, dlen, type_byte)
    seg: memoryview | None = None
    while desc is not None:
        a, n, tb = desc
        typ, sub = tb >> 4, tb & 0xF
        if typ in (SglType.DATA_BLOCK, SglType.BIT_BUCKET):
            if sub != 0:
                raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "subtype")
            if total + n > length:
                raise CommandError(Status.DATA_SGL_LENGTH_INVALID, "SGL describes more than the transfer")
            if n:
                if typ == SglType.DATA_BLOCK:
                    out.append(_view(mem, a, n, to_guest))
                elif to_guest:
                    out.append(memoryview(bytearray(n)))
                else:
                    raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "bit bucket in a host-to-device transfer")
            total += n
            desc = None
        elif typ in (SglType.SEGMENT, SglType.LAST_SEGMENT):
            if sub != 0 or in_last:
                raise CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "segment inside a last segment")
            if n == 0 or n % 16:
                raise CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "segment length")
            count = n // 16
            budget -= count
            if budget < 0:
                raise CommandError(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, "too many descriptors")
            in_last = typ == SglType.LAST_SEGMENT
            seg = _view(mem, a, n, False).cast("Q")
            desc = None
            for i in range(count):
                da, w = seg[2 * i], seg[2 * i + 1]
                dn, dtb = w & 0xFFFFFFFF, w >> 56
                dtyp = dtb >> 4
                if dtyp in (SglType.SEGMENT, SglType.LAST_SEGMENT):
                    if i != count - 1:
                        raise CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "segment descriptor not last")
                    desc = (da, dn, dtb)
                    break
                if dtyp not in (SglType.DATA_BLOCK, SglType.BIT_BUCKET):
                    raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"type {dtyp}")
                if dtb & 0xF:
                    raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "subtype")
                if total + dn > length:
                    raise CommandError(Status.DATA_SGL_LENGTH_INVALID, "SGL describes more than the transfer")
                if dn:
                    if dtyp == SglType.DATA_BLOCK:
                        out.append(_view(mem, da, dn, to_guest))
                    elif to_guest:
                        out.append(memoryview(bytearray(dn)))
                    else:
                        raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "bit bucket in a host-to-device transfer")
                total += dn
            seg.release()
            if desc is None and not in_last:
                # A plain Segment must chain to another segment.
                raise CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "segment without a next segment")
        else:
            raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"type {typ}")
    if total != length:
        raise CommandError(Status.DATA_SGL_LENGTH_INVALID, f"SGL describes {total} of {length} bytes")
    return out
