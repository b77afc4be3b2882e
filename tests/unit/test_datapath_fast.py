"""The data path's fast paths give exactly the general path's answers.

IoExecutor has a Read/Write single-page fast path, QueueRunner posts CQEs inline,
prp_pages checks whole PRP list pages for contiguity at once, the null backend
zero-fills from cached views.  Each test drives the fast path and checks the
observable result (status, data in guest memory, CQE words) against the spec.
"""
import struct

import pytest

from backends.null import NullBackend
from backends.ram import RamBackend
from nvme.doorbell import Doorbells
from nvme.errors import CommandError
from nvme.io import IoExecutor
from nvme.io.opcodes import NAMESPACE_WRITE_PROTECTED
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from nvme.prp import prp_pages
from tests.unit.datapaths import runner
from nvme.state import CqState, ShadowDoorbells, SqState
from nvme.status import Status

pytestmark = pytest.mark.timeout(20)

P = 4096
RAM = 0x200000
NPAGES = 80


def sqe(opc, nsid=1, prp1=0, prp2=0, slba=0, nlb=1, cid=7, flags=0, cdw12_hi=0):
    return memoryview(bytearray(struct.pack("<BBHIQQQQ6I", opc, flags, cid, nsid, 0, 0, prp1, prp2,
                                            slba & 0xFFFFFFFF, slba >> 32,
                                            ((nlb - 1) & 0xFFFF) | cdw12_hi, 0, 0, 0))).cast("I")


@pytest.fixture
def ram_ns():
    be = RamBackend.create(1 << 20, name_prefix=f"vnvmed-fast-{id(object())}")
    yield be
    be.destroy()


def make(backend, ro_region=False, mdts=1 << 17, read_only=False):
    ram = bytearray(NPAGES * P)
    mem = FlatMemory()
    mem.add(RAM, ram)
    mem.add(RAM + NPAGES * P + P, bytearray(P), writable=not ro_region)
    ns = {1: Namespace.for_backend(1, backend, read_only=read_only)}
    return ram, IoExecutor(ns, mem, mdts)


def test_fast_write_then_read_moves_the_data(ram_ns):
    ram, ex = make(ram_ns)
    ram[0:P] = bytes(range(256)) * 16
    assert ex.execute(sqe(0x01, prp1=RAM, slba=8, nlb=8)) == (0, 0)
    ram[P:2 * P] = bytes(P)
    assert ex.execute(sqe(0x02, prp1=RAM + P, slba=8, nlb=8)) == (0, 0)
    assert ram[P:2 * P] == bytes(range(256)) * 16
    # A 512-byte read at a dword offset inside a page (still the one-page path).
    assert ex.execute(sqe(0x02, prp1=RAM + 3 * P + 1024, slba=9, nlb=1)) == (0, 0)
    assert ram[3 * P + 1024:3 * P + 1536] == (bytes(range(256)) * 16)[512:1024]
    assert ex._one[0].nbytes == 0, "the fast path must not keep a view of guest memory"


def test_fast_path_errors_match_the_general_order(ram_ns):
    ram, ex = make(ram_ns, mdts=4096)
    blocks = ram_ns.size // 512
    assert ex.execute(sqe(0x02, nsid=9, prp1=RAM))[0] == Status.INVALID_NAMESPACE
    # MDTS is checked before the LBA range.
    assert ex.execute(sqe(0x02, prp1=RAM, slba=blocks, nlb=16))[0] == Status.INVALID_FIELD
    assert ex.execute(sqe(0x02, prp1=RAM, slba=blocks - 1, nlb=2))[0] == Status.LBA_OUT_OF_RANGE
    assert ex.execute(sqe(0x02, prp1=RAM, slba=(1 << 64) - 1, nlb=2))[0] == Status.LBA_OUT_OF_RANGE
    assert ex.execute(sqe(0x02, prp1=RAM + 2))[0] == Status.INVALID_PRP_OFFSET
    assert ex.execute(sqe(0x02, prp1=0x10))[0] == Status.DATA_TRANSFER_ERROR          # unmapped
    ro = RAM + NPAGES * P + P
    ram_ro, ex_ro = make(ram_ns, ro_region=True)
    assert ex_ro.execute(sqe(0x02, prp1=ro))[0] == Status.DATA_TRANSFER_ERROR          # read into RO memory
    assert ex_ro.execute(sqe(0x01, prp1=ro)) == (0, 0)                                  # write from it is fine
    assert ex.execute(sqe(0x02, prp1=RAM, flags=0x01))[0] == Status.INVALID_FIELD     # fused
    _, ex_wp = make(ram_ns, read_only=True)
    assert ex_wp.execute(sqe(0x01, prp1=RAM))[0] == NAMESPACE_WRITE_PROTECTED
    assert ex_wp.execute(sqe(0x02, prp1=RAM)) == (0, 0)


def test_null_read_zeroes_every_length():
    ram, ex = make(NullBackend(1 << 20), mdts=0)
    for nlb in (1, 3, 8):
        ram[:] = b"\xff" * len(ram)
        assert ex.execute(sqe(0x02, prp1=RAM, nlb=nlb)) == (0, 0)
        assert ram[:nlb * 512] == bytes(nlb * 512)
        assert ram[nlb * 512] == 0xFF, "zeroed past the transfer"


def _list(ram, at, entries):
    off = at - RAM
    ram[off:off + 8 * len(entries)] = struct.pack(f"<{len(entries)}Q", *entries)


def test_prp_list_contiguous_and_scattered():
    ram = bytearray(NPAGES * P)
    mem = FlatMemory()
    mem.add(RAM, ram)
    lst = RAM + 60 * P
    # Contiguous: one run covering PRP1's page and all list pages, last page partial.
    _list(ram, lst, [RAM + P * i for i in range(2, 9)])
    assert prp_pages(mem, RAM + P, lst, 7 * P + 512) == [(RAM + P, 7 * P + 512)]
    # Scattered: each break starts a new run, adjacent pages still coalesce.
    ents = [RAM + 10 * P, RAM + 11 * P, RAM + 20 * P, RAM + 5 * P]
    _list(ram, lst, ents)
    assert prp_pages(mem, RAM, lst, 5 * P) == [(RAM, P), (RAM + 10 * P, 2 * P), (RAM + 20 * P, P),
                                                (RAM + 5 * P, P)]
    # A misaligned entry after contiguous ones is still caught.
    _list(ram, lst, [RAM + 2 * P, RAM + 3 * P, RAM + 4 * P + 8])
    with pytest.raises(CommandError) as e:
        prp_pages(mem, RAM + P, lst, 4 * P)
    assert e.value.status == Status.INVALID_PRP_OFFSET


def test_prp_chained_list_pages():
    ram = bytearray(NPAGES * P)
    mem = FlatMemory()
    mem.add(RAM, ram)
    # List starts 16 bytes before the end of its page: 1 data entry + chain pointer.
    first = RAM + 61 * P - 16
    nxt = RAM + 62 * P
    _list(ram, first, [RAM + 1 * P, nxt])
    _list(ram, nxt, [RAM + 2 * P, RAM + 3 * P])
    assert prp_pages(mem, RAM, first, 4 * P) == [(RAM, 4 * P)]
    _list(ram, first, [RAM + 1 * P, nxt + 8])       # chain pointer with an offset
    with pytest.raises(CommandError) as e:
        prp_pages(mem, RAM, first, 4 * P)
    assert e.value.status == Status.INVALID_PRP_OFFSET


class Rig:
    def __init__(self, results, sq_size=8, cq_size=8, shadow=False, datapath="python"):
        self.ram = bytearray(8 * P)
        self.mem = FlatMemory()
        self.mem.add(RAM, self.ram)
        self.dbarea = bytearray(P)
        self.db = Doorbells(memoryview(self.dbarea))
        self.results = list(results)
        sh = ShadowDoorbells(RAM + 4 * P, RAM + 5 * P) if shadow else None
        self.runner = runner(datapath, doorbells=self.db, mem=self.mem,
                             execute=lambda s, q: self.results.pop(0),
                             irq=lambda v: None, doorbell_error=lambda i, q: None, shadow=sh)
        self.runner.add_cq(CqState(cqid=1, base=RAM + P, size=cq_size, iv=1, ien=True))
        self.runner.add_sq(SqState(sqid=1, cqid=1, base=RAM, size=sq_size))
        self.w = memoryview(self.ram).cast("I")

    def submit(self, cids):
        for i, cid in enumerate(cids):
            self.w[i * 16] = 0x02 | (cid << 16)

    def cqe(self, i):
        b = (P // 4) + i * 4
        return tuple(self.w[b:b + 4])


def test_inline_cqe_fields_status_dnr_and_phase(datapath):
    r = Rig([(0, 0x1234), (Status.LBA_OUT_OF_RANGE, 0), None, (0, 0)], datapath=datapath)
    r.submit([5, 6, 7, 8])
    r.db.set_sq_tail(1, 4)
    assert r.runner.poll() == 3                       # CID 7 parked
    assert r.cqe(0) == (0x1234, 0, 1 | (1 << 16), 5 | (1 << 16))
    dw3 = r.cqe(1)[3]
    assert dw3 & 0xFFFF == 6 and (dw3 >> 16) & 1 == 1
    assert (dw3 >> 17) & 0x7FF == Status.LBA_OUT_OF_RANGE & 0x7FF and dw3 >> 31 == 1   # DNR
    assert r.cqe(2)[2] & 0xFFFF == 4 and r.cqe(2)[3] & 0xFFFF == 8                  # SQHD after CID 8
    r.runner.complete(1, 7, 0, 9)
    assert r.cqe(3)[0] == 9 and r.cqe(3)[3] & 0xFFFF == 7


def test_shadow_eventidx_written_even_when_the_cq_is_full(datapath):
    r = Rig([(0, 0)] * 3, sq_size=8, cq_size=4, shadow=True, datapath=datapath)
    r.submit([1, 2, 3, 4, 5])
    dbbuf = memoryview(r.ram)[4 * P:5 * P].cast("I")
    evidx = memoryview(r.ram)[5 * P:6 * P].cast("I")
    dbbuf[2] = 5                                      # shadow SQ1 tail
    assert r.runner.poll() == 3                       # CQ of 4 holds 3
    assert evidx[2] == 5
    dbbuf[2] = 6                                      # more work while the CQ is full
    r.submit([1, 2, 3, 4, 5, 6])
    assert r.runner.poll() == 0
    assert evidx[2] == 6, "EventIdx must follow the tail even when nothing could be fetched"


def test_two_contiguous_pages_across_two_regions(ram_ns):
    """A page pair that is contiguous in guest addresses but spans two DMA regions."""
    a, b = bytearray(P), bytearray(P)
    mem = FlatMemory()
    mem.add(RAM, a)
    mem.add(RAM + P, b)
    ex = IoExecutor({1: Namespace.for_backend(1, ram_ns)}, mem, 1 << 17)
    pattern = bytes(range(256)) * 32
    ram_ns.write_from(0, [memoryview(pattern)])
    assert ex.execute(sqe(0x02, prp1=RAM, prp2=RAM + P, nlb=16)) == (0, 0)
    assert bytes(a) + bytes(b) == pattern
    # Two separate pages (not contiguous) also work, and a bad PRP2 offset is caught.
    one, two = bytearray(P), bytearray(P)
    mem.add(RAM + 4 * P, one)
    mem.add(RAM + 8 * P, two)
    assert ex.execute(sqe(0x02, prp1=RAM + 4 * P, prp2=RAM + 8 * P, nlb=16)) == (0, 0)
    assert bytes(one) + bytes(two) == pattern
    assert ex.execute(sqe(0x02, prp1=RAM + 4 * P, prp2=RAM + 8 * P + 8, nlb=16))[0] == Status.INVALID_PRP_OFFSET


def test_ram_backend_is_prefaulted():
    """Creating a RAM backend allocates its pages up front (no first-touch faults in the I/O path)."""
    be = RamBackend.create(8 << 20, name_prefix=f"vnvmed-pop-{id(object())}")
    try:
        st = __import__("os").stat("/dev/shm" + be.name)
        assert st.st_blocks * 512 >= 8 << 20
    finally:
        be.destroy()


def test_prp_list_near_2_pow_64_is_not_taken_as_contiguous():
    """Entries e0, e0+page where e0+page reaches 2^64 can't be one run (no wrap)."""
    ram = bytearray(NPAGES * P)
    mem = FlatMemory()
    mem.add(RAM, ram)
    lst = RAM + 60 * P
    top = (1 << 64) - P
    _list(ram, lst, [top, 0])               # "next page" after top would be 2^64
    runs = prp_pages(mem, RAM, lst, 3 * P)
    assert runs == [(RAM, P), (top, P), (0, P)]
    assert all(a + n <= 1 << 64 for a, n in runs)


def test_executor_and_runner_counters(ram_ns, datapath):
    ram, ex = make(ram_ns)
    ex.execute(sqe(0x01, prp1=RAM, nlb=8))                  # fast path write
    ex.execute(sqe(0x02, prp1=RAM, nlb=1))                  # fast path read
    lst = RAM + 60 * P
    _list(ram, lst, [RAM + P * i for i in range(2, 4)])
    ex.execute(sqe(0x02, prp1=RAM + P, prp2=lst, nlb=24))   # general path (PRP list)
    ex.execute(sqe(0x02, nsid=5, prp1=RAM))                 # error: not counted as a read
    assert ex.io == [2, 1, 512 + 3 * P, P]
    r = Rig([(0, 0), (Status.LBA_OUT_OF_RANGE, 0), None], datapath=datapath)
    r.submit([1, 2, 3])
    r.db.set_sq_tail(1, 3)
    r.runner.poll()
    r.runner.complete(1, 3, Status.DATA_TRANSFER_ERROR, 0)
    assert r.runner.errors == 2
