"""Codec round trips and structural errors for every vfio-user payload."""
import errno
import struct

import pytest

from vfio_user.errors import ProtocolError, StreamError
from vfio_user.messages import (DeviceFeature, DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfoMsg,
                                MigData, RegionAccess, RegionInfoReply, RegionInfoRequest,
                                RegionWriteMulti, SetIrqs, Version, WriteMultiEntry)
from vfio_user.wire import Command, Header, HeaderFlag, RegionFlag


def test_header_roundtrip_and_reply():
    h = Header(0x1234, Command.REGION_READ, 48, HeaderFlag.NO_REPLY, 0)
    raw = h.encode()
    assert len(raw) == 16
    assert raw[:4] == b"\x34\x12\x09\x00"
    assert Header.decode(raw) == h
    r = h.error_reply(errno.EINVAL)
    assert r.is_reply and r.is_error and r.error == errno.EINVAL and r.size == 16
    assert r.msg_id == 0x1234 and r.command == Command.REGION_READ


def test_header_framing_checks():
    with pytest.raises(ProtocolError):
        Header.decode(b"\0" * 15)
    with pytest.raises(StreamError):
        Header(1, 1, 15).validate_framing(4096)
    with pytest.raises(StreamError) as e:
        Header(1, 1, 5000).validate_framing(4096)
    assert e.value.errno == errno.E2BIG
    with pytest.raises(StreamError):
        Header(1, 1, 16, 0x7).validate_framing(4096)
    Header(1, 1, 16, HeaderFlag.NO_REPLY).validate_framing(4096)


def test_version_with_and_without_json():
    v = Version(0, 0, '{"capabilities":{}}')
    raw = v.encode()
    assert raw.endswith(b"}\0")
    assert Version.decode(raw) == v
    assert Version.decode(b"\0\0\0\0") == Version(0, 0, None)
    with pytest.raises(ProtocolError):
        Version.decode(b"\0\0")
    with pytest.raises(ProtocolError):
        Version.decode(b"\0\0\0\0{}\0garbage")
    with pytest.raises(ProtocolError):
        Version.decode(b"\0\0\0\0\xff\xfe\0")


def test_dma_map_unmap():
    m = DmaMap(32, 3, 0x1000, 0x200000, 0x10000)
    assert DmaMap.decode(m.encode()) == m
    with pytest.raises(ProtocolError) as e:
        DmaMap.decode(m.encode()[:31])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        DmaMap.decode(DmaMap(16, 3, 0, 0, 4096).encode())
    u = DmaUnmap(24, 2, 0, 0)
    assert DmaUnmap.decode(u.encode()) == u
    with pytest.raises(ProtocolError):
        DmaUnmap.decode(b"\0" * 20)


def test_device_and_irq_info():
    d = DeviceInfoMsg(16, 3, 10, 5)
    assert DeviceInfoMsg.decode(d.encode()) == d
    with pytest.raises(ProtocolError):
        DeviceInfoMsg.decode(DeviceInfoMsg(8).encode())
    i = IrqInfoMsg(16, 1, 2, 64)
    assert IrqInfoMsg.decode(i.encode()) == i
    with pytest.raises(ProtocolError):
        IrqInfoMsg.decode(b"\x10\0\0\0")


def test_region_info_caps_chain_and_truncation():
    r = RegionInfoReply(0, RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP, 0, 0x4000,
                        0, sparse=((0x1000, 0x3000),), cap_type=(3, 1))
    full = r.encode()
    assert len(full) == r.full_size() == 32 + 8 + 8 + 16 + 8 + 8
    back = RegionInfoReply.decode(full)
    assert back.sparse == ((0x1000, 0x3000),) and back.cap_type == (3, 1)
    assert back.flags & RegionFlag.CAPS and back.argsz == len(full)
    short = r.encode(limit=32)
    assert len(short) == 32
    s = RegionInfoReply.decode(short)
    assert s.argsz == len(full) and not s.flags & RegionFlag.CAPS and s.sparse is None
    assert RegionInfoRequest.decode(RegionInfoRequest(32, 7).encode()) == RegionInfoRequest(32, 7)
    with pytest.raises(ProtocolError):
        RegionInfoRequest.decode(RegionInfoRequest(16, 7).encode())
    # A chain pointing outside the payload is refused, not followed.
    bad = bytearray(full)
    struct.pack_into("<I", bad, 12, 4000)
    with pytest.raises(ProtocolError):
        RegionInfoReply.decode(bytes(bad))


def test_set_irqs_bool_data():
    s = SetIrqs(23, 0x2 | 0x8, 2, 0, 3, b"\1\0\1")
    assert SetIrqs.decode(s.encode()) == s
    with pytest.raises(ProtocolError):
        SetIrqs.decode(SetIrqs(20, 0x2 | 0x8, 2, 0, 3).encode())
    with pytest.raises(ProtocolError):
        SetIrqs.decode(b"\0" * 19)


def test_region_access():
    w = RegionAccess(0x14, 0, 4, b"\1\2\3\4")
    assert RegionAccess.decode(w.encode(), with_data=True) == w
    with pytest.raises(ProtocolError):
        RegionAccess.decode(w.encode() + b"x", with_data=True)
    rd = RegionAccess(0, 7, 256)
    assert RegionAccess.decode(rd.encode(), with_data=False) == rd
    with pytest.raises(ProtocolError) as e:
        RegionAccess.decode(RegionAccess(0, 0, (1 << 20) + 1).encode(), with_data=False)
    assert e.value.errno == errno.E2BIG


def test_write_multi():
    m = RegionWriteMulti((WriteMultiEntry(0, 0, 4, b"abcd"), WriteMultiEntry(8, 1, 8, b"12345678")))
    raw = m.encode()
    assert len(raw) == 8 + 48
    assert RegionWriteMulti.decode(raw) == m
    with pytest.raises(ProtocolError):
        RegionWriteMulti.decode(raw[:-1])
    with pytest.raises(ProtocolError) as e:
        RegionWriteMulti.decode(struct.pack("<Q", 10 ** 6))
    assert e.value.errno == errno.E2BIG
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 8 + 12, 9)
    with pytest.raises(ProtocolError):
        RegionWriteMulti.decode(bytes(bad))


def test_feature_and_mig_data():
    f = DeviceFeature(16, (1 << 16) | 1, b"\0" * 8)
    assert DeviceFeature.decode(f.encode()) == f
    with pytest.raises(ProtocolError):
        DeviceFeature.decode(b"\0" * 4)
    r = MigData.decode_read(MigData(8 + 100, 100).encode())
    assert r.size == 100
    with pytest.raises(ProtocolError):
        MigData.decode_read(MigData(8, 100).encode())
    with pytest.raises(ProtocolError) as e:
        MigData.decode_read(MigData(8 + (2 << 20), 2 << 20).encode())
    assert e.value.errno == errno.EINVAL      # libvfio-user's answer
    w = MigData(13, 5, b"hello")
    assert MigData.decode_write(w.encode()) == w
    with pytest.raises(ProtocolError):
        MigData.decode_write(MigData(13, 6, b"hello").encode())
    assert MigData.decode_reply(MigData(11, 3, b"abc").encode()).data == b"abc"
