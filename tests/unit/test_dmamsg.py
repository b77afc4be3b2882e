"""DMA_READ/DMA_WRITE in both layouts, and the per-reply layout detection."""
import pytest

from vfio_user.dmamsg import (DmaLayout, DmaRw, check_write_reply, decode_read_reply,
                              encode_read_reply, encode_write_reply)
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
    assert decode_read_reply(q, 0x10, len(data), DmaLayout.SPEC) == (data, DmaLayout.QEMU)
    assert decode_read_reply(s, 0x10, len(data), DmaLayout.SPEC) == (data, None)
    # Data starting with 4 zero bytes in QEMU layout is ambiguous: the fallback decides.
    z = b"\0\0\0\0ab"
    qz = encode_read_reply(0x10, z, DmaLayout.QEMU)
    assert decode_read_reply(qz, 0x10, len(z), DmaLayout.QEMU) == (z, None)
    assert decode_read_reply(qz, 0x10, len(z), DmaLayout.SPEC)[0] != z
    # All-zero data reads the same both ways.
    zz = encode_read_reply(0x10, b"\0" * 8, DmaLayout.QEMU)
    assert decode_read_reply(zz, 0x10, 8, DmaLayout.SPEC) == (b"\0" * 8, None)
    with pytest.raises(ProtocolError):
        decode_read_reply(q, 0x11, len(data), DmaLayout.SPEC)
    with pytest.raises(ProtocolError):
        decode_read_reply(q[:-5], 0x10, len(data), DmaLayout.SPEC)


def test_write_reply():
    check_write_reply(encode_write_reply(5, 3, DmaLayout.QEMU), 5)
    check_write_reply(encode_write_reply(5, 3, DmaLayout.SPEC), 5)
    with pytest.raises(ProtocolError):
        check_write_reply(encode_write_reply(6, 3, DmaLayout.SPEC), 5)
