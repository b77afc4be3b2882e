"""DEVICE_GET_REGION_INFO (5): caps chain, argsz retry, fd passing."""
import errno
import mmap
import os

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import RegionInfoReply, RegionInfoRequest
from vfio_user.wire import Command, Region, RegionFlag


def test_bar0_sparse_mmap_with_retry_and_fd(client, device):
    info, fd = client.get_region_info(Region.BAR0)
    try:
        assert info.size == 0x4000
        assert info.flags & RegionFlag.MMAP and info.flags & RegionFlag.CAPS
        assert info.sparse == ((0x1000, 0x3000),)
        assert fd is not None
        # The fd really maps the device's doorbell page: what we write, it sees.
        mm = mmap.mmap(fd, 0x3000, offset=0x1000)
        mm[0:4] = b"\x05\0\0\0"
        assert device.bar0_mm[0x1000:0x1004] == b"\x05\0\0\0"
        mm.close()
    finally:
        if fd is not None:
            os.close(fd)


def test_first_ask_with_32_gets_truncated_reply_without_fd(client):
    f = client.request(Command.DEVICE_GET_REGION_INFO, RegionInfoRequest(32, Region.BAR0).encode())
    assert f.header.size == 16 + 32
    assert not f.fds
    r = RegionInfoReply.decode(f.payload)
    assert r.argsz > 32 and not r.flags & RegionFlag.CAPS


def test_config_region(client):
    info, fd = client.get_region_info(Region.CONFIG)
    assert fd is None and info.size == 0x1000
    assert info.flags == RegionFlag.READ | RegionFlag.WRITE


def test_absent_region_has_size_zero(client):
    info, fd = client.get_region_info(Region.ROM)
    assert info.size == 0 and fd is None


def test_index_out_of_range(client):
    with pytest.raises(ProtocolError) as e:
        client.get_region_info(10)
    assert e.value.errno == errno.EINVAL


def test_argsz_too_small(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.DEVICE_GET_REGION_INFO, RegionInfoRequest(16, 0).encode())
    assert e.value.errno == errno.EINVAL
