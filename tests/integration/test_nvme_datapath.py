"""NVMe conformance through the real daemon: enable, identify, I/O queues, data on every backend.

The default daemon (tests/integration/conftest.py) has nsid 1 = ram:64M, nsid 2 = a
16 MiB image file, nsid 3 = null:32M.  Every transfer goes through the real vfio-user
socket, the BAR0 doorbell page and memfd guest RAM; data is checked byte for byte.
"""
from __future__ import annotations

import os
import random
import struct
import time

import pytest

from benchmarks.hostnvme import PAGE, HostNvme
from tests.daemon import Daemon
from tests.integration.conftest import Host, enabled_nvme, finish_daemon, start_daemon

pytestmark = pytest.mark.timeout(20)

BS = 512
NS_RAM, NS_FILE, NS_NULL = 1, 2, 3
NS_BLOCKS = {NS_RAM: (64 << 20) // BS, NS_FILE: (16 << 20) // BS, NS_NULL: (32 << 20) // BS}
RO_BASE = 1 << 32        # iova of the read-only region (PRP lists, SGL segments)


@pytest.fixture
def h(mdaemon: Daemon) -> HostNvme:
    """Enabled controller with 4 I/O queue pairs (depth 32) on a fresh connection."""
    with enabled_nvme(mdaemon.socket, range(1, 5)) as n:
        yield n


def _write_then_read(h: HostNvme, qid: int, nsid: int, slba: int, data: bytes,
                     wbuf: int, rbuf: int, **kw: object) -> bytes:
    nblk = len(data) // BS
    h.fill(wbuf, data)
    h.fill(rbuf, b"\xa5" * len(data))
    assert h.rw(qid, True, nsid, slba, nblk, wbuf, **kw) == 0
    assert h.rw(qid, False, nsid, slba, nblk, rbuf, **kw) == 0
    return h.read(rbuf, len(data))


def test_enable_sets_ready_and_cap(daemon: Daemon, host: HostNvme) -> None:
    cap = host.reg_read(0, 8)
    assert cap & 0xFFFF == 1023                  # MQES, 0's based (default mqes 1024)
    assert (cap >> 37) & 1                       # CSS: NVM command set
    assert host.reg_read(0x1C) & 1 == 0          # not ready before EN
    host.enable()
    assert host.reg_read(0x1C) & 0xF == 1        # RDY, no CFS, SHST 00
    assert host.reg_read(0x14) & 1 == 1
    host.disable()
    assert host.reg_read(0x1C) & 1 == 0


@pytest.mark.daemon_config("""
[[controllers]]
name = "nvme0"
socket = "nvme0.sock"
serial = "SN-CONFORM-42"
model = "conformance model"
""")
@pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                          "--namespace", "nvme0=ram:8M", "--namespace", "nvme0=file:{img}"])
def test_identify_matches_command_line(daemon: Daemon, host: HostNvme) -> None:
    host.enable()
    idc = host.identify(1)
    assert idc[4:24] == b"SN-CONFORM-42".ljust(20)
    assert idc[24:64] == b"conformance model".ljust(40)
    nn = struct.unpack_from("<I", idc, 516)[0]
    assert nn >= 2
    active = struct.unpack_from("<1024I", host.identify(2, 0))
    ids = [i for i in active if i]
    sizes = {}
    for nsid in ids:
        ns = host.identify(0, nsid)
        nsze, ncap = struct.unpack_from("<QQ", ns, 0)
        lbads = (struct.unpack_from("<I", ns, 128)[0] >> 16) & 0xFF
        assert nsze == ncap
        sizes[nsid] = nsze << lbads
    assert sizes == {1: 8 << 20, 2: 16 << 20}


def test_identify_default_serial_and_namespaces(h: HostNvme) -> None:
    idc = h.identify(1)
    assert idc[4:24].rstrip() == b"VNVMENVME0"       # derived from the controller name
    assert idc[77] == 5                               # MDTS default: 128 KiB
    for nsid, blocks in NS_BLOCKS.items():
        assert struct.unpack_from("<Q", h.identify(0, nsid), 0)[0] == blocks
    assert h.identify(0, 4)[:8] == bytes(8)           # inactive nsid: zeroes


def test_four_queue_pairs_random_io_ram_and_file(h: HostNvme) -> None:
    """Random writes on all 4 queues, then verified reads through different queues."""
    rnd = random.Random(1234)
    wbuf = h.ram.alloc(64 * PAGE)
    rbuf = h.ram.alloc(64 * PAGE)
    for nsid in (NS_RAM, NS_FILE):
        writes: list[tuple[int, bytes]] = []
        used: set[int] = set()
        for i in range(24):
            nblk = rnd.choice([1, 8, 9, 16, 64])
            slba = rnd.randrange(0, NS_BLOCKS[nsid] - nblk) & ~63
            if slba in used:
                continue
            used.add(slba)
            data = rnd.randbytes(nblk * BS)
            h.fill(wbuf, data)
            assert h.rw(1 + i % 4, True, nsid, slba, nblk, wbuf) == 0
            writes.append((slba, data))
        for i, (slba, data) in enumerate(writes):
            h.fill(rbuf, bytes(len(data)))
            assert h.rw(1 + (i + 1) % 4, False, nsid, slba, len(data) // BS, rbuf) == 0
            assert h.read(rbuf, len(data)) == data, f"nsid {nsid} lba {slba}"


def test_file_backend_data_lands_in_the_image(mdaemon: Daemon, h: HostNvme) -> None:
    data = os.urandom(4 * PAGE)
    buf = h.ram.alloc(4 * PAGE)
    h.fill(buf, data)
    assert h.rw(2, True, NS_FILE, 2048, 32, buf) == 0
    assert h.io(2, 0x00, NS_FILE, 0, 1).status == 0       # Flush
    with open(mdaemon.img, "rb") as f:
        f.seek(2048 * BS)
        assert f.read(len(data)) == data


def test_null_backend_reads_zero(h: HostNvme) -> None:
    buf = h.ram.alloc(4 * PAGE)
    h.fill(buf, os.urandom(4 * PAGE))
    assert h.rw(3, True, NS_NULL, 100, 32, buf) == 0
    h.fill(buf, b"\xff" * (4 * PAGE))
    assert h.rw(3, False, NS_NULL, 100, 32, buf) == 0
    assert h.read(buf, 4 * PAGE) == bytes(4 * PAGE)


@pytest.mark.parametrize("nsid", [NS_RAM, NS_FILE])
@pytest.mark.parametrize("shape", ["prp1", "prp1_offset", "prp1_prp2", "prp_list", "prp_list_chained"])
def test_prp_shapes(h: HostNvme, nsid: int, shape: str) -> None:
    """PRP1 only, PRP1+PRP2, PRP lists (in a READ-ONLY DMA region), chained list pages."""
    ro = h.add_region(RO_BASE, 16 * PAGE, writable=False)
    off, nbytes = {"prp1": (0, PAGE), "prp1_offset": (512, 2048), "prp1_prp2": (0, 2 * PAGE),
                   "prp_list": (1024, 6 * PAGE), "prp_list_chained": (0, 128 * 1024)}[shape]
    wbuf = h.ram.alloc(nbytes + 2 * PAGE) + off
    rbuf = h.ram.alloc(nbytes + 2 * PAGE) + off
    data = os.urandom(nbytes)
    list_ram = ro if shape.startswith("prp_list") else None
    if shape == "prp_list_chained":
        # Start the list near the end of its page so it must chain to a second page.
        ro.alloc(PAGE - 64)
        h.fill(wbuf, data)
        prp1, prp2 = h.prps(wbuf, nbytes, ro)
        assert prp2 >= RO_BASE
        lst = ro.alloc(PAGE) - 24          # 3 slots left in the page: 2 entries + chain
        nxt = ro.alloc(PAGE)
        ents = [wbuf + PAGE * i for i in range(1, nbytes // PAGE)]
        h.fill(lst, struct.pack("<3Q", ents[0], ents[1], nxt))
        h.fill(nxt, struct.pack(f"<{len(ents) - 2}Q", *ents[2:]))
        assert h.io(1, 0x01, nsid, 512, nbytes // BS, wbuf, lst).status == 0
        h.fill(rbuf, bytes(nbytes))
        ents = [rbuf + PAGE * i for i in range(1, nbytes // PAGE)]
        h.fill(lst, struct.pack("<3Q", ents[0], ents[1], nxt))
        h.fill(nxt, struct.pack(f"<{len(ents) - 2}Q", *ents[2:]))
        assert h.io(1, 0x02, nsid, 512, nbytes // BS, rbuf, lst).status == 0
        assert h.read(rbuf, nbytes) == data
        return
    h.fill(wbuf, data)
    h.fill(rbuf, bytes(nbytes))
    p1, p2 = h.prps(wbuf, nbytes, list_ram)
    assert (p2 == 0) == (shape.startswith("prp1") and shape != "prp1_prp2")
    if list_ram is not None:
        assert p2 >= RO_BASE
    assert h.io(2, 0x01, nsid, 4096, nbytes // BS, p1, p2).status == 0
    p1, p2 = h.prps(rbuf, nbytes, list_ram)
    assert h.io(3, 0x02, nsid, 4096, nbytes // BS, p1, p2).status == 0
    assert h.read(rbuf, nbytes) == data


@pytest.mark.parametrize("nsid", [NS_RAM, NS_FILE])
@pytest.mark.parametrize("layout", ["data_block", "last_segment", "segments"])
def test_sgl_shapes(h: HostNvme, nsid: int, layout: str) -> None:
    """SGL: a Data Block in the SQE, one Last Segment list, Segment -> Segment -> Last Segment.

    Descriptor lists live in the read-only region; data chunks are odd-sized and
    unaligned (SGLS advertises no alignment requirement).
    """
    ro = h.add_region(RO_BASE, 8 * PAGE, writable=False)
    nbytes = 12 * 1024
    data = os.urandom(nbytes)
    wbase = h.ram.alloc(nbytes + 4 * PAGE)
    rbase = h.ram.alloc(nbytes + 4 * PAGE)
    if layout == "data_block":
        cuts = [nbytes]
        per = 0
    else:
        cuts = [1000, 3000, 96, 4100, 2000, nbytes - 10196]
        per = 0 if layout == "last_segment" else 2

    def chunks(base: int) -> list[tuple[int, int]]:
        out, pos, addr = [], 0, base + 3
        for n in cuts:
            out.append((addr, n))
            addr += n + 37                  # gaps: the data is really scattered
            pos += n
        return out

    wch, rch = chunks(wbase), chunks(rbase)
    pos = 0
    for (a, n) in wch:
        h.fill(a, data[pos:pos + n])
        h.fill(rch[wch.index((a, n))][0], bytes(n))
        pos += n
    assert h.sgl_rw(4, True, nsid, 8192, nbytes // BS, wch, ro, per) == 0
    assert h.sgl_rw(1, False, nsid, 8192, nbytes // BS, rch, ro, per) == 0
    got = b"".join(h.read(a, n) for a, n in rch)
    assert got == data
    # And the PRP path reads back what the SGL path wrote.
    buf = h.ram.alloc(nbytes)
    assert h.rw(2, False, nsid, 8192, nbytes // BS, buf) == 0
    assert h.read(buf, nbytes) == data


def test_trapped_doorbells_work_like_mmapped(h: HostNvme) -> None:
    """REGION_WRITE to BAR0 >= 0x1000 moves queues exactly as the mmapped page does."""
    h.trapped = True
    buf = h.ram.alloc(2 * PAGE)
    data = os.urandom(2 * PAGE)
    h.fill(buf, data)
    for qid in (1, 2, 3, 4):
        for k in range(40):                    # > depth 32: wraps SQ and CQ (phase flips)
            assert h.rw(qid, True, NS_RAM, 16 * k, 16, buf) == 0
    assert h.identify(1)[4:24].rstrip() == b"VNVMENVME0"   # admin queue trapped too
    h.trapped = False
    h.fill(buf, bytes(2 * PAGE))
    assert h.rw(1, False, NS_RAM, 16 * 39, 16, buf) == 0
    assert h.read(buf, 2 * PAGE) == data


def test_msix_eventfd_signals_completion(h: HostNvme) -> None:
    fds = h.setup_msix(4)
    h.create_io_queue(5, 16, iv=3, ien=True)
    while h.wait_eventfd(fds[3], 0):
        pass
    buf = h.ram.alloc(PAGE)
    cid = h.next_cid()
    h.submit(5, h.sqe(0x02, cid, NS_RAM, buf, 0, (0, 0, 7)))
    assert h.wait_eventfd(fds[3], 5.0) >= 1, "no MSI-X interrupt for the ien CQ"
    e = h.wait_cid(5, cid)
    assert e.status == 0
    # A CQ without IEN never signals its vector.
    h.create_io_queue(6, 16, iv=2, ien=False)
    assert h.rw(6, False, NS_RAM, 0, 8, buf) == 0
    assert h.wait_eventfd(fds[2], 0.2) == 0
    # Admin completions signal vector 0.
    while h.wait_eventfd(fds[0], 0):
        pass
    h.identify(1)
    assert h.wait_eventfd(fds[0], 5.0) >= 1


def test_two_namespaces_issue_cli_example() -> None:
    """`--namespace nvme0=ram:64M --namespace nvme0=file:IMG`: both readable and writable."""
    d = start_daemon(["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                      "--namespace", "nvme0=ram:64M", "--namespace", "nvme0=file:{img}"])
    try:
        host = Host(d.socket)
        try:
            h = host.nvme
            assert h is not None
            h.enable()
            ids = [i for i in struct.unpack_from("<1024I", h.identify(2, 0)) if i]
            assert ids == [1, 2]
            h.create_io_queue(1, 16)
            wbuf, rbuf = h.ram.alloc(8 * PAGE), h.ram.alloc(8 * PAGE)
            for nsid in ids:
                data = os.urandom(8 * PAGE)
                assert _write_then_read(h, 1, nsid, 77, data, wbuf, rbuf) == data
        finally:
            host.close()
    finally:
        finish_daemon(d)


def test_sgl_bit_bucket_read(h: HostNvme) -> None:
    """SGLS bit 16: a Bit Bucket descriptor discards that part of a read."""
    from benchmarks.hostnvme import SGL_BIT_BUCKET, sgl_desc
    sgls = struct.unpack_from("<I", h.identify(1), 536)[0]
    assert sgls & 3 == 1 and sgls & (1 << 16)
    data = os.urandom(3 * BS)
    buf = h.ram.alloc(PAGE)
    h.fill(buf, data)
    assert h.rw(1, True, NS_RAM, 900, 3, buf) == 0
    a, b = h.ram.alloc(BS), h.ram.alloc(BS)
    h.fill(a, bytes(BS))
    h.fill(b, bytes(BS))
    seg = h.ram.alloc(48, 16)
    h.fill(seg, sgl_desc(a, BS) + sgl_desc(0, BS, SGL_BIT_BUCKET) + sgl_desc(b, BS))
    e = h.io(1, 0x02, NS_RAM, 900, 3, psdt=1, dptr=sgl_desc(seg, 48, 0x30))
    assert e.status == 0
    assert h.read(a, BS) == data[:BS] and h.read(b, BS) == data[2 * BS:]
    # A bit bucket makes no sense for a write (host-to-device): refused.
    e = h.io(1, 0x01, NS_RAM, 900, 3, psdt=1, dptr=sgl_desc(seg, 48, 0x30))
    assert e.status & 0x7FF == 0x011


def test_identify_oncs_matches_commands(h: HostNvme) -> None:
    """ONCS advertises Compare, DSM and Write Zeroes, which the datapath tests exercise."""
    oncs = struct.unpack_from("<H", h.identify(1), 520)[0]
    assert oncs & (1 << 0) and oncs & (1 << 2) and oncs & (1 << 3)
    assert struct.unpack_from("<H", h.identify(1), 522)[0] == 0    # FUSES: none, fused -> refused


def test_batches_outstanding_on_all_queues(h: HostNvme) -> None:
    """16 writes outstanding on each of 4 queues at once, then verified reads in batches."""
    blocks = {}
    bufs = {}
    for qid in range(1, 5):
        for k in range(16):
            lba = 20000 + (qid * 16 + k) * 8
            buf = h.ram.alloc(PAGE)
            data = os.urandom(PAGE)
            h.fill(buf, data)
            blocks[lba] = data
            bufs[lba] = buf
            h.submit(qid, h.sqe(0x01, h.next_cid(), NS_RAM, buf, 0, (lba, 0, 7)), ring=False)
    for qid in range(1, 5):
        h.ring(qid, h.queues[qid].tail)
    for qid in range(1, 5):
        assert all(e.status == 0 and e.sqid == qid for e in h.reap_cqes(qid, 16))
    for lba, buf in bufs.items():
        h.fill(buf, bytes(PAGE))
    lbas = list(bufs)
    for i, lba in enumerate(lbas):
        h.submit(1 + i % 4, h.sqe(0x02, h.next_cid(), NS_RAM, bufs[lba], 0, (lba, 0, 7)), ring=False)
    for qid in range(1, 5):
        h.ring(qid, h.queues[qid].tail)
    for qid in range(1, 5):
        assert all(e.status == 0 for e in h.reap_cqes(qid, 16))
    for lba, data in blocks.items():
        assert h.read(bufs[lba], PAGE) == data, lba


def test_register_and_doorbell_access_rules(h: HostNvme) -> None:
    """Registers take 4/8-byte accesses only; doorbells 4-byte writes; doorbell reads give 0."""
    from vfio_user.errors import ProtocolError
    with pytest.raises(ProtocolError):
        h.c.region_read(0, 0x1C, 2)
    with pytest.raises(ProtocolError):
        h.c.region_write(0, 0x14, b"\x01\x00")
    with pytest.raises(ProtocolError):
        h.c.region_write(0, 0x1000 + 8, b"\x01\x00")        # 2-byte doorbell write
    with pytest.raises(ProtocolError):
        h.c.region_write(0, 0x1000 + 8, bytes(8))           # 8-byte doorbell write
    h.ring(1, 0, trapped=True)                              # a same-value 4-byte write is fine
    assert h.c.region_read(0, 0x1000 + 8, 4) == bytes(4)
    assert h.reg_read(0x1C) & 3 == 1                        # still ready, not fatal
    buf = h.ram.alloc(PAGE)
    assert h.rw(1, False, NS_RAM, 0, 8, buf) == 0


@pytest.mark.daemon_config("""
[[controllers]]
name = "nvme0"
socket = "nvme0.sock"
mdts = 0
""")
@pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                          "--namespace", "nvme0=ram:8M"])
def test_mdts_zero_means_unlimited(daemon: Daemon) -> None:
    """MDTS 0 is "no limit": 8 KiB, 64 KiB and 1 MiB transfers work (a 4 KiB cap refused them)."""
    with enabled_nvme(daemon.socket, [1]) as h:
        assert h.identify(1)[77] == 0
        wbuf, rbuf = h.ram.alloc(1 << 20), h.ram.alloc(1 << 20)
        for nbytes in (8 << 10, 64 << 10, 1 << 20):
            data = os.urandom(nbytes)
            assert _write_then_read(h, 1, 1, 0, data, wbuf, rbuf) == data, nbytes


def _u128(page: bytes, off: int) -> int:
    return int.from_bytes(page[off:off + 16], "little")


def test_smart_log_counts_the_workers_io(daemon: Daemon) -> None:
    """Get Log Page 02h shows the I/O the workers did: commands and data units (1000 x 512 B)."""
    with enabled_nvme(daemon.socket, [1, 2]) as h:
        st, before = h.get_log_page(0x02, 512)
        assert st == 0
        buf = h.ram.alloc(64 << 10)
        nblk = (64 << 10) // BS
        for i in range(10):                                  # 10 writes, 640 KiB
            assert h.rw(1 + i % 2, True, NS_RAM, i * nblk, nblk, buf) == 0
        for i in range(6):                                   # 6 reads, 384 KiB
            assert h.rw(1 + i % 2, False, NS_RAM, i * nblk, nblk, buf) == 0
        st, after = h.get_log_page(0x02, 512)
        assert st == 0
    assert [_u128(before, off) for off in (32, 48, 64, 80)] == [0, 0, 0, 0]
    assert _u128(after, 80) == 10                            # Host Write Commands
    assert _u128(after, 64) == 6                             # Host Read Commands
    # Data Units Written/Read: thousands of 512-byte units, rounded up.
    assert _u128(after, 48) == -(-(640 << 10) // 512_000) == 2
    assert _u128(after, 32) == -(-(384 << 10) // 512_000) == 1


def test_failed_io_commands_enter_the_error_log(daemon: Daemon) -> None:
    """An I/O command that fails on a worker becomes an Error Information log entry (log
    page 01h: SQID, CID, status, LBA, NSID) - the workers report them to the front-end."""
    with enabled_nvme(daemon.socket, [1, 2]) as h:
        buf = h.ram.alloc(PAGE)
        blocks = (64 << 20) // BS                              # nsid 1 is ram:64M
        e1 = h.io(2, 0x02, NS_RAM, blocks + 5, 1, buf)        # read past the end
        e2 = h.command(1, 0x7F, NS_RAM)                        # no such I/O opcode
        assert e1.status & 0x7FF == 0x80 and e2.status & 0x7FF == 0x01
        # The worker reports a failure to the front-end after it posted the CQE (the
        # report is batched per poll), so a host that reads the log the instant it reaped
        # can be ahead of it: read until both entries are in (bounded; events, no sleep
        # guesses beyond a short back-off).
        deadline = time.monotonic() + 10
        while True:
            st, page = h.get_log_page(0x01, 64 * 4)
            assert st == 0
            entries = [struct.unpack_from("<QHHHHQI", page, 64 * i) for i in range(4)]
            if entries[0][1:3] == (1, e2.cid) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    # newest first: (count, sqid, cid, status field, pel, lba, nsid)
    assert entries[0][1:3] == (1, e2.cid) and (entries[0][3] >> 1) & 0x7FF == 0x01
    assert entries[1][1:3] == (2, e1.cid) and (entries[1][3] >> 1) & 0x7FF == 0x80
    assert entries[1][5] == blocks + 5 and entries[1][6] == NS_RAM
    assert entries[0][0] == entries[1][0] + 1
