"""REGION_WRITE_MULTI (15): accepted although never advertised; NO_REPLY honoured."""
import errno
import struct

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import RegionWriteMulti, WriteMultiEntry
from vfio_user.wire import Command, HeaderFlag, Region


def test_multi_noreply_like_qemu(client, device):
    m = RegionWriteMulti((WriteMultiEntry(0x40, Region.BAR0, 4, b"\1\0\0\0"),
                          WriteMultiEntry(0x48, Region.BAR0, 8, b"12345678")))
    client.send(Command.REGION_WRITE_MULTI, m.encode(), flags=HeaderFlag.NO_REPLY)
    assert client.region_read(Region.BAR0, 0x48, 8) == b"12345678"
    assert device.regs[0x40:0x44] == b"\1\0\0\0"
    assert not client._stash


def test_multi_with_reply(client):
    m = RegionWriteMulti((WriteMultiEntry(0x40, Region.BAR0, 4, b"\2\0\0\0"),))
    f = client.request(Command.REGION_WRITE_MULTI, m.encode())
    assert struct.unpack("<Q", f.payload) == (1,)


def test_multi_bad_entry_writes_nothing(client, device):
    m = RegionWriteMulti((WriteMultiEntry(0x40, Region.BAR0, 4, b"\3\0\0\0"),
                          WriteMultiEntry(0x41, Region.BAR0, 4, b"\4\0\0\0")))
    with pytest.raises(ProtocolError) as e:
        client.request(Command.REGION_WRITE_MULTI, m.encode())
    assert e.value.errno == errno.EINVAL
    # Range checks come first; the device check of entry 2 fails after entry 1 was
    # written, as with QEMU's sequential posted writes.
    assert device.regs[0x41:0x45] != b"\4\0\0\0"


def test_multi_too_many(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.REGION_WRITE_MULTI, struct.pack("<Q", 201) + b"\0" * 24 * 201)
    assert e.value.errno == errno.E2BIG
