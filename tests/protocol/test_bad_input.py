"""Malformed and out-of-order input: error replies, or a clean disconnect when the
stream cannot be trusted; received fds never leak."""
import errno
import os
import struct

import pytest

from vfio_user.client import VfioUserClient, eventfd
from vfio_user.messages import DeviceInfoMsg
from vfio_user.wire import Command, Header, HeaderFlag, MsgType


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _err(client, mid):
    f = client.recv_reply(mid)
    assert f.header.is_reply and f.header.is_error
    return f.header.error


def test_unknown_and_unserved_commands_enosys(client):
    for cmd in (99, Command.DEVICE_GET_REGION_IO_FDS, Command.DMA_READ, Command.DMA_WRITE):
        assert _err(client, client.send(cmd, b"\0" * 16)) == errno.ENOSYS
    assert client.get_device_info().num_irqs == 5


def test_dirty_pages_on_a_device_without_tracking(client):
    # Served (v1-era command 14) but this device has no dirty tracking: ENOTSUP;
    # a malformed request is EINVAL first.
    assert _err(client, client.send(Command.DIRTY_PAGES, struct.pack("<II", 8, 1))) == errno.ENOTSUP
    assert _err(client, client.send(Command.DIRTY_PAGES, b"\0" * 4)) == errno.EINVAL
    assert client.get_device_info().num_irqs == 5


def test_unknown_command_no_reply_is_silent(client):
    client.send(99, b"", flags=HeaderFlag.NO_REPLY)
    assert client.get_device_info().num_regions == 10
    assert not client._stash


@pytest.mark.parametrize("raw", [
    Header(1, Command.DEVICE_GET_INFO, 8).encode(),                  # size < 16
    Header(1, Command.REGION_WRITE, 64 << 20).encode(),             # size > limit
    Header(1, Command.DEVICE_GET_INFO, 32, 0x7).encode() + b"\0" * 16,  # garbage type
])
def test_untrustworthy_stream_disconnects(client, server, raw):
    client.send_raw(raw)
    assert client.expect_eof()
    server.wait_idle()
    c2 = VfioUserClient(server.path, timeout=3.0)
    c2.negotiate()
    assert c2.get_device_info().num_irqs == 5
    c2.close()


def test_unmatched_reply_dropped(client):
    client.send_raw(Header(0x4242, Command.DMA_READ, 16 + 16, MsgType.REPLY).encode() + b"\0" * 16)
    assert client.get_device_info().num_regions == 10


def test_stray_fds_closed_and_request_served(client):
    before = _fds()
    efd = eventfd()
    f = client.request(Command.DEVICE_GET_INFO, DeviceInfoMsg(16).encode(), [efd])
    os.close(efd)
    assert DeviceInfoMsg.decode(f.payload).num_regions == 10
    client.get_device_info()
    assert _fds() == before


def test_more_fds_than_negotiated_einval_no_leak(client):
    before = _fds()
    fds = [eventfd() for _ in range(20)]
    mid = client.send(Command.DEVICE_GET_INFO, DeviceInfoMsg(16).encode(), fds)
    for fd in fds:
        os.close(fd)
    assert _err(client, mid) == errno.EINVAL
    assert _fds() == before


def test_truncated_message_then_eof_no_leak(server, device):
    before = _fds()
    c = VfioUserClient(server.path, timeout=3.0)
    c.negotiate()
    efd = eventfd()
    c.send_raw(Header(9, Command.DEVICE_SET_IRQS, 16 + 20).encode() + b"\0" * 4, [efd])
    os.close(efd)
    c.close()
    server.wait_idle()
    assert ("disconnected",) in device.events
    assert _fds() == before


def test_short_payloads_einval(client):
    for cmd in (Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_REGION_INFO,
                Command.DEVICE_SET_IRQS, Command.REGION_READ, Command.REGION_WRITE,
                Command.REGION_WRITE_MULTI, Command.MIG_DATA_READ):
        assert _err(client, client.send(cmd, b"\x01\x02")) == errno.EINVAL, cmd
    assert client.get_device_info().num_irqs == 5


def test_message_split_across_many_writes(client):
    raw = Header(5, Command.DEVICE_GET_INFO, 32).encode() + DeviceInfoMsg(16).encode()
    for b in raw:
        client.send_raw(bytes([b]))
    f = client.recv_reply(5)
    assert DeviceInfoMsg.decode(f.payload).num_irqs == 5


def test_pipelined_requests_in_one_write(client, device):
    from vfio_user.messages import RegionAccess
    raw = b""
    for i in range(10):
        p = RegionAccess(0x40, 0, 4, struct.pack("<I", i)).encode()
        raw += Header(100 + i, Command.REGION_WRITE, 16 + len(p)).encode() + p
    p = RegionAccess(0x40, 0, 4).encode()
    raw += Header(200, Command.REGION_READ, 16 + len(p)).encode() + p
    client.send_raw(raw)
    for i in range(10):
        assert not client.recv_reply(100 + i).header.is_error
    assert client.recv_reply(200).payload[16:] == struct.pack("<I", 9)
