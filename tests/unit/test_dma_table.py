"""The pure DMA region table."""
import errno

import pytest

from vfio_user.dma import DmaTable
from vfio_user.errors import ProtocolError


def _err(fn, *a):
    with pytest.raises(ProtocolError) as e:
        fn(*a)
    return e.value.errno


def test_add_find_remove():
    t = DmaTable()
    t.add(0x10000, 0x4000, True, True, "a")
    t.add(0x0, 0x1000, True, False, "b")
    e, off = t.find(0x10010, 0x10)
    assert e.handle == "a" and off == 0x10
    e, off = t.find(0x0, 0x1000)
    assert e.handle == "b" and off == 0
    assert t.remove(0x10000, 0x4000).handle == "a"
    assert len(t) == 1
    assert [x.handle for x in t.remove_all()] == ["b"]
    assert len(t) == 0


def test_overlaps_refused_with_eexist():
    t = DmaTable()
    t.add(0x10000, 0x4000, True, True)
    for iova, size in [(0x10000, 0x1000), (0xf000, 0x2000), (0x13000, 0x1000),
                       (0x0, 0x100000), (0x12000, 0x10000)]:
        assert _err(t.add, iova, size, True, True) == errno.EEXIST
    t.add(0x14000, 0x1000, True, True)   # adjacent is fine
    t.add(0xf000, 0x1000, True, True)


def test_bad_ranges_einval():
    t = DmaTable()
    assert _err(t.add, 0, 0, True, True) == errno.EINVAL
    assert _err(t.add, 0x100, 0x1000, True, True) == errno.EINVAL
    assert _err(t.add, 0, 0x1001, True, True) == errno.EINVAL
    assert _err(t.add, -4096, 0x1000, True, True) == errno.EINVAL
    # A range ending past 2^64 must not wrap into low memory.
    assert _err(t.add, (1 << 64) - 0x1000, 0x2000, True, True) == errno.EINVAL
    t.add((1 << 64) - 0x1000, 0x1000, True, True)   # ending exactly at 2^64 fits
    assert _err(t.find, (1 << 64) - 0x10, 0x20) == errno.EFAULT


def test_remove_errors():
    t = DmaTable()
    t.add(0x1000, 0x2000, True, True)
    assert _err(t.remove, 0x2000, 0x1000) == errno.ENOENT
    assert _err(t.remove, 0x1000, 0x1000) == errno.EINVAL
    assert len(t) == 1


def test_find_refuses_gaps_and_crossing():
    t = DmaTable()
    t.add(0x1000, 0x1000, True, True)
    t.add(0x2000, 0x1000, True, True)
    assert _err(t.find, 0x0, 1) == errno.EFAULT
    assert _err(t.find, 0x1ff0, 0x20) == errno.EFAULT   # crosses into the next region
    assert _err(t.find, 0x3000, 1) == errno.EFAULT
    assert _err(t.find, 0x1000, -1) == errno.EFAULT
    assert t.find(0x2fff, 1)[1] == 0xfff


def test_max_regions():
    t = DmaTable(max_regions=2)
    t.add(0, 4096, True, True)
    t.add(4096, 4096, True, True)
    assert _err(t.add, 8192, 4096, True, True) == errno.ENOSPC
