"""REGION_WRITE (10): replies, NO_REPLY posted writes, ordering, quiesce by device."""
import errno
import struct

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import RegionAccess
from vfio_user.wire import Command, Region


def test_write_then_read(client, device):
    r = client.region_write(Region.BAR0, 0x40, b"\1\2\3\4")
    assert (r.offset, r.region, r.count, r.data) == (0x40, Region.BAR0, 4, b"")
    assert device.regs[0x40:0x44] == b"\1\2\3\4"
    assert client.region_read(Region.BAR0, 0x40, 4) == b"\1\2\3\4"


def test_reply_not_larger_than_request(client):
    mid = client.send(Command.REGION_WRITE, RegionAccess(0x40, 0, 4, b"abcd").encode())
    f = client.recv_reply(mid)
    assert f.header.size <= 16 + 16 + 4


def test_posted_writes_get_no_reply_and_stay_ordered(client, device):
    for i in range(20):
        client.region_write_noreply(Region.BAR0, 0x80, struct.pack("<I", i))
    # A later read must see the last posted write (in-order processing).
    assert client.region_read(Region.BAR0, 0x80, 4) == struct.pack("<I", 19)
    assert not client._stash


def test_posted_write_error_gets_no_reply(client):
    client.region_write_noreply(Region.BAR0, 0x1, b"\0\0\0\0")    # misaligned: dropped
    assert client.region_read(Region.BAR0, 0x0, 4) == b"\0\0\0\0"
    assert not client._stash


def test_config_write_masks(client, device):
    client.region_write(Region.CONFIG, 0x00, b"\xff\xff")          # vendor id: read-only
    assert client.region_read(Region.CONFIG, 0x00, 2) == b"\x56\x4e"
    client.region_write(Region.CONFIG, 0x04, b"\x06\x04")          # MEM | BM | INTx disable
    assert device.config.bus_master and device.config.intx_disabled


def test_device_requested_quiesce_keeps_order(client, device):
    device.quiesce_delay = 0.2
    a = client.send(Command.REGION_WRITE, RegionAccess(0x200, 0, 4, b"\1\0\0\0").encode())
    b = client.send(Command.REGION_READ, RegionAccess(0x200, 0, 4).encode())
    fa, fb = client.recv_reply(a), client.recv_reply(b)
    assert not fa.header.is_error and fb.payload[16:] == b"\1\0\0\0"
    ev = [e[0] for e in device.events if e[0] in ("quiesce", "resume", "write", "read")]
    assert ev == ["quiesce", "write", "resume", "read"]


@pytest.mark.parametrize("offset,data", [(0x2, b"\0" * 4), (0x0, b"\0"), (0x3FFF, b"\0" * 4),
                                         (0xFFC, b"\0" * 8)])
def test_bad_writes_einval(client, offset, data):
    with pytest.raises(ProtocolError) as e:
        client.region_write(Region.BAR0, offset, data)
    assert e.value.errno == errno.EINVAL


def test_data_length_mismatch(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.REGION_WRITE, RegionAccess(0x40, 0, 8, b"abcd").encode())
    assert e.value.errno == errno.EINVAL
