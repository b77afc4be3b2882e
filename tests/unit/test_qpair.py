"""A host-driver simulation against QueueRunner on FlatMemory and a real doorbell mmap.

Every test runs on both data paths (tests/unit/datapaths.py): the Python QueueRunner
and the native one, whose C loop hands these tests' SQEs (a test opcode) to Python
one at a time, so doorbells, flow control, EventIdx and interrupts go through both.
"""
import mmap
import os
import time

import pytest

from backends.base import create_backend
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor, IoOpcode
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from tests.unit.datapaths import runner
from nvme.state import CqState, ShadowDoorbells, SqState
from nvme.status import Status

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("qpair_datapath")]
DATAPATH = "python"            # set per test by the qpair_datapath fixture

P = 4096
RAM = 0x100000
SQ1, CQ1, SQ2, CQ2, DATA, DBBUF, EVIDX = (RAM + i * P for i in range(7))


class Host:
    """Minimal guest driver: builds SQEs, rings doorbells, reads CQEs by phase."""

    def __init__(self, execute=None, shadow=None):
        self.mm = mmap.mmap(-1, P)
        self.db = Doorbells(memoryview(self.mm))
        self.ram = bytearray(16 * P)
        self.mem = FlatMemory()
        self.mem.add(RAM, self.ram)
        self.irqs, self.errors, self.faults, self.calls = [], [], [], []
        self.execute = execute or self.default_execute
        self.runner = runner(DATAPATH, doorbells=self.db, mem=self.mem,
                             execute=lambda s, q: self.execute(s, q), irq=self.irqs.append,
                             doorbell_error=lambda i, q: self.errors.append((i, q)),
                             shadow=shadow, fault=lambda q, r: self.faults.append(q))
        self.sq_tail = {}
        self.cq_head = {}
        self.cq_phase = {}
        self.sizes = {}

    def default_execute(self, sqe, sqid):
        self.calls.append((sqid, sqe[0] >> 16))
        return (sqe[10], sqe[11])          # status and dw0 chosen by the test via CDW10/11

    def create(self, qid, sq_base, cq_base, sq_size, cq_size, iv=None, ien=True):
        self.runner.add_cq(CqState(cqid=qid, base=cq_base, size=cq_size, iv=qid if iv is None else iv, ien=ien))
        self.runner.add_sq(SqState(sqid=qid, cqid=qid, base=sq_base, size=sq_size))
        self.sq_tail[qid], self.cq_head[qid], self.cq_phase[qid] = 0, 0, 1
        self.sizes[qid] = (sq_base, cq_base, sq_size, cq_size)

    def submit(self, qid, cid, status=0, dw0=0, opc=0x99, ring=True):
        sq_base, _, sq_size, _ = self.sizes[qid]
        t = self.sq_tail[qid]
        d = memoryview(self.ram).cast("I")
        i = (sq_base - RAM) // 4 + t * 16
        d[i:i + 16] = memoryview(bytearray(64)).cast("I")
        d[i] = opc | (cid << 16)
        d[i + 10], d[i + 11] = status, dw0
        self.sq_tail[qid] = (t + 1) % sq_size
        if ring:
            self.db.set_sq_tail(qid, self.sq_tail[qid])

    def reap(self, qid, ring=True):
        """All new CQEs (by phase), as (dw0, sqhd, sqid, cid, status)."""
        _, cq_base, _, cq_size = self.sizes[qid]
        d = memoryview(self.ram).cast("I")
        out = []
        while True:
            i = (cq_base - RAM) // 4 + self.cq_head[qid] * 4
            w3 = d[i + 3]
            if (w3 >> 16) & 1 != self.cq_phase[qid]:
                break
            out.append((d[i], d[i + 2] & 0xFFFF, d[i + 2] >> 16, w3 & 0xFFFF, (w3 >> 17) & 0x7FF))
            h = self.cq_head[qid] + 1
            if h == cq_size:
                h = 0
                self.cq_phase[qid] ^= 1
            self.cq_head[qid] = h
        if ring and out:
            self.db.set_cq_head(qid, self.cq_head[qid])
        return out

    def close(self):
        del self.runner, self.db
        try:
            self.mm.close()
        except BufferError:
            pass  # a logged traceback still references a view; the mapping dies with it


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


def test_basic_completion_fields_and_one_irq(host):
    host.create(1, SQ1, CQ1, 8, 8, iv=3)
    host.submit(1, cid=0x11, dw0=0xCAFE)
    host.submit(1, cid=0x22, status=Status.INVALID_FIELD)
    assert host.runner.poll() == 2
    cqes = host.reap(1)
    assert cqes == [(0xCAFE, 1, 1, 0x11, 0), (0, 2, 1, 0x22, Status.INVALID_FIELD & 0x7FF)]
    assert host.irqs == [3]
    assert host.runner.poll() == 0 and host.irqs == [3]   # nothing new: no irq


def test_phase_wraps(host):
    host.create(1, SQ1, CQ1, 4, 4)
    seen = []
    for rnd in range(4):
        for k in range(3):
            host.submit(1, cid=rnd * 10 + k)
        host.runner.poll()
        seen += [c[3] for c in host.reap(1)]
    assert seen == [r * 10 + k for r in range(4) for k in range(3)]
    assert host.runner.cq_state(1).phase == 0 and host.runner.cq_state(1).tail == 0


def test_invalid_sq_tail_reported_once_and_other_queues_run(host):
    host.create(1, SQ1, CQ1, 8, 8)
    host.create(2, SQ2, CQ2, 8, 8)
    host.db.set_sq_tail(1, 0xFFFFFFFF)
    host.submit(2, cid=5)
    assert host.runner.poll() == 1
    assert host.errors == [(1, 1)]
    assert host.runner.sq_state(1).broken
    host.submit(2, cid=6)
    assert host.runner.poll() == 1 and host.errors == [(1, 1)]   # not repeated, never spun
    assert [c[3] for c in host.reap(2)] == [5, 6]
    host.submit(1, cid=7)                                        # valid value again
    assert host.runner.poll() == 1 and [c[3] for c in host.reap(1)] == [7]
    assert not host.runner.sq_state(1).broken


def test_invalid_cq_head_skips_queue_until_fixed(host):
    host.create(1, SQ1, CQ1, 8, 8)
    host.submit(1, cid=1)
    host.runner.poll()
    host.reap(1, ring=False)
    host.db.set_cq_head(1, 5)            # beyond what was posted
    host.submit(1, cid=2)
    assert host.runner.poll() == 0
    assert host.errors == [(1, 1)]
    assert host.runner.poll() == 0 and host.errors == [(1, 1)]
    host.db.set_cq_head(1, 1)
    assert host.runner.poll() == 1
    assert [c[3] for c in host.reap(1)] == [2]


def test_cq_flow_control_with_full_cq(host):
    host.create(1, SQ1, CQ1, 16, 4)          # CQ holds 3
    for cid in range(10):
        host.submit(1, cid=cid)
    assert host.runner.poll() == 3
    assert host.runner.poll() == 0           # CQ full: nothing fetched, nothing overwritten
    assert host.runner.sq_state(1).head == 3
    got = [c[3] for c in host.reap(1)]
    assert host.runner.poll() == 3
    got += [c[3] for c in host.reap(1)]
    assert host.runner.poll() == 3
    got += [c[3] for c in host.reap(1)]
    assert host.runner.poll() == 1
    got += [c[3] for c in host.reap(1)]
    assert got == list(range(10))


def test_parked_commands_reserve_cq_slots():
    parked = []

    def execute(sqe, sqid):
        parked.append((sqid, sqe[0] >> 16))
        return None

    h = Host(execute=execute)
    try:
        h.create(1, SQ1, CQ1, 16, 4)
        for cid in range(6):
            h.submit(1, cid=cid)
        assert h.runner.poll() == 0
        assert h.runner.inflight() == 3 and len(parked) == 3       # 3 free CQ slots
        assert h.runner.poll() == 0 and len(parked) == 3
        h.runner.complete(1, 1, 0, 0x77)
        assert h.reap(1) == [(0x77, 3, 1, 1, 0)]
        assert h.irqs == [1]
        h.runner.complete(1, 1, 0, 0)                               # unknown now: ignored
        assert h.runner.inflight() == 2
        assert h.runner.poll() == 0 and len(parked) == 4
    finally:
        h.close()


def test_cid_conflict_with_parked_command():
    h = Host(execute=lambda s, q: None)
    try:
        h.create(1, SQ1, CQ1, 8, 8)
        h.submit(1, cid=9)
        h.submit(1, cid=9)
        h.runner.poll()
        assert [(c[3], c[4]) for c in h.reap(1)] == [(9, Status.CID_CONFLICT)]
        assert h.runner.inflight() == 1
    finally:
        h.close()


def test_delete_after_the_front_end_took_the_records_back(host):
    """A Delete whose answer the front-end stopped waiting for (a timeout under load made
    the controller fatal; the front-end cleared the records) reaches the worker late:
    the queues go, parked commands still complete, and nothing is asserted or raised."""
    host.execute = lambda s, q: None
    host.create(1, SQ1, CQ1, 8, 8)
    host.submit(1, cid=4)
    host.runner.poll()
    host.runner.table.clear_sq(1)
    host.runner.table.clear_cq(1)
    assert host.runner.remove_sq(1) is None
    assert host.runner.inflight() == 0
    assert host.runner.remove_cq(1) is None
    assert host.runner.queue_ids() == ([], [])


def test_remove_sq_aborts_parked(host):
    host.execute = lambda s, q: None
    host.create(1, SQ1, CQ1, 8, 8)
    host.submit(1, cid=4)
    host.runner.poll()
    st = host.runner.remove_sq(1)
    assert st.sqid == 1 and host.runner.inflight() == 0
    assert [(c[3], c[4]) for c in host.reap(1)] == [(4, Status.ABORTED_SQ_DELETION)]
    assert host.runner.remove_cq(1).cqid == 1


def test_remove_cq_with_sq_refused(host):
    host.create(1, SQ1, CQ1, 8, 8)
    with pytest.raises(ValueError):
        host.runner.remove_cq(1)


def test_shadow_doorbells_and_eventidx():
    h = Host(shadow=ShadowDoorbells(dbbuf=DBBUF, eventidx=EVIDX))
    try:
        h.create(1, SQ1, CQ1, 8, 8)
        sh = memoryview(h.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")
        ev = memoryview(h.ram)[EVIDX - RAM:EVIDX - RAM + P].cast("I")
        assert ev[3] == 0xFFFFFFFF                    # CQ1 head eventidx: never ring
        h.submit(1, cid=1, ring=False)
        h.submit(1, cid=2, ring=False)
        h.db.set_sq_tail(1, 1)                        # stale real doorbell is ignored
        sh[2] = 2                                     # shadow SQ1 tail
        assert h.runner.poll() == 2
        assert ev[2] == 2                             # EventIdx = tail consumed up to
        assert not h.runner.has_work()
        h.reap(1, ring=False)
        sh[3] = h.cq_head[1]                          # shadow CQ head
        h.submit(1, cid=3, ring=False)
        sh[2] = 3
        assert h.runner.poll() == 1
        # the host advancing during execution: the re-read after EventIdx catches it
        def racing(sqe, sqid):
            h.submit(1, cid=50, ring=False)
            sh[2] = h.sq_tail[1]
            h.execute = h.default_execute
            return (0, 0)
        h.execute = racing
        h.submit(1, cid=4, ring=False)
        sh[2] = h.sq_tail[1]
        n = h.runner.poll()
        if n == 1:                # Python: the SQE that arrived meanwhile is the next poll's
            assert h.runner.has_work()
            n += h.runner.poll()
        # (native: after Python ran the SQE the C loop went on and read the new tail)
        assert n == 2 and not h.runner.has_work()
        assert ev[2] == h.sq_tail[1]
    finally:
        h.close()


def test_dropping_shadow_never_writes_the_doorbell_page():
    """set_shadow(None) (shadow pages unmapped) must not store into the doorbell page: a
    guest doorbell write made at that instant would be lost.  The stale value the page
    holds from shadow mode is disregarded (no lap of phantom SQEs, no bad-head report)
    until the host writes a new one, which is then taken."""
    h = Host(shadow=ShadowDoorbells(dbbuf=DBBUF, eventidx=EVIDX))
    try:
        h.create(1, SQ1, CQ1, 8, 8)
        sh = memoryview(h.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")
        h.db.set_sq_tail(1, 1)                        # rung once, long ago
        h.db.set_cq_head(1, 0)
        for cid in range(1, 4):
            h.submit(1, cid=cid, ring=False)
        sh[2] = h.sq_tail[1]
        assert h.runner.poll() == 3
        h.reap(1, ring=False)
        sh[3] = h.cq_head[1]
        h.runner.poll()
        before = bytes(h.mm)
        h.runner.set_shadow(None)
        assert bytes(h.mm) == before                  # not one doorbell word written
        assert h.runner.poll() == 0 and not h.errors  # stale tail 1 (behind head 3): ignored
        h.submit(1, cid=9)                            # the host rings the real doorbell now
        assert h.runner.poll() == 1
        assert [c[3] for c in h.reap(1)] == [9]
        assert not h.errors
    finally:
        h.close()


def test_admin_queue_never_uses_shadow():
    h = Host(shadow=ShadowDoorbells(dbbuf=DBBUF, eventidx=EVIDX))
    try:
        h.create(0, SQ1, CQ1, 4, 4)
        h.submit(0, cid=1)                            # real doorbell only
        assert h.runner.poll() == 1
    finally:
        h.close()


def test_coalescing_threshold_time_and_exempt(host):
    host.create(1, SQ1, CQ1, 16, 16, iv=1)
    host.create(2, SQ2, CQ2, 16, 16, iv=2)
    host.runner.set_coalescing(3, 100, exempt_vectors={2})   # 4 entries or 10 ms
    host.submit(1, cid=1)
    host.submit(1, cid=2)
    host.submit(2, cid=3)
    host.runner.poll()
    assert host.irqs == [2]                                  # exempt vector fires at once
    assert host.runner.coalesce_deadline() is not None
    host.submit(1, cid=4)
    host.submit(1, cid=5)
    host.runner.poll()
    assert host.irqs == [2, 1]                               # threshold reached
    host.reap(1)
    host.runner.set_coalescing(200, 1, exempt_vectors=set())  # 100 us
    host.submit(1, cid=6)
    host.runner.poll()
    assert host.irqs == [2, 1]
    time.sleep(0.002)
    host.runner.poll()                                       # no new work, timer flushes
    assert host.irqs == [2, 1, 1]


def test_no_irq_when_disabled(host):
    host.create(1, SQ1, CQ1, 8, 8, ien=False)
    host.submit(1, cid=1)
    assert host.runner.poll() == 1 and host.irqs == []


def test_executor_bug_becomes_internal_error(host):
    def boom(sqe, sqid):
        raise RuntimeError("bug")
    host.execute = boom
    host.create(1, SQ1, CQ1, 8, 8)
    host.submit(1, cid=3)
    assert host.runner.poll() == 1
    assert [(c[3], c[4]) for c in host.reap(1)] == [(3, Status.INTERNAL_ERROR)]


def test_pause_fetch(host):
    host.create(1, SQ1, CQ1, 8, 8)
    host.submit(1, cid=1)
    host.runner.pause_fetch(True)
    assert host.runner.poll() == 0
    host.runner.pause_fetch(False)
    assert host.runner.poll() == 1


def test_set_memory_fault_reported(host):
    host.create(1, SQ1, CQ1, 8, 8)
    mem2 = FlatMemory()
    mem2.add(RAM, memoryview(host.ram)[:P])              # CQ1 page gone
    host.runner.set_memory(mem2)
    assert host.faults == [1]
    host.submit(1, cid=1)
    assert host.runner.poll() == 0
    host.runner.set_memory(host.mem)
    assert host.runner.poll() == 1


def test_add_queue_checks(host):
    with pytest.raises(ValueError):
        host.runner.add_sq(SqState(sqid=1, cqid=1, base=SQ1, size=8))   # no CQ
    with pytest.raises(Exception):
        host.runner.add_cq(CqState(cqid=1, base=0x900000, size=8, iv=0, ien=True))


def test_budget_limits_batch(host):
    host.create(1, SQ1, CQ1, 16, 16)
    for cid in range(10):
        host.submit(1, cid=cid)
    assert host.runner.poll(budget=4) == 4
    assert host.runner.has_work()
    assert host.runner.poll() == 6


def test_snapshot_restore_continues(host):
    host.create(1, SQ1, CQ1, 4, 4)
    for cid in range(3):
        host.submit(1, cid=cid)
    host.runner.poll()
    host.reap(1)
    snap = host.runner.snapshot()
    r2 = runner(DATAPATH, doorbells=host.db, mem=host.mem, execute=host.default_execute,
                irq=host.irqs.append, doorbell_error=lambda i, q: None)
    for c in snap["cqs"]:
        r2.add_cq(CqState.from_dict(c))
    for s in snap["sqs"]:
        r2.add_sq(SqState.from_dict(s))
    host.runner = r2
    host.submit(1, cid=7)
    assert r2.poll() == 1
    assert host.reap(1) == [(0, 0, 1, 7, 0)]      # phase flipped correctly across restore


def test_end_to_end_with_io_executor():
    b = create_backend("ram", "1M", name_prefix=f"vnvmedqp{os.getpid()}")
    h = Host()
    try:
        ex = IoExecutor({1: Namespace.for_backend(1, b)}, h.mem, 0)
        h.execute = lambda sqe, sqid: ex.execute(sqe)
        if DATAPATH == "native":   # the C loop serves this namespace itself
            h.runner = runner(DATAPATH, executor=ex, doorbells=h.db, mem=h.mem, execute=h.execute,
                              irq=h.irqs.append, doorbell_error=lambda i, q: None)
        h.create(1, SQ1, CQ1, 8, 8)
        d = memoryview(h.ram).cast("I")
        h.ram[DATA - RAM:DATA - RAM + 512] = b"Q" * 512
        h.submit(1, cid=1, opc=IoOpcode.WRITE)
        i = (SQ1 - RAM) // 4
        d[i + 1], d[i + 6], d[i + 10], d[i + 11], d[i + 12] = 1, DATA, 9, 0, 0
        h.runner.poll()
        assert h.reap(1) == [(0, 1, 1, 1, 0)]
        out = bytearray(512)
        b.read_into(9 * 512, [memoryview(out)])
        assert out == b"Q" * 512
    finally:
        h.close()
        b.destroy()
