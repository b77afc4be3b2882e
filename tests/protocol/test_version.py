"""VERSION (1): negotiation over a real socket."""
import errno
import json

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import Version
from vfio_user.wire import Command


def test_negotiate_spec_client(raw_client, device):
    caps = raw_client.negotiate('{"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 65536}}')
    assert caps == {"max_msg_fds": 16, "max_data_xfer_size": 65536}
    assert ("connected",) in device.events


def test_negotiate_without_json(raw_client):
    assert raw_client.negotiate(None) == {}
    assert raw_client.server_max_fds == 1
    assert len(raw_client.get_device_info().encode()) == 16


def test_wrong_major_refused(raw_client):
    with pytest.raises(ProtocolError) as e:
        raw_client.negotiate(None, major=1)
    assert e.value.errno == errno.ENOTSUP
    raw_client.negotiate(None)          # the session is still usable


def test_bad_json_einval(raw_client):
    with pytest.raises(ProtocolError) as e:
        raw_client.negotiate('{"capabilities": 3}')
    assert e.value.errno == errno.EINVAL


def test_commands_before_version_refused(raw_client):
    with pytest.raises(ProtocolError) as e:
        raw_client.get_device_info()
    assert e.value.errno == errno.EINVAL


def test_version_twice_refused(client):
    with pytest.raises(ProtocolError) as e:
        client.negotiate()
    assert e.value.errno == errno.EINVAL


def test_reply_header_echoes_id(raw_client):
    mid = raw_client.send(Command.VERSION, Version(0, 0, '{"capabilities":{}}').encode(),
                          msg_id=0x7777)
    f = raw_client.recv_reply(mid)
    assert f.header.msg_id == 0x7777 and f.header.is_reply and not f.header.is_error
    assert json.loads(Version.decode(f.payload).json) == {"capabilities": {}}
