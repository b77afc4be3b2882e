"""Unknown flag bits are refused (found by the property tests, issue 12).

On Python 3.11 `~` of an IntFlag keeps only the class's own members, so
`flags & ~(READ | WRITE)` was always 0 and DMA_MAP/DMA_UNMAP accepted any flag bit.
"""
import errno

import pytest

from vfio_user.client import GuestRam
from vfio_user.errors import ProtocolError
from vfio_user.wire import DmaMapFlag

RW = DmaMapFlag.READ | DmaMapFlag.WRITE


@pytest.mark.parametrize("extra", [0x4, 0x40, 0x8000_0000])
def test_dma_map_unknown_flag_einval(client, device, extra):
    with GuestRam(1 << 16) as ram:
        with pytest.raises(ProtocolError) as e:
            client.dma_map(0, 1 << 16, ram.fd, 0, RW | extra)
        assert e.value.errno == errno.EINVAL
    assert not [ev for ev in device.events if ev[0] == "map"]


@pytest.mark.parametrize("flags", [0x4, 0x40, 0x8000_0000])
def test_dma_unmap_unknown_flag_einval(client, flags):
    with GuestRam(1 << 16) as ram:
        client.dma_map(0, 1 << 16, ram.fd)
        with pytest.raises(ProtocolError) as e:
            client.dma_unmap(0, 1 << 16, flags)
        assert e.value.errno == errno.EINVAL
        client.dma_unmap(0, 1 << 16)            # still mapped: the bad unmap did nothing
