"""Dirty-page logging against a real daemon: the reports name exactly the pages the
device wrote while logging was on (v2 DMA_LOGGING_REPORT and v1 DIRTY_PAGES).

The guest here is synchronous (tests/migrig.py's connect + HostNvme), so the test knows
every page the device writes: read data, the CQ entries it posts (I/O and admin),
Identify data, EventIdx stores (shadow doorbells) - and the pages it must not report:
write payloads, SQs, PRP lists, anything untouched.
"""
from __future__ import annotations

import pytest

from benchmarks.hostnvme import HostNvme
from tests.migrig import connect
from vfio_user.client import GuestRam
from vfio_user.errors import ProtocolError
from vfio_user.messages import DmaUnmap, UnmapBitmap
from vfio_user.migdriver import V1Driver, V2Driver
from vfio_user.wire import Command, DmaUnmapFlag

RAM = 16 << 20
PAGE = 4096


def pages(bm: bytes) -> set[int]:
    n = int.from_bytes(bm, "little")
    out, i = set(), 0
    while n:
        if n & 1:
            out.add(i)
        n >>= 1
        i += 1
    return out


def cq_pages(q, first: int, count: int) -> set[int]:
    """Pages of CQ entries first..first+count-1 (mod depth)."""
    n = q.cq_entries
    return {(q.cq + ((first + k) % n) * 16) // PAGE for k in range(count)}


@pytest.fixture
def guest(mdaemon):
    ram = GuestRam(RAM)
    c = connect(mdaemon.socket, ram)
    nvme = HostNvme(c, ram)
    try:
        nvme.enable(depth=64)
        yield c, nvme, ram
    finally:
        nvme.close()
        c.close()
        ram.close()


@pytest.mark.parametrize("shadow", [False, True])
def test_v2_report_is_exactly_what_the_device_wrote(guest, shadow):
    c, nvme, ram = guest
    ei = None
    if shadow:
        _, ei = nvme.enable_shadow()
    q = nvme.create_io_queue(1, 512, cq_depth=512)          # 8 KiB CQ: two pages
    rbufs = [ram.alloc(PAGE) for _ in range(6)]
    wbufs = [ram.alloc(PAGE) for _ in range(6)]
    idbuf = ram.alloc(PAGE)
    drv = V2Driver(c)
    assert drv.log_start(4096) == 4096
    assert pages(drv.log_report(0, RAM)) == set()          # queue set-up was before START
    admin_first = nvme.queues[0].head
    for i in range(6):
        assert nvme.rw(1, True, 2, 8 * i, 8, wbufs[i]) == 0  # nsid 2: the file namespace
        assert nvme.rw(1, False, 2, 8 * i, 8, rbufs[i]) == 0
    assert nvme.admin(0x06, 0, idbuf, 0, (1,))[0] == 0    # Identify Controller
    want = {b // PAGE for b in rbufs} | {idbuf // PAGE}
    want |= cq_pages(q, 0, 12) | cq_pages(nvme.queues[0], admin_first, 1)
    if shadow:
        want.add(ei // PAGE)
    got = pages(drv.log_report(0, RAM))
    assert got == want, (sorted(got - want), sorted(want - got))
    assert pages(drv.log_report(0, RAM)) == set()          # read-and-clear
    # Folding: 64 KiB client pages, and a sub-range reports only its own pages.
    assert nvme.rw(1, False, 2, 0, 8, rbufs[0]) == 0
    bm = drv.log_report(0, RAM, 1 << 16)
    assert pages(bm) == {rbufs[0] >> 16, q.cq >> 16}
    drv.log_stop()
    with pytest.raises(ProtocolError):
        drv.log_report(0, RAM)                              # not logging any more
    assert nvme.rw(1, False, 2, 0, 8, rbufs[0]) == 0


def test_v1_dirty_pages_bitmap(guest):
    c, nvme, ram = guest
    q = nvme.create_io_queue(1, 64)
    rbuf, wbuf = ram.alloc(PAGE), ram.alloc(PAGE)
    drv = V1Driver(c)
    drv.dirty(1)                                           # START
    assert nvme.rw(1, True, 2, 0, 8, wbuf) == 0
    assert nvme.rw(1, False, 2, 0, 8, rbuf) == 0
    got = pages(drv.dirty_bitmap(0, RAM))
    assert got == {rbuf // PAGE} | cq_pages(q, 0, 2), sorted(got)
    drv.dirty(2)                                           # STOP
    drv.close()


def test_region_mapped_while_logging_is_logged(guest):
    c, nvme, ram = guest
    q = nvme.create_io_queue(1, 64)
    drv = V2Driver(c)
    drv.log_start()
    extra = nvme.add_region(RAM, 1 << 20)                 # a DMA_MAP while logging
    buf = extra.alloc(PAGE)
    assert nvme.rw(1, False, 2, 0, 8, buf) == 0
    assert pages(drv.log_report(RAM, 1 << 20)) == {(buf - RAM) // PAGE}
    assert pages(drv.log_report(0, RAM)) == cq_pages(q, 0, 1)
    drv.log_stop()


def test_v1_unmap_returns_the_regions_dirty_bitmap(guest):
    """DMA_UNMAP with GET_DIRTY_BITMAP (v1 era, reference §4.6): the region's marks come
    back with the unmap; bad requests are refused and leave the region mapped."""
    import errno
    c, nvme, ram = guest
    nvme.create_io_queue(1, 64)
    drv = V1Driver(c)
    extra = nvme.add_region(RAM, 1 << 20)
    try:
        bufs = [extra.alloc(PAGE) for _ in range(3)]
        with pytest.raises(ProtocolError) as e:               # logging is off
            drv.unmap_dirty(RAM, 1 << 20)
        assert e.value.errno == errno.EINVAL
        drv.dirty(1)                                           # START
        for b in bufs[:2]:
            assert nvme.rw(1, False, 2, 0, 8, b) == 0
        for bad in (dict(pgsize=3000), dict(pgsize=4096, size=1 << 19)):
            with pytest.raises(ProtocolError) as e:            # not a power of two / wrong size
                req = DmaUnmap(24 + 16 + 32, DmaUnmapFlag.GET_DIRTY_BITMAP, RAM,
                               bad.get("size", 1 << 20)).encode() + UnmapBitmap(bad["pgsize"], 32).encode()
                c.request(Command.DMA_UNMAP, req).close()
            assert e.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError) as e:                # no room for the bitmap
            req = DmaUnmap(40, DmaUnmapFlag.GET_DIRTY_BITMAP, RAM, 1 << 20).encode() + \
                UnmapBitmap(4096, 32).encode()
            c.request(Command.DMA_UNMAP, req).close()
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError):                     # with ALL: refused
            c.dma_unmap(0, 0, DmaUnmapFlag.ALL | DmaUnmapFlag.GET_DIRTY_BITMAP)
        # still mapped, still logged
        assert nvme.rw(1, False, 2, 0, 8, bufs[2]) == 0
        got = pages(drv.unmap_dirty(RAM, 1 << 20))
        assert got == {(b - RAM) // PAGE for b in bufs}, sorted(got)
        with pytest.raises(ProtocolError) as e:                # gone now
            c.dma_unmap(RAM, 1 << 20)
        assert e.value.errno in (errno.ENOENT, errno.EINVAL)
        drv.dirty(2)                                           # STOP
    finally:
        drv.close()
        extra.close()
