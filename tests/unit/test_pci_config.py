import pytest

from pci.config import CAP_MSIX, PciConfig
from vfio_user.errors import ProtocolError


def rd(c, off, n):
    return int.from_bytes(c.read(off, n), "little")


def test_identity_and_class():
    c = PciConfig()
    assert rd(c, 0, 2) == 0x4E56
    assert c.read(0x09, 3) == bytes([0x02, 0x08, 0x01])
    assert rd(c, 0x3D, 1) == 1


def test_capability_chain_pm_msix_pcie():
    c = PciConfig(msix_vectors=32)
    ids = []
    p = rd(c, 0x34, 1)
    while p:
        ids.append(rd(c, p, 1))
        p = rd(c, p + 1, 1)
    assert ids == [0x01, 0x11, 0x10]
    assert rd(c, CAP_MSIX + 2, 2) & 0x7FF == 31
    assert rd(c, CAP_MSIX + 4, 4) == 4 and rd(c, CAP_MSIX + 8, 4) == 5


def test_bar_sizing_and_readonly_flags():
    c = PciConfig(bar0_size=0x4000)
    c.write(0x10, b"\xff\xff\xff\xff")
    assert rd(c, 0x10, 4) == 0xFFFFC004   # size mask, 64-bit memory BAR flags kept
    c.write(0x14, b"\xff\xff\xff\xff")
    assert rd(c, 0x14, 4) == 0xFFFFFFFF
    c.write(0x00, b"\x00\x00")            # vendor id is read-only
    assert rd(c, 0, 2) == 0x4E56


def test_command_bits_and_msix_enable():
    c = PciConfig()
    c.write(0x04, (0x0406).to_bytes(2, "little"))
    assert c.intx_disabled and c.bus_master
    c.write(CAP_MSIX + 3, b"\x80")
    assert c.msix_enabled
    c.reset()
    assert not c.msix_enabled and not c.intx_disabled


@pytest.mark.parametrize("off,n", [(-1, 4), (0xFFE, 4), (0, 0), (0x1000, 1)])
def test_out_of_range_refused(off, n):
    c = PciConfig()
    with pytest.raises(ProtocolError):
        c.read(off, n)
