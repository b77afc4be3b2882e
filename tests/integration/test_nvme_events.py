"""Asynchronous events and controller lifecycle through the real daemon.

Doorbell errors: a bad SQ tail on an existing I/O queue is seen by the worker polling
the mmapped doorbell page (Error AER, info 01h, log page 01h, the queue skipped while
other queues keep serving); a doorbell write for a queue that does not exist is only
noticed by the front-end's admin poller scanning the page, so the tests wait for the
AER completion with a bounded timeout instead of expecting it at once.
"""
from __future__ import annotations

import os
import struct
from typing import Iterator

import pytest

from benchmarks.hostnvme import PAGE, HostNvme
from tests.daemon import Daemon
from tests.integration.conftest import Host, enabled_nvme

pytestmark = pytest.mark.timeout(20)

NS_RAM = 1
AER_WAIT = 5.0
LOG_ERROR = 0x01


def aer_dw0(typ: int, info: int, lid: int) -> int:
    return typ | (info << 8) | (lid << 16)


@pytest.fixture
def h(mdaemon: Daemon) -> Iterator[HostNvme]:
    with enabled_nvme(mdaemon.socket, (1, 2, 3)) as n:
        yield n


def rw_ok(h: HostNvme, qid: int, lba: int) -> None:
    buf = h.ram.alloc(PAGE)
    data = os.urandom(PAGE)
    h.fill(buf, data)
    assert h.rw(qid, True, NS_RAM, lba, 8, buf) == 0
    h.fill(buf, bytes(PAGE))
    assert h.rw(qid, False, NS_RAM, lba, 8, buf) == 0
    assert h.read(buf, PAGE) == data


def error_log(h: HostNvme) -> list[tuple[int, int, int, int]]:
    """Error Information entries (count, sqid, cid, status) with a non-zero count (RAE=0)."""
    st, data = h.get_log_page(LOG_ERROR, 64 * 4)
    assert st == 0
    out = []
    for i in range(4):
        count, sqid, cid, status = struct.unpack_from("<QHHH", data, 64 * i)
        if count:
            out.append((count, sqid, cid, status))
    return out


def cq_entry_pending(h: HostNvme, qid: int) -> bool:
    q = h.queues[qid]
    dw3 = int.from_bytes(h.read(q.cq + q.head * 16 + 12, 4), "little")
    return (dw3 >> 16) & 1 == q.phase


def test_sq_tail_out_of_range_error_aer_and_queue_skipped(h: HostNvme) -> None:
    aer = h.submit_aer()
    rw_ok(h, 2, 0)
    h.ring(2, 100)                                 # SQ 2 has 32 entries: tail 100 is invalid
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.status == 0
    assert e.dw0 == aer_dw0(0, 0x01, LOG_ERROR)    # Error, Invalid Doorbell Write Value, log 01h
    log = error_log(h)
    assert log and log[0][1] == 2                  # newest entry: SQ 2
    # Other queues keep serving while SQ 2 is skipped.
    for k in range(10):
        rw_ok(h, 1, 8 * k)
        rw_ok(h, 3, 8 * k)
    assert not cq_entry_pending(h, 2)              # nothing was fetched from SQ 2
    # A valid tail again (the host's real next tail): SQ 2 resumes where it was.
    rw_ok(h, 2, 64)


def test_cq_head_out_of_range_error_aer(h: HostNvme) -> None:
    aer = h.submit_aer()
    rw_ok(h, 3, 0)
    h.ring(3, 40, cq=True)                         # CQ 3 has 32 entries
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x01, LOG_ERROR)
    assert error_log(h)[0][1] == 3
    rw_ok(h, 1, 0)


def test_doorbell_of_missing_queue_error_aer_info_00(h: HostNvme) -> None:
    aer = h.submit_aer()
    h.ring(9, 1)                                   # SQ 9 does not exist (mmapped write)
    e = h.wait_cid(0, aer, AER_WAIT)               # bounded: noticed by the admin poller
    assert e.dw0 == aer_dw0(0, 0x00, LOG_ERROR)    # Write to Invalid Doorbell Register
    assert error_log(h)[0][1] == 9
    # Same for a CQ head doorbell, after the log read unmasked Error events.
    aer = h.submit_aer()
    h.ring(12, 3, cq=True)
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x00, LOG_ERROR)
    rw_ok(h, 1, 0)


def test_doorbell_of_missing_queue_trapped(h: HostNvme) -> None:
    aer = h.submit_aer()
    h.ring(20, 5, trapped=True)                    # REGION_WRITE to BAR0 0x10A0
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x00, LOG_ERROR)


def test_error_event_retained_until_aer_then_masked_until_log_read(h: HostNvme) -> None:
    h.ring(2, 77)                                  # event with no AER outstanding: retained
    rw_ok(h, 1, 0)
    aer = h.submit_aer()
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x01, LOG_ERROR)
    # Masked until log 01h is read: a second event does not complete the next AER.
    aer2 = h.submit_aer()
    h.ring(3, 99)
    rw_ok(h, 1, 8)
    h.c.poll(0.2)
    assert all(s.cid != aer2 for s in h.stray.get(0, []))
    assert not cq_entry_pending(h, 0)
    error_log(h)                                   # RAE = 0: unmask
    rw_ok(h, 1, 16)
    h.ring(1, 1000)                                # a new event now completes aer2
    e = h.wait_cid(0, aer2, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x01, LOG_ERROR)


def test_disable_with_outstanding_aer_then_reenable(h: HostNvme) -> None:
    aer = h.submit_aer()
    rw_ok(h, 1, 0)
    q0 = h.queues[0]
    cq_base, head, phase = q0.cq, q0.head, q0.phase
    h.disable()                                    # EN 1 -> 0
    # No completion was posted for the aborted AER.
    dw3 = int.from_bytes(h.read(cq_base + head * 16 + 12, 4), "little")
    assert (dw3 >> 16) & 1 != phase
    assert h.reg_read(0x1C) & 3 == 0               # not ready, not fatal
    # Re-enable cleanly: fresh admin queue, I/O queues gone, ids reusable.
    h.enable()
    assert h.identify(1)[4:24].rstrip() == b"VNVMENVME0"
    st, _ = h.admin(0x00, 0, 0, 0, (1,))
    assert st & 0x7FF == 0x101                     # SQ 1 was deleted by the disable
    h.create_io_queue(1, 16)
    rw_ok(h, 1, 0)
    dw3 = int.from_bytes(h.read(cq_base + head * 16 + 12, 4), "little")
    assert (dw3 >> 16) & 1 != phase                # still nothing in the old admin CQ
    aer = h.submit_aer()                           # AERs work after re-enable
    h.ring(1, 500)
    e = h.wait_cid(0, aer, AER_WAIT)
    assert e.dw0 == aer_dw0(0, 0x01, LOG_ERROR)


def test_normal_shutdown_sets_shst_complete(h: HostNvme) -> None:
    rw_ok(h, 1, 0)
    csts = h.shutdown()
    assert (csts >> 2) & 3 == 2                    # SHST = 10b: shutdown complete
    assert csts & 2 == 0                           # no CFS
    # After shutdown the host resets (EN 1->0) and may enable again.
    h.disable()
    assert (h.reg_read(0x1C) >> 2) & 3 == 0
    h.enable()
    h.create_io_queue(1, 16)
    rw_ok(h, 1, 8)


def test_shutdown_persists_file_namespace(mdaemon: Daemon, h: HostNvme) -> None:
    buf = h.ram.alloc(PAGE)
    data = os.urandom(PAGE)
    h.fill(buf, data)
    assert h.rw(2, True, 2, 300, 8, buf) == 0      # nsid 2 = the image file
    h.shutdown()
    with open(mdaemon.img, "rb") as f:
        f.seek(300 * 512)
        assert f.read(PAGE) == data


def test_enable_with_unmapped_admin_queue_is_fatal_not_a_hang(mdaemon: Daemon) -> None:
    host = Host(mdaemon.socket)
    try:
        h = host.nvme
        assert h is not None
        h.reg_write(0x24, (31 << 16) | 31)
        h.reg_write(0x28, 1 << 40, 8)              # ASQ outside guest memory
        h.reg_write(0x30, h.ram.alloc(PAGE), 8)
        h.reg_write(0x14, (4 << 20) | (6 << 16) | 1)
        csts = h.wait_csts(2, 2)                   # CSTS.CFS
        assert csts & 2
        h.reg_write(0x14, 0)                       # reset recovers the controller
        h.wait_csts(3, 0)
        h.enable()
        h.create_io_queue(1, 16)
        rw_ok(h, 1, 0)
    finally:
        host.close()
