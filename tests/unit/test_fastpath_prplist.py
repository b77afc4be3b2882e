"""IoExecutor's one-view fast path for PRP lists of contiguous pages.

A Read/Write whose PRP list describes one physically contiguous buffer is served
with one view and one backend copy (`nvme.prp.list_is_contiguous` decides).  Every
other list (scattered, chained, unreadable, misaligned, near 2^64) must give exactly
the general path's result: data in the right guest pages or the spec's status.
"""
import struct

import pytest

from backends.ram import RamBackend
from nvme.io import IoExecutor
from nvme.io.opcodes import NAMESPACE_WRITE_PROTECTED
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from nvme.prp import list_is_contiguous
from nvme.status import Status

pytestmark = pytest.mark.timeout(20)

P = 4096
RAM = 0x200000
NPAGES = 96
LIST = RAM + 90 * P          # PRP lists live here
IO = 128 * 1024              # 32 pages: PRP1 + a list of 31 entries
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(IO))


def sqe(opc, prp1, prp2, slba=0, nbytes=IO, nsid=1, cid=1):
    return memoryview(bytearray(struct.pack("<BBHIQQQQ6I", opc, 0, cid, nsid, 0, 0, prp1, prp2,
                                            slba, 0, nbytes // 512 - 1, 0, 0, 0))).cast("I")


@pytest.fixture
def be():
    b = RamBackend.create(1 << 20, name_prefix=f"vnvmed-prpl-{id(object())}")
    yield b
    b.destroy()


def make(backend, read_only=False, split_at=None):
    """Guest RAM at RAM; with split_at, two adjacent regions meeting at that page."""
    ram = bytearray(NPAGES * P)
    mem = FlatMemory()
    if split_at is None:
        mem.add(RAM, ram)
    else:
        mv = memoryview(ram)
        mem.add(RAM, mv[:split_at * P])
        mem.add(RAM + split_at * P, mv[split_at * P:])
    ns = {1: Namespace.for_backend(1, backend, read_only=read_only)}
    return ram, mem, IoExecutor(ns, mem, 1 << 20)


def put_list(ram, addr, entries):
    off = addr - RAM
    ram[off:off + 8 * len(entries)] = struct.pack(f"<{len(entries)}Q", *entries)


def test_contiguous_list_read_and_write_move_the_data(be):
    ram, mem, ex = make(be)
    buf = RAM + 4 * P
    put_list(ram, LIST, [buf + P * i for i in range(1, 32)])
    assert list_is_contiguous(mem, LIST, buf + P, 31)
    ram[4 * P:4 * P + IO] = PATTERN
    assert ex.execute(sqe(0x01, buf, LIST, slba=16)) == (0, 0)
    assert be._mv[16 * 512:16 * 512 + IO] == PATTERN
    ram[4 * P:4 * P + IO] = bytes(IO)
    assert ex.execute(sqe(0x02, buf, LIST, slba=16)) == (0, 0)
    assert ram[4 * P:4 * P + IO] == PATTERN
    assert ex.io == [1, 1, IO, IO]
    assert ex._one[0].nbytes == 0, "the fast path must not keep a view of guest memory"


def test_first_page_offset_and_short_tail(be):
    """PRP1 mid-page: the list then covers the rest, the last page partly."""
    ram, mem, ex = make(be)
    be._mv[0:IO] = PATTERN
    buf = RAM + 4 * P + 512
    put_list(ram, LIST, [RAM + 5 * P + P * i for i in range(32)])
    assert ex.execute(sqe(0x02, buf, LIST)) == (0, 0)
    assert ram[4 * P + 512:4 * P + 512 + IO] == PATTERN
    assert ram[4 * P:4 * P + 512] == bytes(512) and ram[4 * P + 512 + IO] == 0


def test_scattered_list_still_lands_in_the_right_pages(be):
    ram, mem, ex = make(be)
    be._mv[0:IO] = PATTERN
    pages = [RAM + P * (50 + ((i * 13) % 35)) for i in range(32)]     # 32 distinct pages
    assert len(set(pages)) == 32
    put_list(ram, LIST, pages[1:])
    assert not list_is_contiguous(mem, LIST, pages[1], 31)
    assert ex.execute(sqe(0x02, pages[0], LIST)) == (0, 0)
    for i, a in enumerate(pages):
        assert ram[a - RAM:a - RAM + P] == PATTERN[i * P:(i + 1) * P]


def test_one_entry_out_of_place_is_not_contiguous(be):
    ram, mem, ex = make(be)
    be._mv[0:IO] = PATTERN
    buf = RAM + 4 * P
    ents = [buf + P * i for i in range(1, 32)]
    ents[17] = RAM + 60 * P
    put_list(ram, LIST, ents)
    assert not list_is_contiguous(mem, LIST, buf + P, 31)
    assert ex.execute(sqe(0x02, buf, LIST)) == (0, 0)
    assert ram[60 * P:61 * P] == PATTERN[18 * P:19 * P]
    assert ram[(4 + 18) * P:(4 + 19) * P] == bytes(P)      # the skipped page is untouched


def test_list_that_needs_chaining_goes_the_general_way(be):
    """A list starting 8 bytes before the end of its page holds one slot: chained."""
    ram, mem, ex = make(be)
    be._mv[0:IO] = PATTERN
    buf = RAM + 4 * P
    lst = RAM + 91 * P - 8
    assert not list_is_contiguous(mem, lst, buf + P, 31)
    ram[lst - RAM:lst - RAM + 8] = struct.pack("<Q", RAM + 92 * P)      # chain pointer
    put_list(ram, RAM + 92 * P, [buf + P * i for i in range(1, 32)])
    assert ex.execute(sqe(0x02, buf, lst)) == (0, 0)
    assert ram[4 * P:4 * P + IO] == PATTERN


def test_contiguous_run_across_two_regions_is_split(be):
    ram, mem, ex = make(be, split_at=20)
    be._mv[0:IO] = PATTERN
    buf = RAM + 4 * P                       # pages 4..35 cross the boundary at 20
    put_list(ram, LIST, [buf + P * i for i in range(1, 32)])
    assert list_is_contiguous(mem, LIST, buf + P, 31)
    assert ex.execute(sqe(0x02, buf, LIST)) == (0, 0)
    assert ram[4 * P:4 * P + IO] == PATTERN


def test_bad_lists_get_the_general_path_status(be):
    ram, mem, ex = make(be)
    buf = RAM + 4 * P
    put_list(ram, LIST, [buf + P * i for i in range(1, 32)])
    assert ex.execute(sqe(0x02, buf, LIST + 4))[0] == Status.INVALID_PRP_OFFSET    # not qword aligned
    assert ex.execute(sqe(0x02, buf, 0x10))[0] == Status.DATA_TRANSFER_ERROR      # list unmapped
    assert not list_is_contiguous(mem, 0x10, buf + P, 31)
    put_list(ram, LIST, [buf + P * i + 8 for i in range(1, 32)])                  # entries with offsets
    assert ex.execute(sqe(0x02, buf, LIST))[0] == Status.INVALID_PRP_OFFSET
    # Data pages near 2^64: the big-int identity never holds with a carry.
    top = (1 << 64) - 4 * P
    put_list(ram, LIST, [(top + P * i) & ((1 << 64) - 1) for i in range(31)])
    assert not list_is_contiguous(mem, LIST, top, 31)
    assert ex.execute(sqe(0x02, top - P, LIST))[0] == Status.DATA_TRANSFER_ERROR


def test_write_protected_before_the_data_pointer(be):
    ram, mem, ex = make(be, read_only=True)
    buf = RAM + 4 * P
    put_list(ram, LIST, [buf + P * i for i in range(1, 32)])
    assert ex.execute(sqe(0x01, buf, LIST))[0] == NAMESPACE_WRITE_PROTECTED
    assert ex.execute(sqe(0x01, buf, 0x10))[0] == NAMESPACE_WRITE_PROTECTED      # list unmapped
    assert ex.execute(sqe(0x02, buf, LIST)) == (0, 0)
