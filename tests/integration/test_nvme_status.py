"""Every status code we can provoke from a host, through the real daemon and socket.

Each bad command must get its spec status in the CQE (with SQID/SQHD filled in) and
leave the queue serving: after every error a good command on the same queue is
checked.  One daemon serves the whole module; each test reconnects (which resets
the controller) and enables it again.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from benchmarks.hostnvme import PAGE, Cqe, HostNvme, sgl_desc
from nvme.status import Status
from tests.daemon import Daemon
from tests.integration.conftest import enabled_nvme

pytestmark = pytest.mark.timeout(20)

BS = 512
NS_RAM, NS_FILE, NS_NULL = 1, 2, 3
RAM_BLOCKS = (64 << 20) // BS
MAX_XFER = 128 * 1024          # default MDTS 5 -> 2^5 * 4 KiB
MAX_IO_QUEUES = 64
MQES = 1024
MSIX_VECTORS = 64
RO_BASE = 1 << 32
UNMAPPED = 1 << 36             # nothing is DMA-mapped here


@pytest.fixture
def h(mdaemon: Daemon) -> Iterator[HostNvme]:
    with enabled_nvme(mdaemon.socket, (1,)) as n:
        yield n


def code(e: Cqe | int) -> int:
    return (e.status if isinstance(e, Cqe) else e) & 0x7FF


def still_serves(h: HostNvme, qid: int = 1) -> None:
    buf = h.ram.alloc(PAGE)
    data = os.urandom(PAGE)
    h.fill(buf, data)
    assert h.rw(qid, True, NS_RAM, 40, 8, buf) == 0
    h.fill(buf, bytes(PAGE))
    assert h.rw(qid, False, NS_RAM, 40, 8, buf) == 0
    assert h.read(buf, PAGE) == data


def io(h: HostNvme, opcode: int, nsid: int = NS_RAM, slba: int = 0, nlb: int = 1,
       prp1: int | None = None, prp2: int = 0, qid: int = 1, **kw: object) -> Cqe:
    if prp1 is None:
        prp1 = h.ram.alloc(max(PAGE, nlb * BS))
        if nlb * BS > PAGE:
            prp1, prp2 = h.prps(prp1, nlb * BS)
    return h.io(qid, opcode, nsid, slba, nlb, prp1, prp2, **kw)


# --------------------------------------------------------------------------- generic

def test_invalid_opcode_admin_and_io(h: HostNvme) -> None:
    e = h.command(0, 0x7E)
    assert code(e) == Status.INVALID_OPCODE and e.sqid == 0
    e = io(h, 0x7E)
    assert code(e) == Status.INVALID_OPCODE
    assert e.sqid == 1 and e.sqhd == h.queues[1].tail     # SQID and SQHD filled in
    assert e.status & 0x4000                              # DNR
    still_serves(h)


def test_invalid_field(h: HostNvme) -> None:
    buf = h.ram.alloc(PAGE)
    st, _ = h.admin(0x06, 0, buf, 0, (0xFF,))             # Identify CNS FFh
    assert code(st) == Status.INVALID_FIELD
    # fused operation on a read (FUSES does not cover it)
    cid = h.next_cid()
    h.submit(1, h.sqe(0x02, cid, NS_RAM, buf, 0, (0, 0, 0), fuse=1))
    assert code(h.wait_cid(1, cid)) == Status.INVALID_FIELD
    # PSDT 11b is reserved
    assert code(io(h, 0x02, psdt=3, dptr=bytes(16))) == Status.INVALID_FIELD
    # Create I/O CQ with PC = 0 (non-contiguous)
    st, _ = h.admin(0x05, 0, h.ram.alloc(PAGE), 0, ((15 << 16) | 7, 0))
    assert code(st) == Status.INVALID_FIELD
    still_serves(h)


def test_invalid_namespace(h: HostNvme) -> None:
    for nsid in (0, 4, 1000, 0xFFFFFFFE):
        assert code(io(h, 0x02, nsid=nsid)) == Status.INVALID_NAMESPACE, nsid
        assert code(io(h, 0x01, nsid=nsid)) == Status.INVALID_NAMESPACE, nsid
    buf = h.ram.alloc(PAGE)
    st, _ = h.admin(0x06, 0, buf, 0, (0x03,))             # NS descriptors of nsid 0
    assert code(st) == Status.INVALID_NAMESPACE
    still_serves(h)


def test_lba_out_of_range(h: HostNvme) -> None:
    assert code(io(h, 0x02, slba=RAM_BLOCKS - 1, nlb=1)) == 0         # the last block is fine
    assert code(io(h, 0x02, slba=RAM_BLOCKS - 1, nlb=2)) == Status.LBA_OUT_OF_RANGE
    assert code(io(h, 0x01, slba=RAM_BLOCKS, nlb=1)) == Status.LBA_OUT_OF_RANGE
    # SLBA + NLB past 2^64: must not wrap into range
    assert code(io(h, 0x02, slba=(1 << 64) - 1, nlb=2)) == Status.LBA_OUT_OF_RANGE
    assert code(io(h, 0x08, slba=RAM_BLOCKS - 4, nlb=8, prp1=0)) == Status.LBA_OUT_OF_RANGE
    still_serves(h)


def test_mdts_exceeded(h: HostNvme) -> None:
    nlb = MAX_XFER // BS
    assert code(io(h, 0x02, nlb=nlb)) == 0                # exactly MDTS is fine
    assert code(io(h, 0x02, nlb=nlb + 1)) == Status.INVALID_FIELD
    assert code(io(h, 0x01, nlb=nlb + 8)) == Status.INVALID_FIELD
    still_serves(h)


def test_invalid_prp_offset(h: HostNvme) -> None:
    buf = h.ram.alloc(4 * PAGE)
    # PRP1 not dword aligned
    assert code(h.io(1, 0x02, NS_RAM, 0, 1, buf + 2, 0)) == Status.INVALID_PRP_OFFSET
    # two pages: PRP2 is a data pointer and must have no offset
    assert code(h.io(1, 0x02, NS_RAM, 0, 16, buf, buf + PAGE + 8)) == Status.INVALID_PRP_OFFSET
    # list entry with an offset
    lst = h.ram.alloc(PAGE)
    h.fill(lst, (buf + PAGE + 512).to_bytes(8, "little") + (buf + 2 * PAGE).to_bytes(8, "little"))
    assert code(h.io(1, 0x02, NS_RAM, 0, 24, buf, lst)) == Status.INVALID_PRP_OFFSET
    # Create I/O CQ with an unaligned base
    st, _ = h.admin(0x05, 0, h.ram.alloc(2 * PAGE) + 64, 0, ((15 << 16) | 9, 1))
    assert code(st) == Status.INVALID_PRP_OFFSET
    still_serves(h)


def test_data_transfer_error_outside_mapped_memory(h: HostNvme) -> None:
    assert code(io(h, 0x02, prp1=UNMAPPED)) == Status.DATA_TRANSFER_ERROR
    assert code(io(h, 0x01, prp1=UNMAPPED)) == Status.DATA_TRANSFER_ERROR
    # a buffer that starts mapped and runs off the end of guest RAM (64 MiB)
    end = h.ram.base + h.ram.size
    assert code(io(h, 0x02, nlb=16, prp1=end - PAGE, prp2=end)) == Status.DATA_TRANSFER_ERROR
    # near 2^64: a range check that wraps would accept it
    assert code(io(h, 0x02, prp1=(1 << 64) - PAGE)) == Status.DATA_TRANSFER_ERROR
    # a PRP list pointer into unmapped memory
    assert code(io(h, 0x02, nlb=24, prp1=h.ram.alloc(PAGE), prp2=UNMAPPED)) == Status.DATA_TRANSFER_ERROR
    # an SGL data block outside memory
    assert code(io(h, 0x02, psdt=1, dptr=sgl_desc(UNMAPPED, BS))) == Status.DATA_TRANSFER_ERROR
    # Identify into unmapped memory: admin commands report it the same way
    st, _ = h.admin(0x06, 0, UNMAPPED, 0, (1,))
    assert code(st) == Status.DATA_TRANSFER_ERROR
    still_serves(h)


def test_read_into_read_only_region_fails_write_from_it_works(h: HostNvme) -> None:
    ro = h.add_region(RO_BASE, 4 * PAGE, writable=False)
    src = ro.alloc(PAGE)
    data = os.urandom(PAGE)
    h.fill(src, data)
    # Write (device reads guest memory) from a read-only region: allowed.
    assert code(h.io(1, 0x01, NS_RAM, 64, 8, src, 0)) == 0
    # Read (device writes guest memory) into it: refused, memory untouched.
    h.fill(src, b"\x5a" * PAGE)
    assert code(h.io(1, 0x02, NS_RAM, 64, 8, src, 0)) == Status.DATA_TRANSFER_ERROR
    assert h.read(src, PAGE) == b"\x5a" * PAGE
    dst = h.ram.alloc(PAGE)
    assert h.rw(1, False, NS_RAM, 64, 8, dst) == 0
    assert h.read(dst, PAGE) == data
    still_serves(h)


def test_sgl_errors(h: HostNvme) -> None:
    buf = h.ram.alloc(PAGE)
    # describes less than the transfer
    assert code(io(h, 0x02, nlb=2, psdt=1, dptr=sgl_desc(buf, BS))) == Status.DATA_SGL_LENGTH_INVALID
    # a keyed/unknown descriptor type
    assert code(io(h, 0x02, psdt=1, dptr=sgl_desc(buf, BS, 0x40))) == Status.SGL_DESCRIPTOR_TYPE_INVALID
    # a segment whose length is not a multiple of 16
    seg = h.ram.alloc(PAGE)
    h.fill(seg, sgl_desc(buf, BS))
    assert code(io(h, 0x02, psdt=1, dptr=sgl_desc(seg, 24, 0x30))) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
    still_serves(h)


# ------------------------------------------------------------------ queue management

def test_invalid_queue_identifier(h: HostNvme) -> None:
    cqbuf = h.ram.alloc(PAGE)
    for qid in (0, MAX_IO_QUEUES + 1, 1):                 # admin id, past the limit, exists
        st, _ = h.admin(0x05, 0, cqbuf, 0, ((15 << 16) | qid, 1))
        assert code(st) == Status.INVALID_QUEUE_IDENTIFIER, qid
        st, _ = h.admin(0x01, 0, cqbuf, 0, ((15 << 16) | qid, (1 << 16) | 1))
        assert code(st) == Status.INVALID_QUEUE_IDENTIFIER, qid
    for opc in (0x00, 0x04):                              # delete a queue that does not exist
        st, _ = h.admin(opc, 0, 0, 0, (9,))
        assert code(st) == Status.INVALID_QUEUE_IDENTIFIER
        st, _ = h.admin(opc, 0, 0, 0, (0,))               # nor the admin queue
        assert code(st) == Status.INVALID_QUEUE_IDENTIFIER
    still_serves(h)


def test_invalid_queue_size(h: HostNvme) -> None:
    base = h.ram.alloc(16 * MQES + 2 * PAGE)
    st, _ = h.admin(0x05, 0, base, 0, ((0 << 16) | 2, 1))          # 1 entry
    assert code(st) == Status.INVALID_QUEUE_SIZE
    st, _ = h.admin(0x05, 0, base, 0, ((MQES << 16) | 2, 1))       # MQES + 1 entries
    assert code(st) == Status.INVALID_QUEUE_SIZE
    st, _ = h.admin(0x05, 0, base, 0, (((MQES - 1) << 16) | 2, 1))  # exactly MQES: fine
    assert code(st) == 0
    sq = h.ram.alloc(64 * 2 * MQES)
    st, _ = h.admin(0x01, 0, sq, 0, ((0 << 16) | 2, (2 << 16) | 1))
    assert code(st) == Status.INVALID_QUEUE_SIZE
    still_serves(h)


def test_invalid_interrupt_vector(h: HostNvme) -> None:
    base = h.ram.alloc(PAGE)
    st, _ = h.admin(0x05, 0, base, 0, ((15 << 16) | 3, (MSIX_VECTORS << 16) | 3))
    assert code(st) == Status.INVALID_INTERRUPT_VECTOR
    st, _ = h.admin(0x05, 0, base, 0, ((15 << 16) | 3, ((MSIX_VECTORS - 1) << 16) | 3))
    assert code(st) == 0
    still_serves(h)


def test_completion_queue_invalid(h: HostNvme) -> None:
    sq = h.ram.alloc(PAGE)
    for cqid in (0, 5, 0xFFFF):
        st, _ = h.admin(0x01, 0, sq, 0, ((15 << 16) | 2, (cqid << 16) | 1))
        assert code(st) == Status.COMPLETION_QUEUE_INVALID, cqid
    still_serves(h)


def test_invalid_queue_deletion(h: HostNvme) -> None:
    st, _ = h.admin(0x04, 0, 0, 0, (1,))                  # CQ 1 still has SQ 1
    assert code(st) == Status.INVALID_QUEUE_DELETION
    still_serves(h)
    h.delete_io_queue(1)                                  # SQ first, then CQ: fine
    h.create_io_queue(1, 16)
    still_serves(h)


def test_sq_deletion_then_io_on_it_is_not_served(h: HostNvme) -> None:
    h.create_io_queue(2, 16)
    st, _ = h.admin(0x00, 0, 0, 0, (2,))
    assert st == 0
    # The queue is gone: a doorbell write for it must not produce a completion on CQ 2.
    q = h.queues[2]
    h.submit(2, h.sqe(0x02, h.next_cid(), NS_RAM, h.ram.alloc(PAGE), 0, (0, 0, 0)))
    with pytest.raises(TimeoutError):
        h.reap_cqes(2, 1, timeout=0.3)
    assert q.head == 0
    st, _ = h.admin(0x04, 0, 0, 0, (2,))
    assert st == 0
    still_serves(h)


def test_unmapped_region_is_no_longer_reachable(h: HostNvme) -> None:
    """After DMA_UNMAP, PRP lists and data in that region give Data Transfer Error."""
    ro = h.add_region(RO_BASE, 4 * PAGE, writable=False)
    buf = h.ram.alloc(3 * PAGE)
    p1, p2 = h.prps(buf, 3 * PAGE, ro)
    assert code(h.io(1, 0x02, NS_RAM, 0, 24, p1, p2)) == 0
    src = ro.alloc(PAGE)
    assert code(h.io(1, 0x01, NS_RAM, 0, 8, src, 0)) == 0
    h.c.dma_unmap(RO_BASE, 4 * PAGE)
    assert code(h.io(1, 0x02, NS_RAM, 0, 24, p1, p2)) == Status.DATA_TRANSFER_ERROR
    assert code(h.io(1, 0x01, NS_RAM, 0, 8, src, 0)) == Status.DATA_TRANSFER_ERROR
    still_serves(h)


def test_aer_limit_exceeded(h: HostNvme) -> None:
    aerl = h.identify(1)[259] + 1                        # AERL is 0's based
    cids = [h.submit_aer() for _ in range(aerl)]
    e = h.command(0, 0x0C)
    assert code(e) == Status.AER_LIMIT_EXCEEDED
    assert all(s.cid not in cids for s in h.stray.get(0, []))   # the others stay parked
    still_serves(h)


def test_invalid_log_page(h: HostNvme) -> None:
    st, _ = h.get_log_page(0x7F, 512)
    assert code(st) == Status.INVALID_LOG_PAGE
    st, data = h.get_log_page(0x02, 512)                 # SMART / health: supported
    assert code(st) == 0
    still_serves(h)
