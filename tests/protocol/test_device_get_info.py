"""DEVICE_GET_INFO (4)."""
import errno

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import DeviceInfoMsg
from vfio_user.wire import Command, DeviceFlag


def test_device_info(client):
    info = client.get_device_info()
    assert info.argsz == 16
    assert info.flags == DeviceFlag.RESET | DeviceFlag.PCI
    assert info.num_regions == 10 and info.num_irqs == 5


def test_reply_fits_32_bytes(client):
    f = client.request(Command.DEVICE_GET_INFO, DeviceInfoMsg(16).encode())
    assert f.header.size == 32


def test_argsz_too_small(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.DEVICE_GET_INFO, DeviceInfoMsg(8).encode())
    assert e.value.errno == errno.EINVAL


def test_short_payload(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.DEVICE_GET_INFO, b"\x10\0\0\0")
    assert e.value.errno == errno.EINVAL
