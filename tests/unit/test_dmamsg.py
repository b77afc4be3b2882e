"""DMA_READ/DMA_WRITE in both layouts, and the per-reply layout detection."""
import pytest

from vfio_user.dmamsg import (DmaLayout, DmaRw, decode_read_reply, encode_read_reply,
                              encode_write_reply, probe_address, probe_layout, write_reply_layout)
from vfio_user.errors import ProtocolError
from vfio_user.wire import Command


def test_read_request_same_bytes_in_both_layouts():
    a = DmaRw(0x1000, 64).encode(Command.DMA_READ, DmaLayout.SPEC)
    b = DmaRw(0x1000, 64).encode(Command.DMA_READ, DmaLayout.QEMU)
    assert a == b and len(a) == 16
    for lay in DmaLayout:
        assert DmaRw.decode(a, Command.DMA_READ, lay) == DmaRw(0x1000, 64)


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_write_request_roundtrip(layout):
    raw = DmaRw(0x2000, 5, b"hello").encode(Command.DMA_WRITE, layout)
    assert len(raw) == 16 + 5   # message size 32 + count in both layouts
    assert DmaRw.decode(raw, Command.DMA_WRITE, layout).data == b"hello"
    assert raw.find(b"hello") == (12 if layout is DmaLayout.QEMU else 16)


def test_read_reply_detection():
    data = b"\x01\x02\x03\x04rest"
    q = encode_read_reply(0x10, data, DmaLayout.QEMU)
    s = encode_read_reply(0x10, data, DmaLayout.SPEC)
    assert len(q) == len(s) == 16 + len(data)
    assert decode_read_reply(q, 0x10, len(data), None) == (data, DmaLayout.QEMU)
    # The spec reply of this data is ambiguous (a QEMU reply of b"\0\0\0\0\x01...")
    assert decode_read_reply(s, 0x10, len(data), None) == (None, None)
    assert decode_read_reply(s, 0x10, len(data), DmaLayout.SPEC) == (data, DmaLayout.SPEC)
    with pytest.raises(ProtocolError):          # non-zero count high half: not the spec layout
        decode_read_reply(q, 0x10, len(data), DmaLayout.SPEC)
    # Data starting with 4 zero bytes in QEMU layout is ambiguous too; a known layout decides.
    z = b"\0\0\0\0ab"
    qz = encode_read_reply(0x10, z, DmaLayout.QEMU)
    assert decode_read_reply(qz, 0x10, len(z), None) == (None, None)
    assert decode_read_reply(qz, 0x10, len(z), DmaLayout.QEMU) == (z, DmaLayout.QEMU)
    # All-zero data reads the same both ways.
    zz = encode_read_reply(0x10, b"\0" * 8, DmaLayout.QEMU)
    assert decode_read_reply(zz, 0x10, 8, None) == (b"\0" * 8, None)
    # A QEMU reading of all zeros with non-zero bytes after it can only be the spec layout.
    sz = encode_read_reply(0x10, b"\0\0\0\0\0\0\0x", DmaLayout.SPEC)
    assert decode_read_reply(sz, 0x10, 8, None) == (b"\0\0\0\0\0\0\0x", DmaLayout.SPEC)
    with pytest.raises(ProtocolError):
        decode_read_reply(q, 0x11, len(data), None)
    with pytest.raises(ProtocolError):
        decode_read_reply(q[:-5], 0x10, len(data), None)


@pytest.mark.parametrize("truth", list(DmaLayout))
def test_probe_resolves_an_ambiguous_reply(truth):
    """Guest bytes b"\0\0\0\0ab": the probe reads the byte the QEMU reading says is non-zero."""
    mem = {0x10 + i: b for i, b in enumerate(b"\0\0\0\0ab\0\0")}
    reply = encode_read_reply(0x10, bytes(mem[0x10 + i] for i in range(6)), truth)
    data, proven = decode_read_reply(reply, 0x10, 6, None)
    if data is None:
        at = probe_address(reply, 0x10, 6)
        proven = probe_layout(encode_read_reply(at, bytes([mem[at]]), truth))
        data, _ = decode_read_reply(reply, 0x10, 6, proven)
    assert (data, proven) == (b"\0\0\0\0ab", truth)


def test_write_reply_proves_the_layout():
    assert write_reply_layout(encode_write_reply(5, 3, DmaLayout.QEMU), 5) is DmaLayout.QEMU
    assert write_reply_layout(encode_write_reply(5, 3, DmaLayout.SPEC), 5) is DmaLayout.SPEC
    # QEMU 11.1.3's reply as seen on the wire: {u64 address, u64 count}
    assert write_reply_layout(bytes.fromhex("00700000000000000400000000000000"), 0x7000) is DmaLayout.SPEC
    with pytest.raises(ProtocolError):
        write_reply_layout(encode_write_reply(6, 3, DmaLayout.SPEC), 5)
    with pytest.raises(ProtocolError):
        write_reply_layout(b"\x05\0", 5)
