"""DEVICE_RESET (13): quiesced, device reset, config back to power-on."""
from vfio_user.wire import Region


def test_reset(client, device):
    client.region_write(Region.CONFIG, 0x04, b"\x06\x00")
    client.region_write(Region.BAR0, 0x40, b"\1\2\3\4")
    client.reset()
    client.get_device_info()   # resume runs after the reply, before the next request
    assert device.events[-3:] == [("quiesce",), ("reset",), ("resume",)]
    assert client.region_read(Region.CONFIG, 0x04, 2) == b"\0\0"
    assert client.region_read(Region.BAR0, 0x40, 4) == b"\0\0\0\0"


def test_reset_reply_header_only(client):
    from vfio_user.wire import Command
    f = client.request(Command.DEVICE_RESET)
    assert f.header.size == 16 and f.payload == b""
