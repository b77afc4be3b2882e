"""A host-driver simulation for the controller model, and its basic tests.

Guest memory is a FlatMemory over a bytearray, the doorbell page a bytearray; the
hooks record what the controller asked of the front-end.  Other test_controller_*
files import `Host` from here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from nvme.config import ControllerConfig
from nvme.controller import Controller
from nvme.memory import FlatMemory
from nvme.regs import Reg
from nvme.status import Status

MEM_BASE = 0x100000
MEM_SIZE = 0x100000
ASQ, ACQ = MEM_BASE, MEM_BASE + 0x1000
DATA = MEM_BASE + 0x10000      # 4 KiB data buffers from here
QMEM = MEM_BASE + 0x80000      # I/O queue memory from here
CC_IO = (6 << 16) | (4 << 20)  # IOSQES=64 B, IOCQES=16 B


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Ns:
    nsid: int
    blocks: int = 2048
    block_size: int = 512
    read_only: bool = False
    flushes: int = 0

    def flush(self) -> None:
        self.flushes += 1


@dataclass
class Hooks:
    calls: list = field(default_factory=list)
    irqs: list = field(default_factory=list)
    busy_sqs: set = field(default_factory=set)

    def irq(self, vector): self.irqs.append(vector)
    def io_cq_created(self, cq): self.calls.append(("cq+", cq.cqid))
    def io_sq_created(self, sq): self.calls.append(("sq+", sq.sqid))
    def io_sq_deleted(self, sqid): self.calls.append(("sq-", sqid))
    def sq_busy(self, sqid): return sqid in self.busy_sqs
    def io_cq_deleted(self, cqid): self.calls.append(("cq-", cqid))
    def shadow_doorbells_changed(self, shadow): self.calls.append(("shadow", shadow.dbbuf, shadow.eventidx))
    def coalescing_changed(self, thr, time_100us, exempt): self.calls.append(("coal", thr, time_100us, exempt))
    def fatal(self, reason): self.calls.append(("fatal", reason))


@dataclass
class Cqe:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int   # (SCT << 8) | SC
    dnr: bool


class Host:
    def __init__(self, cfg: ControllerConfig | None = None, namespaces=None) -> None:
        self.cfg = cfg or ControllerConfig()
        self.buf = bytearray(MEM_SIZE)
        self.mem = FlatMemory()
        self.mem.add(MEM_BASE, self.buf)
        self.dbpage = bytearray(4096)
        self.db = memoryview(self.dbpage).cast("I")
        self.hooks = Hooks()
        self.clock = Clock()
        self.ns = namespaces if namespaces is not None else {1: Ns(1), 2: Ns(2, blocks=100, block_size=4096)}
        self.ctrl = Controller(self.cfg, self.ns, memoryview(self.dbpage), self.mem, self.hooks,
                               clock=self.clock)
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self.asqs = self.acqs = 0
        self.next_cid = 1
        self.cqes: list[Cqe] = []

    # memory helpers
    def write(self, addr: int, data: bytes) -> None:
        self.buf[addr - MEM_BASE:addr - MEM_BASE + len(data)] = data

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.buf[addr - MEM_BASE:addr - MEM_BASE + n])

    def reg(self, off: int, size: int = 4) -> int:
        return self.ctrl.read_register(off, size)

    def enable(self, asqs: int = 16, acqs: int = 16, cc: int = CC_IO | 1) -> None:
        self.asqs, self.acqs = asqs, acqs
        self.sq_tail = self.cq_head = 0
        self.phase = 1
        self.buf[ACQ - MEM_BASE:ACQ - MEM_BASE + 16 * acqs] = bytes(16 * acqs)
        c = self.ctrl
        c.write_register(Reg.AQA, 4, (asqs - 1) | ((acqs - 1) << 16))
        c.write_register(Reg.ASQ, 8, ASQ)
        c.write_register(Reg.ACQ, 8, ACQ)
        c.write_register(Reg.CC, 4, cc)

    def disable(self) -> None:
        self.ctrl.write_register(Reg.CC, 4, CC_IO)

    def submit(self, opcode: int, *, cid: int | None = None, nsid: int = 0, prp1: int = 0,
               prp2: int = 0, cdw: tuple = (), fuse: int = 0, psdt: int = 0) -> int:
        if cid is None:
            cid, self.next_cid = self.next_cid, (self.next_cid + 1) & 0xFFFF
        dws = list(cdw) + [0] * (6 - len(cdw))
        sqe = struct.pack("<IIQQQQ6I", opcode | (fuse << 8) | (psdt << 14) | (cid << 16), nsid,
                          0, 0, prp1, prp2, *dws)
        self.write(ASQ + 64 * self.sq_tail, sqe)
        self.sq_tail = (self.sq_tail + 1) % self.asqs
        self.db[0] = self.sq_tail
        return cid

    def reap(self) -> list[Cqe]:
        out = []
        while True:
            dw0, _, dw2, dw3 = struct.unpack_from("<IIII", self.buf, ACQ - MEM_BASE + 16 * self.cq_head)
            if (dw3 >> 16) & 1 != self.phase:
                break
            sf = dw3 >> 17
            out.append(Cqe(dw0, dw2 & 0xFFFF, dw2 >> 16, dw3 & 0xFFFF, sf & 0x7FF, bool(sf >> 14)))
            self.cq_head += 1
            if self.cq_head == self.acqs:
                self.cq_head, self.phase = 0, self.phase ^ 1
        if out:
            self.db[1] = self.cq_head
        self.cqes.extend(out)
        return out

    def cmd(self, opcode: int, **kw) -> Cqe:
        cid = self.submit(opcode, **kw)
        self.ctrl.poll_admin()
        got = [c for c in self.reap() if c.cid == cid]
        assert len(got) == 1, f"no completion for cid {cid}"
        return got[0]

    def ok(self, opcode: int, **kw) -> Cqe:
        c = self.cmd(opcode, **kw)
        assert c.status == Status.SUCCESS, f"status {c.status:#x}"
        return c

    # common commands
    def identify(self, cns: int, nsid: int = 0) -> tuple[Cqe, bytes]:
        c = self.cmd(0x06, nsid=nsid, prp1=DATA, cdw=(cns,))
        return c, self.read(DATA, 4096)

    def get_log(self, lid: int, length: int, offset: int = 0, rae: bool = False, nsid: int = 0xFFFFFFFF) -> tuple[Cqe, bytes]:
        numd = length // 4 - 1
        self.write(DATA, bytes(8192))
        c = self.cmd(0x02, nsid=nsid, prp1=DATA, prp2=DATA + 4096,
                     cdw=(lid | (rae << 15) | ((numd & 0xFFFF) << 16), numd >> 16,
                          offset & 0xFFFFFFFF, offset >> 32))
        return c, self.read(DATA, length)

    def create_cq(self, qid: int, entries: int = 64, iv: int = 1, pc: int = 1, ien: int = 1,
                  base: int | None = None) -> Cqe:
        base = QMEM + qid * 0x1000 if base is None else base
        return self.cmd(0x05, prp1=base, cdw=(qid | ((entries - 1) << 16), pc | (ien << 1) | (iv << 16)))

    def create_sq(self, qid: int, cqid: int, entries: int = 64, pc: int = 1,
                  base: int | None = None) -> Cqe:
        base = QMEM + 0x40000 + qid * 0x1000 if base is None else base
        return self.cmd(0x01, prp1=base, cdw=(qid | ((entries - 1) << 16), pc | (cqid << 16)))

    def set_feature(self, fid: int, value: int, save: bool = False, nsid: int = 0, prp1: int = 0) -> Cqe:
        return self.cmd(0x09, nsid=nsid, prp1=prp1, cdw=(fid | (save << 31), value))

    def get_feature(self, fid: int, sel: int = 0, cdw11: int = 0, prp1: int = 0) -> Cqe:
        return self.cmd(0x0A, prp1=prp1, cdw=(fid | (sel << 8), cdw11))


def ready_host(**kw) -> Host:
    h = Host(**kw)
    h.enable()
    assert h.ctrl.ready
    return h


# ---------------------------------------------------------------------------
def test_enable_then_keep_alive_completes_with_sqid_sqhd_and_irq():
    h = ready_host()
    assert h.reg(Reg.CSTS) & 1 == 1
    c = h.ok(0x18)
    assert c.sqid == 0 and c.sqhd == 1 and c.dw0 == 0
    assert h.hooks.irqs == [0]


def test_unknown_admin_opcode_is_invalid_opcode_and_logged():
    h = ready_host()
    c = h.cmd(0x80)  # Format NVM: not supported
    assert c.status == Status.INVALID_OPCODE and c.dnr
    _, page = h.get_log(0x01, 64)
    count, sqid, cid, sf = struct.unpack_from("<QHHH", page)
    assert count == 1 and sqid == 0 and cid == c.cid and (sf >> 1) & 0x7FF == Status.INVALID_OPCODE


def test_fused_and_sgl_admin_commands_refused():
    h = ready_host()
    assert h.cmd(0x18, fuse=1).status == Status.INVALID_FIELD
    assert h.cmd(0x06, psdt=1, prp1=DATA, cdw=(1,)).status == Status.INVALID_FIELD


def test_admin_queue_wraps_and_phase_flips():
    h = Host()
    h.enable(asqs=4, acqs=4)
    for _ in range(10):
        h.ok(0x18)
    assert h.phase == 0 or h.cq_head != 0
    assert len(h.cqes) == 10


def test_no_admin_processing_while_disabled():
    h = Host()
    h.asqs = 16
    h.submit(0x18)
    assert h.ctrl.poll_admin() == 0
    assert h.reap() == []
