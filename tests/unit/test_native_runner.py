"""NativeQueueRunner's own rules (tests/unit/test_native_differential.py compares it with
the Python path wholesale): what runs in C, what falls back to Python and when, the
address checks at the top of the address space, and the start-up choice of data path."""
from __future__ import annotations

import mmap
import struct

import pytest

from backends.ram import RamBackend
from nvme import native
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from nvme.state import CqState, SqState
from nvme.status import Status
from ops import preflight
from ops.config import DaemonConfig, Datapath
from tests.unit.datapaths import REQUIRED, runner

P = 4096
RAM = 0x10_0000
TOP = (1 << 64) - 2 * P          # a region whose end is exactly 2^64

needs_native = pytest.mark.skipif(not native.available and not REQUIRED,
                                  reason=f"native data path {native.why_not}")


class Rig:
    def __init__(self, datapath: str, be: RamBackend) -> None:
        self.ram = bytearray(32 * P)
        self.top = bytearray(2 * P)
        self.mem = FlatMemory()
        self.mem.add(RAM, self.ram)
        self.mem.add(TOP, self.top)
        self.mm = mmap.mmap(-1, P)
        self.db = Doorbells(memoryview(self.mm))
        self.ex = IoExecutor({1: Namespace.for_backend(1, be)}, self.mem, 1 << 20)
        self.parked: list[int] = []
        self.r = runner(datapath, executor=self.ex, doorbells=self.db, mem=self.mem,
                        execute=self.execute, irq=lambda v: None, doorbell_error=lambda i, q: None)
        self.r.add_cq(CqState(cqid=1, base=RAM + P, size=16, iv=1, ien=False))
        self.r.add_sq(SqState(sqid=1, cqid=1, base=RAM, size=16))
        self.tail = 0

    def execute(self, sqe, sqid):
        if sqe[0] & 0xFF == 0x7E:        # "slow" opcode: parked like a slow-path command
            self.parked.append(sqe[0] >> 16)
            return None
        return self.ex.execute(sqe, sqid)

    def submit(self, opc, cid, prp1=0, nlb=1, slba=0, sgl=None):
        flags = 0x40 if sgl is not None else 0
        p1, p2 = struct.unpack("<QQ", sgl) if sgl is not None else (prp1, 0)
        e = struct.pack("<BBHIQQQQ6I", opc, flags, cid, 1, 0, 0, p1, p2, slba, 0, nlb - 1, 0, 0, 0)
        self.ram[self.tail * 64:self.tail * 64 + 64] = e
        self.tail += 1
        self.db.set_sq_tail(1, self.tail)

    def status(self, i):
        dw3 = memoryview(self.ram).cast("I")[(P + 16 * i) // 4 + 3]
        return dw3 & 0xFFFF, (dw3 >> 17) & 0x7FF

    def close(self):
        del self.r
        del self.db
        self.mm.close()


@pytest.fixture
def be():
    b = RamBackend.create(1 << 20, name_prefix=f"vnvmed-nr-{id(object())}")
    b.direct_memory[:P] = bytes(range(256)) * 16
    yield b
    b.destroy()


@needs_native
def test_reads_and_writes_run_in_c_the_rest_in_python(be):
    g = Rig("native", be)
    try:
        g.submit(0x02, 1, prp1=RAM + 8 * P, nlb=8)          # read: C
        g.submit(0x7F, 2)                                    # unknown opcode: Python
        g.submit(0x01, 3, prp1=RAM + 8 * P, nlb=8, slba=8)   # write: C
        assert g.r.poll() == 3
        assert [g.status(i) for i in range(3)] == [(1, 0), (2, Status.INVALID_OPCODE & 0x7FF), (3, 0)]
        assert g.r.native_io() == [1, 1, P, P] and g.ex.io == [0, 0, 0, 0]
        assert bytes(be.direct_memory[P:2 * P]) == bytes(range(256)) * 16
        assert g.r.python_polls == 0
    finally:
        g.close()


@needs_native
def test_parked_commands_send_their_sq_to_python_until_done(be):
    g = Rig("native", be)
    try:
        g.submit(0x7E, 5)                                    # parked (slow path)
        g.submit(0x02, 5, prp1=RAM + 8 * P, nlb=8)           # same CID while parked
        g.submit(0x02, 6, prp1=RAM + 8 * P, nlb=8)
        assert g.r.poll() == 2
        assert g.status(0) == (5, Status.CID_CONFLICT & 0x7FF)   # Python's answer, not C's
        assert g.status(1) == (6, 0)
        assert g.r.native_io() == [0, 0, 0, 0]               # the SQ had a parked command
        g.r.complete(1, 5, 0, 0)
        g.submit(0x02, 7, prp1=RAM + 8 * P, nlb=8)
        assert g.r.poll() == 1
        assert g.status(3) == (7, 0) and g.r.native_io()[0] == 1   # back in C
    finally:
        g.close()


@pytest.mark.parametrize("datapath", ["python", pytest.param("native", marks=needs_native)])
def test_ranges_at_the_top_of_the_address_space(be, datapath):
    """A region ending exactly at 2^64: a transfer inside it is served, one that would
    run past 2^64 (wrap to 0) is an error and writes nothing (SPDK's target got this wrong)."""
    g = Rig(datapath, be)
    try:
        ok = struct.pack("<QI3xB", TOP + P, P, 0)            # the last page: ends at 2^64
        bad = struct.pack("<QI3xB", (1 << 64) - 512, P, 0)   # would wrap past 2^64
        g.submit(0x02, 1, nlb=8, sgl=ok)
        g.submit(0x02, 2, nlb=8, sgl=bad)
        assert g.r.poll() == 2
        assert g.status(0) == (1, 0)
        assert g.status(1)[1] == Status.DATA_TRANSFER_ERROR & 0x7FF
        assert bytes(g.top[P:]) == bytes(range(256)) * 16
        assert g.top[:P] == bytes(P) and g.ram[16 * P:] == bytes(16 * P)   # nothing else written
    finally:
        g.close()


@needs_native
def test_faulted_queue_runs_on_the_python_path(be):
    g = Rig("native", be)
    try:
        g.r._sqs[1].faulted = True       # what set_memory() does when a ring went away
        g.r.invalidate()
        g.submit(0x02, 1, prp1=RAM + 8 * P, nlb=8)
        assert g.r.poll() == 0 and g.r.python_polls == 1    # skipped, by the Python rules
        g.r._sqs[1].faulted = False
        g.r.invalidate()
        assert g.r.poll() == 1 and g.r.native_io()[0] == 1
    finally:
        g.close()


def test_preflight_chooses_the_data_path(monkeypatch):
    cfg = DaemonConfig()
    monkeypatch.setattr(native, "available", False)
    monkeypatch.setattr(native, "why_not", "not built (no compiler)")
    assert preflight.datapath(cfg) == ("python", "native not built (no compiler)")
    cfg.datapath = Datapath.NATIVE
    with pytest.raises(preflight.StartupError, match="--datapath native: the native data path is not built"):
        preflight.datapath(cfg)
    monkeypatch.setattr(native, "available", True)
    assert preflight.datapath(cfg) == ("native", "asked for")
    cfg.datapath = None
    assert preflight.datapath(cfg)[0] == "native"


@needs_native
def test_c_loop_writes_the_vectors_eventfd_once_per_round(be):
    """With an fd for the CQ's vector the C loop signals it itself (no Python call);
    a vector without an fd is handed to Python's irq callback."""
    import os
    g = Rig("native", be)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        calls: list[int] = []
        g.r = runner("native", executor=g.ex, doorbells=g.db, mem=g.mem, execute=g.execute,
                     irq=calls.append, doorbell_error=lambda i, q: None,
                     irq_fd=lambda v: efd if v == 2 else None)
        g.r.add_cq(CqState(cqid=1, base=RAM + P, size=16, iv=2, ien=True))
        g.r.add_sq(SqState(sqid=1, cqid=1, base=RAM, size=16))
        for cid in (1, 2, 3):
            g.submit(0x02, cid, prp1=RAM + 8 * P, nlb=8)
        assert g.r.poll() == 3
        assert os.eventfd_read(efd) == 1 and calls == []       # one write for the batch
        g.r.invalidate()
        g.r._irq_fd = None                                      # no fd: Python signals
        g.submit(0x02, 4, prp1=RAM + 8 * P, nlb=8)
        assert g.r.poll() == 1 and calls == [2]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        g.close()
        os.close(efd)
