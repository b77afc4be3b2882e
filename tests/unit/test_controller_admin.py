"""Identify contents and every Create/Delete I/O queue status code."""
import struct

import pytest

from nvme.config import ControllerConfig
from nvme.status import Status
from tests.unit.test_controller_harness import MEM_BASE, MEM_SIZE, QMEM, Host, ready_host


def test_identify_controller_fields():
    h = ready_host(cfg=ControllerConfig(serial="SN123", model="M", mdts=5, cntlid=7,
                                        subnqn="nqn.test:x", vid=0x1234, ssvid=0x5678))
    c, d = h.identify(1)
    assert c.status == 0
    assert struct.unpack_from("<HH", d, 0) == (0x1234, 0x5678)
    assert d[4:24] == b"SN123".ljust(20) and d[24:64] == b"M".ljust(40) and d[64:72] == b"0.1".ljust(8)
    assert d[77] == 5 and struct.unpack_from("<H", d, 78)[0] == 7
    assert struct.unpack_from("<I", d, 80)[0] == 0x00010400
    assert struct.unpack_from("<I", d, 92)[0] & (1 << 8)          # OAES NS attribute
    assert struct.unpack_from("<H", d, 256)[0] & (1 << 8)         # OACS DBBUF
    assert d[259] == 3 and d[262] == 63
    assert d[512] == 0x66 and d[513] == 0x44
    assert struct.unpack_from("<I", d, 516)[0] == 32               # NN
    oncs = struct.unpack_from("<H", d, 520)[0]
    assert oncs & (1 << 2) and oncs & (1 << 3) and oncs & 1 and oncs & (1 << 6)  # DSM, WZ, compare, timestamp
    assert d[525] & 1 and struct.unpack_from("<I", d, 536)[0] & 3
    assert d[768:768 + 10] == b"nqn.test:x" and d[778] == 0


def test_identify_controller_without_dbbuf():
    h = ready_host(cfg=ControllerConfig(shadow_doorbells=False))
    _, d = h.identify(1)
    assert not struct.unpack_from("<H", d, 256)[0] & (1 << 8)
    assert h.cmd(0x7C, prp1=MEM_BASE + 0x20000, prp2=MEM_BASE + 0x21000).status == Status.INVALID_OPCODE


def test_identify_namespace_sizes():
    h = ready_host()
    _, d = h.identify(0, nsid=2)
    nsze, ncap, nuse = struct.unpack_from("<QQQ", d)
    assert nsze == ncap == nuse == 100
    assert (struct.unpack_from("<I", d, 128)[0] >> 16) & 0xFF == 12    # 4096-byte blocks
    _, d1 = h.identify(0, nsid=1)
    assert struct.unpack_from("<Q", d1)[0] == 2048 and d1[130] == 9
    assert d1[104:120] != d[104:120] and any(d1[104:120])
    _, inactive = h.identify(0, nsid=5)
    assert inactive == bytes(4096)
    assert h.identify(0, nsid=0)[0].status == Status.INVALID_NAMESPACE
    assert h.identify(0, nsid=0xFFFFFFFF)[0].status == Status.INVALID_NAMESPACE


def test_identify_lists_and_descriptors():
    h = ready_host()
    _, d = h.identify(2, nsid=0)
    assert struct.unpack_from("<3I", d) == (1, 2, 0)
    _, d = h.identify(2, nsid=1)
    assert struct.unpack_from("<2I", d) == (2, 0)
    c, d = h.identify(3, nsid=1)
    assert c.status == 0 and d[0:2] == bytes([2, 16]) and d[20:22] == bytes([3, 16])
    assert h.identify(3, nsid=9)[0].status == Status.INVALID_NAMESPACE
    assert h.identify(0x10)[0].status == Status.INVALID_FIELD


def test_identify_bad_prp_is_data_transfer_error():
    h = ready_host()
    assert h.cmd(0x06, prp1=0x10, cdw=(1,)).status == Status.DATA_TRANSFER_ERROR
    assert h.cmd(0x06, prp1=MEM_BASE + 0x10001, cdw=(1,)).status == Status.INVALID_PRP_OFFSET


def test_create_queues_success_zeroes_doorbells_and_calls_hooks():
    h = ready_host()
    h.db[2 * 3] = 7
    h.db[2 * 3 + 1] = 9
    assert h.create_cq(3, entries=8, iv=5).status == 0
    assert h.db[7] == 0
    assert h.create_sq(3, 3, entries=8).status == 0
    assert h.db[6] == 0
    cq, sq = h.ctrl.queues.cqs[3], h.ctrl.queues.sqs[3]
    assert (cq.size, cq.iv, cq.ien, cq.base) == (8, 5, True, QMEM + 0x3000)
    assert (sq.size, sq.cqid) == (8, 3)
    assert h.hooks.calls == [("cq+", 3), ("sq+", 3)]


@pytest.mark.parametrize("kw,status", [
    (dict(qid=0), Status.INVALID_QUEUE_IDENTIFIER),
    (dict(qid=65), Status.INVALID_QUEUE_IDENTIFIER),
    (dict(qid=1, entries=1), Status.INVALID_QUEUE_SIZE),
    (dict(qid=1, entries=1025), Status.INVALID_QUEUE_SIZE),
    (dict(qid=1, pc=0), Status.INVALID_FIELD),
    (dict(qid=1, iv=64), Status.INVALID_INTERRUPT_VECTOR),
    (dict(qid=1, base=QMEM + 8), Status.INVALID_PRP_OFFSET),
    (dict(qid=1, base=MEM_BASE + MEM_SIZE), Status.INVALID_FIELD),
])
def test_create_cq_errors(kw, status):
    h = ready_host()
    assert h.create_cq(**kw).status == status
    assert not h.ctrl.queues.cqs and not h.hooks.calls


def test_create_cq_in_use_and_sq_errors():
    h = ready_host()
    h.create_cq(1)
    assert h.create_cq(1).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.create_sq(1, 2).status == Status.COMPLETION_QUEUE_INVALID
    assert h.create_sq(1, 0).status == Status.COMPLETION_QUEUE_INVALID
    assert h.create_sq(0, 1).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.create_sq(1, 1, entries=1).status == Status.INVALID_QUEUE_SIZE
    assert h.create_sq(1, 1, entries=2000).status == Status.INVALID_QUEUE_SIZE
    assert h.create_sq(1, 1, pc=0).status == Status.INVALID_FIELD
    assert h.create_sq(1, 1).status == 0
    assert h.create_sq(1, 1).status == Status.INVALID_QUEUE_IDENTIFIER


def test_queue_entry_sizes_checked_at_create_time():
    h = Host()
    h.enable(cc=1)                              # IOSQES = IOCQES = 0
    assert h.ctrl.ready
    assert h.create_cq(1).status == Status.INVALID_FIELD


def test_number_of_queues_limits_qids():
    h = ready_host()
    assert h.set_feature(0x07, 0x00010001).dw0 == 0x00010001   # 2 SQs, 2 CQs
    assert h.create_cq(3).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.create_cq(2).status == 0


def test_delete_queues():
    h = ready_host()
    h.create_cq(1); h.create_sq(1, 1); h.create_sq(2, 1)
    h.db[2] = 3
    assert h.cmd(0x04, cdw=(1,)).status == Status.INVALID_QUEUE_DELETION
    assert h.cmd(0x00, cdw=(0,)).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.cmd(0x04, cdw=(0,)).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.cmd(0x00, cdw=(9,)).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.cmd(0x04, cdw=(9,)).status == Status.INVALID_QUEUE_IDENTIFIER
    assert h.cmd(0x00, cdw=(1,)).status == 0
    assert h.db[2] == 0
    assert h.cmd(0x00, cdw=(1,)).status == Status.INVALID_QUEUE_IDENTIFIER   # twice
    assert h.cmd(0x00, cdw=(2,)).status == 0
    assert h.cmd(0x04, cdw=(1,)).status == 0
    assert [c for c in h.hooks.calls if c[0].endswith("-")] == [("sq-", 1), ("sq-", 2), ("cq-", 1)]
    assert h.create_cq(1).status == 0 and h.create_sq(1, 1).status == 0       # re-create


def test_abort_and_keep_alive():
    h = ready_host()
    assert h.ok(0x08, cdw=(1 | (5 << 16),)).dw0 & 1 == 1
    assert h.ok(0x18).dw0 == 0


def test_doorbell_buffer_config():
    h = ready_host()
    h.create_cq(1); h.create_sq(1, 1)
    h.db[2] = 4          # SQ1 tail already rung
    dbbuf, ei = MEM_BASE + 0x20000, MEM_BASE + 0x21000
    assert h.cmd(0x7C, prp1=dbbuf, prp2=dbbuf).status == Status.INVALID_FIELD
    assert h.cmd(0x7C, prp1=dbbuf + 4, prp2=ei).status == Status.INVALID_FIELD
    assert h.cmd(0x7C, prp1=dbbuf, prp2=0x10000000).status == Status.INVALID_FIELD
    assert h.ok(0x7C, prp1=dbbuf, prp2=ei)
    assert h.hooks.calls[-1] == ("shadow", dbbuf, ei)
    assert struct.unpack_from("<I", h.read(dbbuf + 8, 4))[0] == 4
    assert struct.unpack_from("<I", h.read(ei + 8, 4))[0] == 4
    # a new queue gets its shadow slot zeroed too
    h.write(dbbuf + 16, struct.pack("<I", 77))
    h.create_cq(2); h.create_sq(2, 2)
    assert struct.unpack_from("<I", h.read(dbbuf + 16, 4))[0] == 0
    # disable drops shadow mode
    h.disable()
    assert h.hooks.calls[-1] == ("shadow", 0, 0)


def test_delete_sq_waits_for_the_front_ends_commands_of_that_sq():
    """While the front-end still runs commands of an SQ (slow path), Delete I/O SQ is
    parked: no completion, the worker is not asked, a second delete of it is refused;
    sq_quiet() deletes it and completes the parked command.  A disable drops it."""
    h = ready_host()
    h.create_cq(1); h.create_sq(1, 1)
    h.hooks.busy_sqs.add(1)
    cid = h.submit(0x00, cdw=(1,))
    h.ctrl.poll_admin()
    assert [c for c in h.reap() if c.cid == cid] == []
    assert ("sq-", 1) not in h.hooks.calls
    assert h.cmd(0x00, cdw=(1,)).status == Status.INVALID_QUEUE_IDENTIFIER
    h.hooks.busy_sqs.clear()
    h.ctrl.sq_quiet(1)
    got = [c for c in h.reap() if c.cid == cid]
    assert len(got) == 1 and got[0].status == 0 and ("sq-", 1) in h.hooks.calls
    assert h.ok(0x04, cdw=(1,))                                  # now the CQ can go
    # parked, then the controller is disabled: nothing completes later
    h.create_cq(2); h.create_sq(2, 2)
    h.hooks.busy_sqs.add(2)
    h.submit(0x00, cdw=(2,))
    h.ctrl.poll_admin()
    h.disable()
    assert h.ctrl.sq_deletions == {}
    h.ctrl.sq_quiet(2)                                           # late: ignored
