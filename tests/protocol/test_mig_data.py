"""MIG_DATA_READ (17) / MIG_DATA_WRITE (18): decoded and passed to the device."""
import errno

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import MigData
from vfio_user.wire import Command


def test_read_until_short(client, device):
    blob = bytes(device.mig_out)
    got = b""
    while True:
        chunk = client.mig_data_read(64)
        got += chunk
        if len(chunk) < 64:
            break
    assert got == blob


def test_write(client, device):
    client.mig_data_write(b"state")
    assert bytes(device.mig_in) == b"state"


def test_read_argsz_too_small(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.MIG_DATA_READ, MigData(8, 64).encode())
    assert e.value.errno == errno.EINVAL


def test_write_length_mismatch(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.MIG_DATA_WRITE, MigData(20, 12, b"abc").encode())
    assert e.value.errno == errno.EINVAL
