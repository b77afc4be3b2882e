"""DMA_UNMAP (3): exact ranges, ALL, device told before munmap."""
import errno

import pytest

from vfio_user.client import GuestRam
from vfio_user.errors import ProtocolError
from vfio_user.wire import DmaUnmapFlag


def test_unmap_exact(client, device, server):
    with GuestRam(1 << 16) as ram:
        client.dma_map(0x10000, 1 << 16, ram.fd)
        r = client.dma_unmap(0x10000, 1 << 16)
        client.get_device_info()   # resume runs after the reply, before the next request
        assert (r.address, r.size, r.flags) == (0x10000, 1 << 16, 0)
        assert device.events[-3:] == [("quiesce",), ("unmap", 0x10000, 1 << 16), ("resume",)]
        assert server.call(lambda: len(device.session.memory)) == 0


def test_unmap_unknown_and_partial(client):
    with GuestRam(1 << 16) as ram:
        client.dma_map(0x10000, 1 << 16, ram.fd)
        with pytest.raises(ProtocolError) as e:
            client.dma_unmap(0x20000, 4096)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(ProtocolError) as e:
            client.dma_unmap(0x10000, 4096)
        assert e.value.errno == errno.EINVAL


def test_unmap_all(client, device, server):
    with GuestRam(1 << 16) as ram:
        client.dma_map(0x0, 1 << 15, ram.fd)
        client.dma_map(0x100000, 1 << 15, ram.fd, 1 << 15)
        client.dma_map(0xC0000, 0x40000, None)
        client.dma_unmap(0, 0, DmaUnmapFlag.ALL)
        assert sorted(e[1] for e in device.events if e[0] == "unmap") == [0, 0xC0000, 0x100000]
        assert server.call(lambda: len(device.session.memory)) == 0
        # The range is free again.
        client.dma_map(0x0, 1 << 15, ram.fd)


def test_unmap_all_needs_zero_range(client):
    with pytest.raises(ProtocolError) as e:
        client.dma_unmap(0x1000, 0, DmaUnmapFlag.ALL)
    assert e.value.errno == errno.EINVAL


def test_dirty_bitmap_flag_without_its_descriptor_refused(client):
    with GuestRam(4096) as ram:
        client.dma_map(0, 4096, ram.fd)
        with pytest.raises(ProtocolError) as e:
            client.dma_unmap(0, 4096, DmaUnmapFlag.GET_DIRTY_BITMAP)
        assert e.value.errno == errno.EINVAL


def test_unexpected_fd_on_unmap_closed_and_served(client):
    # SPDK's client attaches the memory fd to DMA_UNMAP too: close it, serve the unmap.
    from vfio_user.messages import DmaUnmap
    from vfio_user.wire import Command
    with GuestRam(4096) as ram:
        client.dma_map(0, 4096, ram.fd)
        f = client.request(Command.DMA_UNMAP, DmaUnmap(24, 0, 0, 4096).encode(), [ram.fd])
        assert DmaUnmap.decode(f.payload).size == 4096
