"""Differential test: the native data path against the Python one, command for command.

Two identical worlds (guest RAM with a read-only region, a hole, a region without fd
and a message-write window; ram, null, read-only and 4 KiB-block namespaces; the same
queues) receive the same random SQE streams: mostly the Reads and Writes the C loop
serves, with every kind of data pointer (PRPs with offsets, contiguous and scattered PRP
lists, chained and misaligned lists, SGL data blocks of right and wrong length, SGL
segments) and everything it must hand to Python (other opcodes, fused commands, bad
namespaces, LBA ranges past the end and near 2^64, MDTS, addresses in no region or
in read-only / fd-less / window memory, addresses that wrap).  After every poll both
worlds must hold the same bytes everywhere - CQEs, data in guest memory, namespace
contents - the same queue-table records, interrupts and counters.  The host reaps
lazily and rings in random batches, so full CQs, flow control and wrapping rings
happen too; some seeds use shadow doorbells, dirty-page logging or coalescing.
"""
from __future__ import annotations

import mmap
import random
import struct

import pytest

from backends.null import NullBackend
from backends.ram import RamBackend
from migration.dirty import DirtyLog
from nvme import native
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor
from nvme.memory import FlatMemory
from nvme.msgwindow import MessageWriteWindows
from nvme.namespace import Namespace
from nvme.state import CqState, ShadowDoorbells, SqState
from tests.unit.datapaths import REQUIRED, runner

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not native.available and not REQUIRED,
                                 reason=f"native data path {native.why_not}")]

P = 4096
RAM = 0x40_0000            # 1 MiB of ordinary RAM
NRAM = 256
RO = RAM + NRAM * P        # 16 pages read-only (firmware-like)
HOLE = RO + 16 * P         # 16 pages mapped nowhere
NOFD = HOLE + 16 * P       # 16 pages mapped without fd (message DMA only)
WIN = RAM + 200 * P        # a message-write window inside RAM: 8 pages
SQ_AT, CQ_AT, DBBUF, EVIDX = RAM, RAM + 16 * P, RAM + 32 * P, RAM + 33 * P
DATA0 = 40                 # first RAM page used for data and lists
NS_BYTES = 1 << 20


class World:
    def __init__(self, datapath: str, seed: int, rams: tuple[RamBackend, RamBackend],
                 shadow: bool, dirty: bool, coalesce: bool) -> None:
        rnd = random.Random(seed)
        self.ram = bytearray(rnd.randbytes(NRAM * P))
        self.ram[:DATA0 * P] = bytes(DATA0 * P)      # rings and shadow pages start zeroed
        self.ro = bytearray(rnd.randbytes(16 * P))
        self.mem = FlatMemory()
        self.mem.add(RAM, self.ram)
        self.mem.add(RO, self.ro, writable=False)
        self.mem.add(NOFD, None, size=16 * P)
        self.dbpage = mmap.mmap(-1, P)
        self.db = Doorbells(memoryview(self.dbpage))
        ns = {1: Namespace.for_backend(1, rams[0]),
              2: Namespace.for_backend(2, NullBackend(NS_BYTES)),
              3: Namespace.for_backend(3, rams[1], read_only=True),
              4: Namespace.for_backend(4, rams[0], block_size=4096)}
        self.ex = IoExecutor(ns, MessageWriteWindows(self.mem, [(WIN, WIN + 8 * P)]), 64 * 1024)
        self.log = DirtyLog() if dirty else None
        if self.log is not None:
            self.bm = bytearray(NRAM)
            self.log.add(RAM, NRAM * P, memoryview(self.bm))
            self.ex.dirty = self.log
        self.irqs: list[int] = []
        self.errors: list[tuple[int, int]] = []
        sh = ShadowDoorbells(DBBUF, EVIDX) if shadow else None
        self.runner = runner(datapath, executor=self.ex, doorbells=self.db, mem=self.mem,
                             execute=self.ex.execute, irq=self.irqs.append,
                             doorbell_error=lambda i, q: self.errors.append((i, q)), shadow=sh)
        if coalesce:
            self.runner.set_coalescing(3, 0, set())
        if self.log is not None:
            self.runner.set_dirty(self.log)        # CQEs and EventIdx, as a worker has it

    def io(self) -> list[int]:
        n = getattr(self.runner, "native_io", lambda: [0, 0, 0, 0])()
        return [a + b for a, b in zip(self.ex.io, n)]

    def close(self) -> None:
        del self.runner
        del self.db
        self.dbpage.close()


def sqe(rnd: random.Random) -> bytes:
    """One random SQE (CID filled in by the caller)."""
    r = rnd.random()
    opc = 2 if r < 0.5 else 1 if r < 0.85 else rnd.choice([0, 4, 5, 8, 9, 0x7F, 0x82])
    nsid = rnd.choice([1] * 12 + [2, 2, 3, 4, 4, 0, 9, 0xFFFFFFFF])
    bs = 4096 if nsid == 4 else 512
    blocks = NS_BYTES // bs
    nlb = rnd.choice([1, 1, 2, 8, 8, 8, 16, 24, 64, 128, 130]) if bs == 512 else rnd.choice([1, 2, 3, 16, 17])
    slba = rnd.randrange(blocks)
    if rnd.random() < 0.05:
        slba = rnd.choice([blocks - 1, blocks, (1 << 64) - 1, (1 << 64) - nlb + 1])
    length = nlb * bs
    flags = 0
    if rnd.random() < 0.03:
        flags = rnd.choice([0x01, 0x02, 0xC0])           # fused, reserved PSDT
    prp1, prp2 = dptr(rnd, length)
    if isinstance(prp1, bytes):                          # an SGL descriptor
        flags |= 0x40
        prp1, prp2 = struct.unpack("<QQ", prp1)
    return struct.pack("<BBHIQQQQ6I", opc, flags, 0, nsid, 0, 0, prp1 & (2**64 - 1), prp2 & (2**64 - 1),
                       slba & 0xFFFFFFFF, slba >> 32 & 0xFFFFFFFF, (nlb - 1) & 0xFFFF | rnd.choice([0, 0, 1 << 30]),
                       0, 0, 0)


def page(rnd: random.Random) -> int:
    r = rnd.random()
    if r < 0.9:
        return RAM + rnd.randrange(DATA0, NRAM) * P
    # ... or somewhere unusual; the top page: a range from there wraps past 2^64
    return (rnd.choice([RO, HOLE, NOFD, WIN, (1 << 64) - P, 0]) + rnd.randrange(0, 4) * P) & (2**64 - 1)


def dptr(rnd: random.Random, length: int) -> tuple[int | bytes, int]:
    kind = rnd.random()
    if kind < 0.12:                                      # SGL
        addr = (page(rnd) + rnd.randrange(0, P, 4)) & (2**64 - 1)
        t = rnd.random()
        if t < 0.7:
            return struct.pack("<QI3xB", addr, length if t < 0.6 else length + 512, 0x00), 0
        if t < 0.85:                                     # a segment of two data blocks
            seg = RAM + rnd.randrange(DATA0, NRAM) * P
            return struct.pack("<QI3xB", seg, 32, 0x30), 0
        return struct.pack("<QI3xB", addr, length, rnd.choice([0x10, 0x01, 0x50])), 0
    off = rnd.choice([0, 0, 0, 512, 1024, 4092, rnd.randrange(0, P, 4), 2])
    prp1 = page(rnd) + off
    first = P - (prp1 % P)
    rest = length - first
    if rest <= 0:
        return prp1, rnd.choice([0, page(rnd)])
    if rest <= P:
        return prp1, rnd.choice([prp1 - off + P, page(rnd), page(rnd) + 8])
    n = (rest + P - 1) // P
    lst = RAM + rnd.randrange(DATA0, NRAM) * P + rnd.choice([0, 0, 8, P - 8 * n, P - 16, 4])
    return prp1, lst


def fill_list(w: World, rnd: random.Random, e: bytes) -> None:
    """Write what the SQE's PRP list / SGL segment points at (same bytes in both worlds)."""
    flags, prp1, prp2 = e[1], *struct.unpack_from("<QQ", e, 24)
    if flags & 0xC0 == 0x40 and e[39] == 0x30:           # SGL Last Segment: two data blocks
        seg = prp1
        if RAM <= seg < RAM + NRAM * P - 32:
            a, b = page(rnd), page(rnd)
            body = struct.pack("<QI3xBQI3xB", a, 512, 0, b, 1024, 0)
            w_off = seg - RAM
            for x in w:
                x.ram[w_off:w_off + 32] = body
        return
    if flags & 0xC0 or not RAM <= prp2 < RAM + NRAM * P:
        return
    ents = []
    contiguous = rnd.random() < 0.5
    start = page(rnd)
    for i in range((P - prp2 % P) // 8):
        ents.append(start + i * P if contiguous else page(rnd) + (8 if rnd.random() < 0.02 else 0))
    body = struct.pack(f"<{len(ents)}Q", *(x & (2**64 - 1) for x in ents))
    o = prp2 - RAM
    for x in w:
        x.ram[o:o + len(body)] = body[:len(x.ram) - o]


def check(w: tuple[World, World], step: int) -> None:
    a, b = w
    assert a.ram == b.ram, f"guest memory differs after step {step}"
    assert a.ro == b.ro
    assert a.irqs == b.irqs, f"interrupts differ after step {step}"
    assert a.errors == b.errors
    assert a.runner.errors == b.runner.errors
    assert a.io() == b.io()
    for qid in a.runner.queue_ids()[0]:
        assert a.runner.sq_state(qid) == b.runner.sq_state(qid)
    for qid in a.runner.queue_ids()[1]:
        assert a.runner.cq_state(qid) == b.runner.cq_state(qid)
    if a.log is not None:
        assert a.log.dirty_pages() == b.log.dirty_pages(), f"dirty pages differ after step {step}"


@pytest.mark.parametrize("seed", range(24))
def test_same_answers_same_bytes(seed: int) -> None:
    rnd = random.Random(seed)
    shadow, dirty, coalesce = seed % 4 == 1, seed % 3 == 2, seed % 5 == 3
    backends = []
    for i in range(4):
        be = RamBackend.create(NS_BYTES, name_prefix=f"vnvmed-diff-{seed}-{i}-{id(rnd)}")
        be.direct_memory[:] = random.Random(seed * 7 + i % 2).randbytes(NS_BYTES)
        backends.append(be)
    worlds = (World("python", seed, (backends[0], backends[1]), shadow, dirty, coalesce),
              World("native", seed, (backends[2], backends[3]), shadow, dirty, coalesce))
    try:
        run(rnd, worlds, shadow)
        assert bytes(backends[0].direct_memory) == bytes(backends[2].direct_memory)
        assert bytes(backends[1].direct_memory) == bytes(backends[3].direct_memory)
        assert sum(worlds[1].runner.native_io()[:2]) > 0, "the C loop served nothing"
    finally:
        for x in worlds:
            x.close()
        for be in backends:
            be.destroy()


def run(rnd: random.Random, w: tuple[World, World], shadow: bool) -> None:
    nq = rnd.choice([1, 2, 3])
    shared_cq = nq > 1 and rnd.random() < 0.5
    sizes = {}
    for qid in range(1, nq + 1):
        ssz, csz, ien = rnd.choice([4, 8, 16, 64]), rnd.choice([4, 5, 16, 64]), rnd.random() < 0.8
        sizes[qid] = (ssz, csz)
        for x in w:
            if not shared_cq or qid == 1:
                x.runner.add_cq(CqState(cqid=qid, base=CQ_AT + (qid - 1) * 4 * P, size=csz, iv=qid, ien=ien))
            x.runner.add_sq(SqState(sqid=qid, cqid=1 if shared_cq else qid,
                                    base=SQ_AT + (qid - 1) * 4 * P, size=ssz))
    tails = {q: 0 for q in sizes}
    heads = {q: 0 for q in (1,) if shared_cq} if shared_cq else {q: 0 for q in sizes}
    phases = {q: 1 for q in heads}
    cid = 0
    for step in range(160):
        for qid, (ssz, csz) in sizes.items():
            for _ in range(rnd.randrange(0, 5)):
                if (tails[qid] + 1) % ssz == w[0].runner.sq_state(qid).head:
                    break                                # SQ full
                e = bytearray(sqe(rnd))
                cid = (cid + 1) & 0xFFFF
                e[2:4] = cid.to_bytes(2, "little")
                o = SQ_AT + (qid - 1) * 4 * P - RAM + tails[qid] * 64
                for x in w:
                    x.ram[o:o + 64] = e
                fill_list(w, rnd, bytes(e))
                tails[qid] = (tails[qid] + 1) % ssz
            for x in w:
                if shadow:
                    memoryview(x.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")[2 * qid] = tails[qid]
                else:
                    x.db.set_sq_tail(qid, tails[qid])
        if rnd.random() < 0.03:                         # an invalid doorbell value, fixed later
            bad = rnd.choice(list(sizes))
            for x in w:
                x.db.set_sq_tail(bad, 0xFFFF) if not shadow else \
                    memoryview(x.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I").__setitem__(2 * bad, 0xFFFF)
        for x in w:
            before = len(x.irqs)
            x.runner.poll()
            x.irqs[before:] = sorted(x.irqs[before:])   # one per CQ per poll, in any order
        check(w, step)
        if rnd.random() < 0.7:                          # the host reaps (sometimes it does not)
            for cq in heads:
                csz = sizes[cq][1]
                v = memoryview(w[0].ram).cast("I")
                base = (CQ_AT + (cq - 1) * 4 * P - RAM) // 4
                while (v[base + heads[cq] * 4 + 3] >> 16) & 1 == phases[cq]:
                    heads[cq] += 1
                    if heads[cq] == csz:
                        heads[cq], phases[cq] = 0, phases[cq] ^ 1
                for x in w:
                    if shadow:
                        memoryview(x.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")[2 * cq + 1] = heads[cq]
                    else:
                        x.db.set_cq_head(cq, heads[cq])
        for qid in sizes:                               # repair any invalid tail
            for x in w:
                if shadow:
                    memoryview(x.ram)[DBBUF - RAM:DBBUF - RAM + P].cast("I")[2 * qid] = tails[qid]
                else:
                    x.db.set_sq_tail(qid, tails[qid])
