"""The PCI function's configuration space."""
import errno
import struct

import pytest

from pci.config import CONFIG_SIZE, PciConfig, PciIds
from vfio_user.errors import ProtocolError


def u16(c, off):
    return struct.unpack("<H", c.read(off, 2))[0]


def u32(c, off):
    return struct.unpack("<I", c.read(off, 4))[0]


def test_header_fields():
    c = PciConfig()
    assert (u16(c, 0), u16(c, 2)) == (0x4E56, 0x0001)
    assert (u16(c, 0x2C), u16(c, 0x2E)) == (0x4E56, 0x0001)
    assert c.read(0x09, 3) == bytes((0x02, 0x08, 0x01))
    assert c.read(0x0E, 1) == b"\0"
    assert c.read(0x3D, 1) == b"\x01"
    assert u16(c, 0x06) & 0x10
    ids = PciConfig(ids=PciIds(vendor_id=0x1234, device_id=0x5678, subsystem_id=0x9))
    assert (u16(ids, 0), u16(ids, 2), u16(ids, 0x2C), u16(ids, 0x2E)) == (0x1234, 0x5678, 0x1234, 9)


def test_bar_sizing():
    c = PciConfig(bar0_size=0x8000, msix_vectors=300)
    assert u32(c, 0x10) & 0xF == 0x4            # 64-bit, non-prefetchable memory
    for off in (0x10, 0x14, 0x20, 0x24):
        c.write(off, b"\xff\xff\xff\xff")
    lo, hi = u32(c, 0x10), u32(c, 0x14)
    assert lo == 0xFFFF8004 and hi == 0xFFFFFFFF
    assert (~(hi << 32 | (lo & ~0xF)) + 1) & (2 ** 64 - 1) == 0x8000
    assert ((~u32(c, 0x20) & 0xFFFFFFFF) | 0xF) + 1 == c.msix_table_size == 0x2000
    assert ((~u32(c, 0x24) & 0xFFFFFFFF) | 0xF) + 1 == c.msix_pba_size == 0x1000
    c.write(0x10, struct.pack("<I", 0xFEBF0000))
    c.write(0x14, b"\0\0\0\0")
    assert c.bar0_address == 0xFEBF0000
    assert u32(c, 0x18) == 0 and u32(c, 0x30) == 0      # BAR2, ROM: absent


def test_command_register_mask_and_properties():
    c = PciConfig()
    c.write(0x04, b"\xff\xff")
    assert u16(c, 0x04) == 0x0547
    assert c.bus_master and c.intx_disabled and c.memory_enabled
    c.write(0x04, b"\x02\x00")
    assert not c.bus_master and not c.intx_disabled


def test_capability_chain():
    c = PciConfig(msix_vectors=32)
    ptr, seen = c.read(0x34, 1)[0], []
    while ptr:
        seen.append((ptr, c.read(ptr, 1)[0]))
        ptr = c.read(ptr + 1, 1)[0]
    assert seen == [(0x40, 0x01), (0x50, 0x11), (0x60, 0x10)]
    assert u16(c, 0x52) & 0x7FF == 31
    assert u32(c, 0x54) == 4 and u32(c, 0x58) == 5
    assert u16(c, 0x62) == 0x0002
    assert c.read(0x100, 4) == b"\0\0\0\0" and c.read(0xFFC, 4) == b"\0\0\0\0"


def test_msix_control_bits():
    c = PciConfig(msix_vectors=8)
    c.write(0x52, b"\xff\xff")
    assert u16(c, 0x52) == 0xC007                  # table size read-only
    assert c.msix_enabled and c.msix_masked
    c.write(0x53, b"\x80")
    assert c.msix_enabled and not c.msix_masked


def test_read_only_ids_and_caps():
    c = PciConfig()
    before = c.read(0, 0x100)
    for off in (0x00, 0x08, 0x2C, 0x34, 0x3D, 0x40, 0x54, 0x60, 0x62):
        c.write(off, b"\xff")
    after = c.read(0, 0x100)
    assert after == before


def test_access_widths():
    c = PciConfig()
    for off, data in [(0, b"\0" * 3), (0, b"\0" * 8), (0xFFF, b"\0\0"), (CONFIG_SIZE, b"\0")]:
        with pytest.raises(ProtocolError) as e:
            c.write(off, data)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        c.read(0xFFE, 4)
    with pytest.raises(ProtocolError):
        c.read(0, 0)
    c.write(0x3C, b"\x0b")
    c.write(0xFFE, b"\0\0")                        # unaligned is fine inside the space
    assert c.read(0x3C, 1) == b"\x0b"


def test_reset_restores_power_on():
    c = PciConfig()
    image = c.snapshot()
    c.write(0x04, b"\x06\x04")
    c.write(0x10, b"\xff\xff\xff\xff")
    c.write(0x53, b"\x80")
    c.reset()
    assert c.snapshot() == image and not c.msix_enabled


def test_bar0_must_be_16k():
    with pytest.raises(ValueError):
        PciConfig(bar0_size=0x2000)
