"""migration.dirty: byte maps per region, marks, read-and-clear reports at any page size."""
import errno

import pytest

from migration.dirty import DirtyLog, bitmap_size, map_size
from vfio_user.errors import ProtocolError

MB = 1 << 20


def make(*regions):
    log = DirtyLog()
    bufs = []
    for iova, size in regions:
        b = bytearray(map_size(iova, size))
        bufs.append(b)
        log.add(iova, size, memoryview(b))
    return log, bufs


def bits(bm: bytes) -> set[int]:
    n = int.from_bytes(bm, "little")
    return {i for i in range(len(bm) * 8) if n >> i & 1}


def test_mark_and_report_4k_read_and_clear():
    log, _ = make((0, 4 * MB))
    log.mark(0x1000, 1)
    log.mark(0x3FFF, 2)             # straddles pages 3 and 4
    log.mark(0x10000, 0x3000)       # pages 16..18
    assert log.dirty_pages() == {1, 3, 4, 16, 17, 18}
    bm = log.report(0, 4 * MB, 4096)
    assert len(bm) == bitmap_size(4 * MB, 4096) == 128
    assert bits(bm) == {1, 3, 4, 16, 17, 18}
    assert bits(log.report(0, 4 * MB, 4096)) == set()      # cleared


def test_fold_to_larger_and_smaller_pages():
    log, _ = make((0, 4 * MB))
    log.mark(0x5000, 8)             # page 5
    log.mark(0x200000, 1)           # page 512
    assert bits(log.report(0, 4 * MB, 1 << 16)) == {0, 32}
    log.mark(0x5000, 8)
    assert bits(log.report(0, 4 * MB, 1024)) == {20, 21, 22, 23}


def test_report_subrange_only_clears_its_pages():
    log, _ = make((0, MB))
    log.mark(0x1000, 1)
    log.mark(0x9000, 1)
    assert bits(log.report(0x8000, 0x8000, 4096)) == {1}
    assert log.dirty_pages() == {1}


def test_two_regions_and_unaligned_region_start():
    log, _ = make((0, MB), (MB, MB))
    log.mark(MB - 8, 16)            # spans both regions
    assert bits(log.report(0, 2 * MB, 4096)) == {255, 256}


def test_report_outside_logged_memory_refused():
    log, _ = make((0, MB), (2 * MB, MB))
    for iova, length in [(MB, 4096), (0, 3 * MB), (0x800, 4096), (0, 100), (0, 0)]:
        with pytest.raises(ProtocolError) as e:
            log.report(iova, length, 4096)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        log.report(0, MB, 3000)


def test_mark_outside_regions_is_ignored_and_remove():
    log, _ = make((MB, MB))
    log.mark(0, 4096)
    assert log.dirty_pages() == set()
    assert log.remove(MB) is not None and len(log) == 0
    log.mark(MB, 1)


def test_concurrent_mark_between_copy_and_clear_is_not_lost():
    """A page marked again after the report copied it stays reported or was reported."""
    log, bufs = make((0, MB))
    log.mark(0x2000, 1)
    # Simulate: copy happens, then a worker marks page 7 (not in the copy) before zeroing.
    m = log.regions()[0]
    orig = m.bm

    class View:
        def __getitem__(self, s):
            data = bytes(orig[s])
            if isinstance(s, slice):
                orig[7] = 1         # the "worker" marks page 7 right after our copy
            return data

        def __setitem__(self, s, v):
            orig[s] = v
    m.bm = View()
    assert bits(log.report(0, MB, 4096)) == {2}
    m.bm = orig
    assert log.dirty_pages() == {7}
