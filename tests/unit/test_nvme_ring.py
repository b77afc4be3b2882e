"""nvme.ring: queue arithmetic and CQE posting (reactor/shm ring tests are test_ring.py)."""
import pytest

from nvme import ring
from nvme.state import CqState, SqState
from nvme.status import Status, dw3

pytestmark = pytest.mark.timeout(20)


def test_free_slots_and_pending():
    assert ring.free_slots(0, 0, 4) == 3
    assert ring.free_slots(1, 0, 4) == 0          # full: tail + 1 == head
    assert ring.free_slots(2, 1, 4) == 0
    assert ring.used(3, 1, 4) == 2
    sq = SqState(sqid=1, cqid=1, base=0, size=8, head=6, tail=2)
    assert ring.sq_pending(sq) == 4


def test_tail_and_head_validation():
    sq = SqState(sqid=1, cqid=1, base=0, size=8)
    assert ring.valid_sq_tail(sq, 7) and not ring.valid_sq_tail(sq, 8)
    assert not ring.valid_sq_tail(sq, 0xFFFFFFFF)
    cq = CqState(cqid=1, base=0, size=8, iv=0, ien=True, tail=3, head=1)
    assert ring.valid_cq_head(cq, 1) and ring.valid_cq_head(cq, 3)
    assert not ring.valid_cq_head(cq, 4)          # beyond what was posted
    assert not ring.valid_cq_head(cq, 0)          # moving backwards
    assert not ring.valid_cq_head(cq, 8)
    wrapped = CqState(cqid=1, base=0, size=8, iv=0, ien=True, tail=1, head=6)
    assert ring.valid_cq_head(wrapped, 0) and ring.valid_cq_head(wrapped, 7)
    assert not ring.valid_cq_head(wrapped, 2)


def test_fetch_budget_bounded_by_cq_and_inflight():
    sq = SqState(sqid=1, cqid=1, base=0, size=16, head=0, tail=10)
    cq = CqState(cqid=1, base=0, size=4, iv=0, ien=True)
    assert ring.fetch_budget(sq, cq, 0) == 3
    assert ring.fetch_budget(sq, cq, 2) == 1
    assert ring.fetch_budget(sq, cq, 5) == 0


def test_post_and_phase_wrap():
    buf = bytearray(4 * 16)
    m = memoryview(buf).cast("I")
    cq = CqState(cqid=1, base=0, size=4, iv=0, ien=True)
    for i in range(4):
        ring.post_cqe(m, cq, dw0=0x1000 + i, sqhd=i + 1, sqid=3, cid=0x10 + i, status=0)
        cq.head = cq.tail  # host consumes
    assert cq.tail == 0 and cq.phase == 0
    assert m[0] == 0x1000 and m[2] == (1 | (3 << 16)) and m[3] == dw3(0x10, 0, 1)
    assert m[15] & (1 << 16)                       # last slot still phase 1
    ring.post_cqe(m, cq, 7, 5, 3, 0x99, Status.INVALID_FIELD)
    assert m[3] == dw3(0x99, Status.INVALID_FIELD, 0)
    assert (m[3] >> 16) & 1 == 0 and (m[3] >> 17) & 0xFF == 0x02 and m[3] >> 31 == 1
    assert cq.tail == 1


class Recorder:
    """A fake 'I' view that records every item store, in order."""
    format = "I"

    def __init__(self, n):
        self.words = [0] * n
        self.log = []

    def __setitem__(self, i, v):
        self.log.append((i, v))
        self.words[i] = v


def test_dw3_is_the_last_and_only_store_to_dword3():
    r = Recorder(8)
    cq = CqState(cqid=2, base=0, size=2, iv=0, ien=True, tail=1)
    ring.post_cqe(r, cq, 0xAAAA, 4, 2, 0x1234, 0)
    idx = [i for i, _ in r.log]
    assert idx[-1] == 7 and idx.count(7) == 1
    assert sorted(idx) == [4, 5, 6, 7]
    assert r.words[7] == dw3(0x1234, 0, 1)
    assert cq.tail == 0 and cq.phase == 0


def test_post_through_byte_view_matches_bytes():
    buf = bytearray(32)
    cq = CqState(cqid=1, base=0, size=2, iv=0, ien=True)
    ring.post_cqe(memoryview(buf), cq, 0x01020304, 0x0506, 0x0708, 0x090A, 0)
    assert bytes(buf[:16]) == bytes.fromhex("04030201 00000000 06050807 0a090100".replace(" ", ""))
