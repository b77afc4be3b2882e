"""nvme.qtable: queue records round-trip, live in shared memory, and a second mapping
of the same memfd (another process: a worker, a new daemon) sees every word."""
import mmap
import os

import pytest

from nvme.qtable import (BROKEN, CQ_HEAD, CQ_TAIL, LIVE, SQ_FLAGS, SQ_HEAD, QueueTable,
                         table_bytes)
from nvme.state import CqState, SqState


def test_round_trip_and_clear():
    t = QueueTable.private(8)
    sq = SqState(sqid=3, cqid=2, base=0x1_2345_6000, size=64, prio=2, head=5, tail=9, broken=True)
    cq = CqState(cqid=2, base=0xFFFF_F000_0000, size=32, iv=7, ien=True, tail=4, phase=0, head=3)
    t.put_sq(sq)
    t.put_cq(cq)
    assert t.get_sq(3) == sq and t.get_cq(2) == cq
    assert t.sq(3)[SQ_FLAGS] == LIVE | BROKEN
    assert t.get_sq(2) is None and t.get_cq(3) is None
    assert [s.sqid for s in t.live_sqs()] == [3] and [c.cqid for c in t.live_cqs()] == [2]
    t.clear_sq(3)
    assert t.get_sq(3) is None and t.get_cq(2) == cq


def test_shared_between_two_mappings_of_one_memfd():
    fd = os.memfd_create("qtable-test")
    try:
        os.ftruncate(fd, table_bytes(4))
        a = mmap.mmap(fd, table_bytes(4))
        b = mmap.mmap(fd, table_bytes(4))
        ta = QueueTable(a, 4, init=True)
        tb = QueueTable(b, 4)                       # attaches: checks magic and version
        ta.put_cq(CqState(cqid=1, base=0x10000, size=16, iv=1, ien=False))
        r = ta.cq(1)
        r[CQ_TAIL] = 7                             # the owner's single-word stores ...
        r[CQ_HEAD] = 6
        assert tb.get_cq(1).tail == 7 and tb.get_cq(1).head == 6   # ... seen by the other side
        ta.put_sq(SqState(sqid=1, cqid=1, base=0x20000, size=16))
        tb.sq(1)[SQ_HEAD] = 5
        assert ta.get_sq(1).head == 5
        del r, ta, tb
        a.close(); b.close()
    finally:
        os.close(fd)


def test_rejects_what_is_not_a_table():
    with pytest.raises(ValueError, match="magic"):
        QueueTable(bytearray(table_bytes(2)), 2)
    with pytest.raises(ValueError, match="too small"):
        QueueTable(bytearray(64), 4, init=True)
    with pytest.raises(ValueError, match="outside"):
        QueueTable.private(2).sq(2)
