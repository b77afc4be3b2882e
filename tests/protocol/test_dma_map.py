"""DMA_MAP (2): fd-backed and fd-less maps, quiesce bracketing, refusals."""
import errno

import pytest

from vfio_user.client import GuestRam
from vfio_user.errors import ProtocolError
from vfio_user.messages import DmaMap
from vfio_user.wire import Command, DmaMapFlag

RW = DmaMapFlag.READ | DmaMapFlag.WRITE


def test_map_with_fd_shares_memory(client, device, server):
    with GuestRam(1 << 20) as ram:
        client.dma_map(0x100000, 1 << 20, ram.fd, 0, RW)
        client.get_device_info()   # resume runs after the reply, before the next request
        assert device.events[-3:] == [("quiesce",), ("map", 0x100000, 1 << 20, True, True, True),
                                      ("resume",)]
        ram.mm[0x10:0x14] = b"ping"
        assert server.call(lambda: device.session.memory.read(0x100010, 4)) == b"ping"
        server.call(lambda: device.session.memory.write(0x100020, b"pong"))
        assert ram.mm[0x20:0x24] == b"pong"


def test_map_at_file_offset(client, device, server):
    with GuestRam(3 * 4096) as ram:
        ram.mm[8192:8196] = b"page"
        client.dma_map(0x0, 4096, ram.fd, 8192, RW)
        assert server.call(lambda: device.session.memory.read(0, 4)) == b"page"


def test_rom_without_fd_read_only(client, device, server):
    client.dma_map(0xFFFC0000, 0x40000, None, 0, DmaMapFlag.READ)
    assert ("map", 0xFFFC0000, 0x40000, False, True, False) in device.events

    def probe():
        from nvme.memory import NeedsMessageDma, DmaFault
        mem = device.session.memory
        out = []
        for write in (False, True):
            try:
                mem.view(0xFFFC0000, 16, write)
            except NeedsMessageDma:
                out.append("message")
            except DmaFault:
                out.append("fault")
        return out
    assert server.call(probe) == ["message", "fault"]


def test_overlap_eexist(client):
    with GuestRam(1 << 16) as ram:
        client.dma_map(0x10000, 1 << 16, ram.fd)
        with pytest.raises(ProtocolError) as e:
            client.dma_map(0x18000, 1 << 16, ram.fd)
        assert e.value.errno == errno.EEXIST


def test_past_end_of_fd_einval(client, device):
    with GuestRam(1 << 16) as ram:
        with pytest.raises(ProtocolError) as e:
            client.dma_map(0, 1 << 17, ram.fd)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError):
            client.dma_map(0, 1 << 16, ram.fd, offset=4096)
    assert not [ev for ev in device.events if ev[0] == "map"]


@pytest.mark.parametrize("iova,size,flags", [
    (0, 0, RW), (0x100, 4096, RW), (0, 4096, 0x10), (0, 4096, 0),
    ((1 << 64) - 4096, 8192, RW)])
def test_bad_maps_einval(client, iova, size, flags):
    with pytest.raises(ProtocolError) as e:
        client.dma_map(iova, size, None, 0, flags)
    assert e.value.errno == errno.EINVAL


def test_two_fds_refused(client):
    with GuestRam(4096) as a, GuestRam(4096) as b:
        with pytest.raises(ProtocolError) as e:
            client.request(Command.DMA_MAP, DmaMap(32, RW, 0, 0, 4096).encode(), [a.fd, b.fd])
        assert e.value.errno == errno.EINVAL


def test_quiesce_failure_refuses_map(client, device):
    device.quiesce_error = errno.EBUSY
    with GuestRam(4096) as ram:
        with pytest.raises(ProtocolError) as e:
            client.dma_map(0, 4096, ram.fd)
    assert e.value.errno == errno.EBUSY
    assert not [ev for ev in device.events if ev[0] == "map"]
