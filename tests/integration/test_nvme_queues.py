"""Queue behaviour and the remaining NVM commands through the real daemon.

CQ flow control (a CQ smaller than its SQ never overflows), SQs sharing a CQ, the
Number of Queues feature, Write Zeroes / Compare / Dataset Management, a reconnect
that keeps namespace data, and two controllers in one daemon (the `daemon` fixture
parametrized indirectly).
"""
from __future__ import annotations

import os
import struct
from typing import Iterator

import pytest

from benchmarks.hostnvme import PAGE, HostNvme
from nvme.status import Status
from tests.daemon import Daemon
from tests.integration.conftest import Host, enabled_nvme

pytestmark = pytest.mark.timeout(20)

BS = 512
NS_RAM, NS_FILE = 1, 2


@pytest.fixture
def h(mdaemon: Daemon) -> Iterator[HostNvme]:
    with enabled_nvme(mdaemon.socket) as n:
        yield n


def test_small_cq_never_overflows(h: HostNvme) -> None:
    """SQ of 32 on a CQ of 4: 20 commands submitted at once all complete, none lost."""
    q = h.create_io_queue(1, 32, cq_depth=4)
    buf = h.ram.alloc(PAGE)
    cids = []
    for i in range(20):
        cid = h.next_cid()
        cids.append(cid)
        h.submit(1, h.sqe(0x02, cid, NS_RAM, buf, 0, (i, 0, 0)), ring=False)
    h.ring(1, q.tail)
    got = [e for e in h.reap_cqes(1, 20)]
    assert all(e.status == 0 and e.sqid == 1 for e in got)
    assert sorted(e.cid for e in got) == sorted(cids)   # NVMe does not promise order
    assert got[-1].sqhd == 20                # all 20 fetched by now
    with pytest.raises(TimeoutError):        # and nothing beyond them
        h.reap_cqes(1, 1, timeout=0.2)


def test_two_sqs_share_one_cq(h: HostNvme) -> None:
    h.create_io_queue(1, 16, cq_depth=64)
    h.create_io_queue(2, 16, cqid=1)
    buf = h.ram.alloc(PAGE)
    want = {}
    for i in range(10):
        for qid in (1, 2):
            cid = h.next_cid()
            want[cid] = qid
            h.submit(qid, h.sqe(0x02, cid, NS_RAM, buf, 0, (i, 0, 0)))
    seen = {}
    for e in h.reap_cqes(1, 20):
        assert e.status == 0
        seen[e.cid] = e.sqid
    assert seen == want                       # every CQE names the SQ it came from
    st, _ = h.admin(0x04, 0, 0, 0, (1,))
    assert st & 0x7FF == Status.INVALID_QUEUE_DELETION
    st, _ = h.admin(0x00, 0, 0, 0, (2,))
    assert st == 0


def test_number_of_queues_feature_limits_creation(h: HostNvme) -> None:
    st, dw0 = h.admin(0x09, 0, 0, 0, (0x07, (1 << 16) | 1))   # ask for 2 SQs / 2 CQs
    assert st == 0
    nsq, ncq = (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1
    assert nsq >= 2 and ncq >= 2
    st, dw0b = h.admin(0x0A, 0, 0, 0, (0x07,))
    assert st == 0 and dw0b == dw0
    h.create_io_queue(1, 8)
    h.create_io_queue(nsq, 8)
    st, _ = h.admin(0x05, 0, h.ram.alloc(PAGE), 0, ((7 << 16) | (ncq + 1), 1))
    assert st & 0x7FF == Status.INVALID_QUEUE_IDENTIFIER


@pytest.mark.parametrize("nsid", [NS_RAM, NS_FILE])
def test_write_zeroes_compare_dsm(h: HostNvme, nsid: int) -> None:
    h.create_io_queue(1, 16)
    buf = h.ram.alloc(4 * PAGE)
    data = os.urandom(4 * PAGE)
    h.fill(buf, data)
    assert h.rw(1, True, nsid, 1000, 32, buf) == 0
    # Compare: equal, then one byte different
    assert h.io(1, 0x05, nsid, 1000, 32, *h.prps(buf, 4 * PAGE)).status == 0
    h.fill(buf + 777, bytes([data[777] ^ 1]))
    assert h.io(1, 0x05, nsid, 1000, 32, *h.prps(buf, 4 * PAGE)).status & 0x7FF == Status.COMPARE_FAILURE
    # Write Zeroes over the middle 8 blocks
    assert h.io(1, 0x08, nsid, 1008, 8).status == 0
    assert h.rw(1, False, nsid, 1000, 32, buf) == 0
    got = h.read(buf, 4 * PAGE)
    assert got[:PAGE] == data[:PAGE] and got[PAGE:2 * PAGE] == bytes(PAGE)
    assert got[2 * PAGE:] == data[2 * PAGE:]
    # Dataset Management deallocate of the last 8 blocks: reads back zeroes
    rng = h.ram.alloc(PAGE)
    h.fill(rng, struct.pack("<IIQ", 0, 8, 1024))
    assert h.command(1, 0x09, nsid, rng, 0, (0, 1 << 2)).status == 0
    assert h.rw(1, False, nsid, 1000, 32, buf) == 0
    got = h.read(buf, 4 * PAGE)
    assert got[3 * PAGE:] == bytes(PAGE) and got[:PAGE] == data[:PAGE]


def test_reconnect_keeps_namespace_data_and_resets_controller(mdaemon: Daemon) -> None:
    data = os.urandom(PAGE)
    host = Host(mdaemon.socket)
    try:
        h = host.nvme
        assert h is not None
        h.enable()
        h.create_io_queue(1, 16)
        buf = h.ram.alloc(PAGE)
        h.fill(buf, data)
        assert h.rw(1, True, NS_RAM, 4242, 8, buf) == 0
    finally:
        host.close()                          # disconnect with the controller enabled
    host = Host(mdaemon.socket)
    try:
        h = host.nvme
        assert h is not None
        assert h.reg_read(0x1C) & 1 == 0      # a new client starts from power-on
        assert h.reg_read(0x14) == 0
        h.enable()
        h.create_io_queue(1, 16)              # queue ids free again
        buf = h.ram.alloc(PAGE)
        assert h.rw(1, False, NS_RAM, 4242, 8, buf) == 0
        assert h.read(buf, PAGE) == data
    finally:
        host.close()


TWO_CONTROLLERS = ["--cores", "0", "--controller", "nvmeA={run}/a.sock", "--namespace", "nvmeA=ram:8M",
                   "--controller", "nvmeB={run}/b.sock", "--namespace", "nvmeB=file:{img}"]


@pytest.mark.parametrize("daemon", [TWO_CONTROLLERS], indirect=True)
def test_two_controllers_are_independent(daemon: Daemon) -> None:
    assert set(daemon.sockets) == {"nvmeA", "nvmeB"}
    ha, hb = Host(daemon.sockets["nvmeA"]), Host(daemon.sockets["nvmeB"])
    try:
        a, b = ha.nvme, hb.nvme
        assert a is not None and b is not None
        a.enable()
        b.enable()
        assert a.identify(1)[4:24].rstrip() == b"VNVMENVMEA"
        assert b.identify(1)[4:24].rstrip() == b"VNVMENVMEB"
        assert struct.unpack_from("<Q", a.identify(0, 1))[0] == (8 << 20) // BS
        assert struct.unpack_from("<Q", b.identify(0, 1))[0] == (16 << 20) // BS
        a.create_io_queue(1, 16)
        b.create_io_queue(1, 16)
        da, db = os.urandom(PAGE), os.urandom(PAGE)
        ba, bb = a.ram.alloc(PAGE), b.ram.alloc(PAGE)
        a.fill(ba, da)
        b.fill(bb, db)
        assert a.rw(1, True, 1, 0, 8, ba) == 0
        assert b.rw(1, True, 1, 0, 8, bb) == 0
        a.disable()                            # resetting A leaves B serving
        b.fill(bb, bytes(PAGE))
        assert b.rw(1, False, 1, 0, 8, bb) == 0
        assert b.read(bb, PAGE) == db
    finally:
        ha.close()
        hb.close()
