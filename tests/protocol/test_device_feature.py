"""DEVICE_FEATURE (16): GET answered by the device, unknown features refused."""
import errno
import struct

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.wire import FeatureFlag


def test_get_migration_feature(client):
    r = client.device_feature(FeatureFlag.GET | 1, argsz=16)
    assert r.argsz == 16 and struct.unpack("<Q", r.data) == (1,)


def test_unknown_feature(client):
    with pytest.raises(ProtocolError) as e:
        client.device_feature(FeatureFlag.GET | 9, argsz=16)
    assert e.value.errno == errno.EINVAL


def test_reply_larger_than_argsz_refused(client):
    with pytest.raises(ProtocolError) as e:
        client.device_feature(FeatureFlag.GET | 1, argsz=8)
    assert e.value.errno == errno.E2BIG


def test_short_payload(client):
    from vfio_user.wire import Command
    with pytest.raises(ProtocolError) as e:
        client.request(Command.DEVICE_FEATURE, b"\x08\0")
    assert e.value.errno == errno.EINVAL
