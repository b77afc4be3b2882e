"""MappedGuestMemory over real memfds."""
import errno
import os

import pytest

from nvme.memory import DmaFault, NeedsMessageDma
from reactor.guestmem import MappedGuestMemory
from vfio_user.client import GuestRam
from vfio_user.errors import ProtocolError


@pytest.fixture
def ram():
    r = GuestRam(1 << 20)
    yield r
    r.close()


def test_views_share_memory(ram):
    m = MappedGuestMemory()
    m.map(0x100000, 1 << 20, 0, ram.fd, True, True)
    ram.mm[0x1234:0x1238] = b"abcd"
    with m.view(0x101234, 4) as v:
        assert bytes(v) == b"abcd" and v.readonly
    with m.view(0x101000, 4, write=True) as v:
        v[:] = b"wxyz"
    assert ram.mm[0x1000:0x1004] == b"wxyz"
    m.unmap_all()


def test_offset_not_on_granularity(ram):
    m = MappedGuestMemory()
    ram.mm[0x3000:0x3004] = b"off3"
    m.map(0, 0x2000, 0x3000, ram.fd, True, True)
    assert m.read(0, 4) == b"off3"
    m.unmap(0, 0x2000)


def test_map_past_end_of_fd_refused(ram):
    m = MappedGuestMemory()
    with pytest.raises(ProtocolError) as e:
        m.map(0, 2 << 20, 0, ram.fd, True, True)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        m.map(0, 1 << 20, 4096, ram.fd, True, True)
    assert len(m) == 0
    m.map(0, 1 << 20, 0, ram.fd, True, True)     # the range was not left reserved
    m.unmap_all()


def test_read_only_region_refuses_write_views(ram):
    m = MappedGuestMemory()
    ro = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY)
    try:
        m.map(0, 1 << 20, 0, ro, True, False)
        assert bytes(m.view(0, 4)) == b"\0\0\0\0"
        with pytest.raises(DmaFault):
            m.view(0, 4, write=True)
        m.unmap_all()
    finally:
        os.close(ro)


def test_writable_map_of_read_only_fd_refused(ram):
    m = MappedGuestMemory()
    ro = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY)
    try:
        with pytest.raises(ProtocolError):
            m.map(0, 1 << 20, 0, ro, True, True)
        assert len(m) == 0
    finally:
        os.close(ro)


def test_faults(ram):
    m = MappedGuestMemory()
    m.map(0x10000, 0x10000, 0, ram.fd, True, True)
    m.map(0x20000, 0x10000, 0, None, True, True)
    for addr, n in [(0, 4), (0x1FFFE, 4), (0x30000, 1), (-1, 1), ((1 << 64) - 2, 4)]:
        with pytest.raises(DmaFault) as e:
            m.view(addr, n)
        assert not isinstance(e.value, NeedsMessageDma)
    with pytest.raises(NeedsMessageDma):
        m.view(0x20000, 4)
    m.unmap_all()


def test_unmap_with_outstanding_view_parks_mapping(ram):
    m = MappedGuestMemory()
    m.map(0, 1 << 20, 0, ram.fd, True, True)
    v = m.view(0, 16, write=True)
    m.unmap(0, 1 << 20)
    with pytest.raises(DmaFault):
        m.view(0, 16)
    assert len(m.zombies) == 1
    v[0:4] = b"safe"                 # still mapped: no use-after-munmap
    assert ram.mm[0:4] == b"safe"
    v.release()
    assert m.collect() == 0


def test_unsealed_memfd_refused_files_flagged(ram, tmp_path):
    m = MappedGuestMemory()
    m.map(0, 4096, 0, ram.fd, True, True)        # GuestRam seals against shrinking
    assert not m.mapping_at(0).shrinkable
    for flags in (0, os.MFD_ALLOW_SEALING):       # sealing impossible / possible but not done
        fd = os.memfd_create("unsealed", flags)
        os.ftruncate(fd, 4096)
        with pytest.raises(ProtocolError) as e:
            m.map(0x1000, 4096, 0, fd, True, True)
        os.close(fd)
        assert e.value.errno == errno.EINVAL and "F_SEAL_SHRINK" in str(e.value)
        assert len(m.table) == 1                  # the refused map left nothing behind
    path = tmp_path / "ram.img"                   # a file cannot carry seals: accepted, flagged
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    m.map(0x1000, 4096, 0, fd, True, True)
    os.close(fd)                                  # the mapping keeps its own reference
    assert m.mapping_at(0x1000).shrinkable
    assert m.read(0x1000, 4) == b"\0\0\0\0"
    # A tmpfs file (QEMU memory-backend-file on /dev/shm; hugetlbfs files behave alike)
    # answers F_GET_SEALS with "cannot be sealed", like a memfd, but it is a file: flagged.
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR)
    os.ftruncate(fd, 4096)
    m.map(0x2000, 4096, 0, fd, True, True)
    os.close(fd)
    assert m.mapping_at(0x2000).shrinkable
    m.unmap_all()


def test_errors_from_table(ram):
    m = MappedGuestMemory()
    m.map(0, 4096, 0, ram.fd, True, True)
    with pytest.raises(ProtocolError) as e:
        m.map(0, 4096, 0, ram.fd, True, True)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(ProtocolError) as e:
        m.unmap(4096, 4096)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ProtocolError):
        m.map(0x1000, 4096, 0, None, False, False)
    m.unmap_all()
