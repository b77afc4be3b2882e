"""MappedGuestMemory.view's last-hit cache never serves a stale or out-of-range view.

view() remembers the region of its last hit; these tests alternate regions, unmap and
remap under it, and ask for ranges that only partly overlap the cached region, over
real memfds (vfio_user.client.GuestRam).
"""
import os

import pytest

from nvme.memory import DmaFault, NeedsMessageDma
from reactor.guestmem import MappedGuestMemory
from vfio_user.client import GuestRam

pytestmark = pytest.mark.timeout(20)

A, B = 0x100000, 0x400000
SIZE = 1 << 20


@pytest.fixture
def two():
    ra, rb = GuestRam(SIZE), GuestRam(SIZE)
    m = MappedGuestMemory()
    m.map(A, SIZE, 0, ra.fd, True, True)
    m.map(B, SIZE, 0, rb.fd, True, True)
    ra.mm[0:4] = b"AAAA"
    rb.mm[0:4] = b"BBBB"
    yield m, ra, rb
    m.unmap_all()
    ra.close()
    rb.close()


def test_alternating_regions_get_their_own_data(two):
    m, ra, rb = two
    for _ in range(3):
        assert bytes(m.view(A, 4)) == b"AAAA"
        assert bytes(m.view(B, 4)) == b"BBBB"
    # Writes through a cached region land in that region's fd.
    m.view(A + 8, 4, write=True)[:] = b"wa!!"
    m.view(B + 8, 4, write=True)[:] = b"wb!!"
    assert ra.mm[8:12] == b"wa!!" and rb.mm[8:12] == b"wb!!"


def test_read_views_are_read_only_and_write_views_writable_on_hits(two):
    m, _, _ = two
    for _ in range(2):
        r = m.view(A, 16)
        w = m.view(A, 16, write=True)
        assert r.readonly and not w.readonly
        with pytest.raises(TypeError):
            r[0] = 1


def test_unmap_drops_the_cached_region(two):
    m, ra, _ = two
    assert bytes(m.view(A, 4)) == b"AAAA"       # A is now the cached hit
    m.unmap(A, SIZE)
    with pytest.raises(DmaFault):
        m.view(A, 4)
    # A new fd mapped at the same address is what later views see.
    rc = GuestRam(SIZE)
    try:
        rc.mm[0:4] = b"CCCC"
        m.map(A, SIZE, 0, rc.fd, True, True)
        assert bytes(m.view(A, 4)) == b"CCCC"
        m.unmap(A, SIZE)
    finally:
        rc.close()


def test_unmap_all_drops_the_cached_region(two):
    m, _, _ = two
    assert bytes(m.view(B, 4)) == b"BBBB"
    m.unmap_all()
    with pytest.raises(DmaFault):
        m.view(B, 4)


def test_ranges_leaving_the_cached_region_are_refused(two):
    m, _, _ = two
    m.view(A, 4)                                 # cache A
    with pytest.raises(DmaFault):
        m.view(A + SIZE - 4, 8)                  # runs past A's end
    with pytest.raises(DmaFault):
        m.view(A - 4, 8)                         # starts before A
    with pytest.raises(DmaFault):
        m.view(A + 16, -8)                       # negative length: no reversed slice
    with pytest.raises(DmaFault):
        m.view((1 << 64) - 4, 8)                 # past 2^64, never wrapped
    assert len(m.view(A + SIZE - 4, 4)) == 4     # the last bytes are still fine
    assert len(m.view(A, 0)) == 0


def test_permissions_are_checked_on_cache_hits():
    ram = GuestRam(SIZE)
    ro = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY)
    m = MappedGuestMemory()
    try:
        m.map(0, SIZE, 0, ro, True, False)
        assert len(m.view(0, 4)) == 4            # cache the read-only region
        with pytest.raises(DmaFault):
            m.view(0, 4, write=True)
        m.map(2 * SIZE, SIZE, 0, None, True, True)   # no fd: message DMA only
        for _ in range(2):
            with pytest.raises(NeedsMessageDma):
                m.view(2 * SIZE, 4)
    finally:
        m.unmap_all()
        os.close(ro)
        ram.close()


def test_unmap_with_a_live_view_keeps_pages_but_refuses_new_views(two):
    m, ra, _ = two
    v = m.view(A, 4)                             # a caller still holds this one
    m.unmap(A, SIZE)
    assert m.zombies, "the mapping must stay parked while a view is alive"
    with pytest.raises(DmaFault):
        m.view(A, 4)
    assert bytes(v) == b"AAAA"                   # the parked pages are still mapped
    v.release()
    assert m.collect() == 0
