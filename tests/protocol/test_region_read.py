"""REGION_READ (9)."""
import errno
import struct

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import RegionAccess
from vfio_user.wire import Command, Region


def test_config_ids_and_256_byte_read(client):
    head = client.region_read(Region.CONFIG, 0, 256)
    assert len(head) == 256
    assert struct.unpack_from("<HH", head, 0) == (0x4E56, 0x0001)
    assert head[0x09:0x0C] == bytes((0x02, 0x08, 0x01))


def test_bar0_registers_and_doorbells(client, device):
    device.regs[0x20:0x28] = struct.pack("<Q", 0x1122334455667788)
    assert client.region_read(Region.BAR0, 0x20, 8) == struct.pack("<Q", 0x1122334455667788)
    device.bar0_mm[0x1008:0x100C] = b"\x07\0\0\0"
    assert client.region_read(Region.BAR0, 0x1008, 4) == b"\x07\0\0\0"


def test_reply_size_is_32_plus_count(client):
    f = client.request(Command.REGION_READ, RegionAccess(0, Region.CONFIG, 4).encode())
    assert f.header.size == 32 + 4


@pytest.mark.parametrize("region,offset,count", [
    (Region.BAR0, 0x2, 4),        # misaligned register access
    (Region.BAR0, 0x0, 2),        # bad width for registers
    (Region.BAR0, 0x3FFC, 8),     # beyond the BAR
    (Region.CONFIG, 0xFFF, 2),
    (Region.ROM, 0, 4),           # absent region
    (12, 0, 4),                   # no such region
    (Region.BAR0, (1 << 64) - 4, 8),
])
def test_bad_reads_einval(client, region, offset, count):
    with pytest.raises(ProtocolError) as e:
        client.region_read(region, offset, count)
    assert e.value.errno == errno.EINVAL


def test_count_above_max_xfer_e2big(client):
    with pytest.raises(ProtocolError) as e:
        client.region_read(Region.BAR0, 0, (1 << 20) + 4)
    assert e.value.errno == errno.E2BIG
