"""file: namespaces on both data paths: the native loop's own io_uring rings
(nvme/native/uring.c, NativeRing) against the Python path (BackendIo + the Python engine).

Two identical worlds (guest RAM in an mmap, a copy of the same file, the same queues,
dirty logging on or off) get the same random batches: Reads and Writes with every kind
of data pointer (PRP offsets, two pages, PRP lists, SGL data blocks), FUA, Flush,
Compare, Write Zeroes, out-of-range LBAs.  Commands of one batch are in flight together,
so they never overlap in LBAs or guest pages (their order is the kernel's); after every
batch both worlds must hold the same bytes in guest memory and in the file, the same
completions (CID -> status) and error-log entries, the same dirty pages.  Then the
mechanisms around a ring: the crash journal, the depth bound, CID conflicts, Delete I/O
SQ and detach with requests in flight.
"""
from __future__ import annotations

import mmap
import os
import random
import select
import shutil
import tempfile
import time

import pytest

from backends.base import create_backend
from migration.dirty import DirtyLog
from nvme import native
from nvme.crashjournal import journaled
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor, IoOpcode
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from nvme.qtable import QueueTable, table_bytes
from nvme.state import CqState, SqState
from nvme.status import Status
from tests.unit.datapaths import REQUIRED, runner
from workers.aio import BackendIo

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not native.available and not REQUIRED,
                                 reason=f"native data path {native.why_not}")]

P = 4096
RAM = 0x100000
NPAGES = 256
CQ_AT, SQ_AT, LISTS = RAM + P, RAM + 2 * P, RAM + 3 * P     # 8 list pages
DATA0 = 16                                                 # first data page
QSIZE = 64
NS_BYTES = 1 << 20
BLK = 512


def sqe_words(opc, cid, nsid=1, slba=0, nlb=1, prp1=0, prp2=0, cdw12=0, sgl=False, sgl_len=0):
    d = [0] * 16
    d[0] = opc | (cid << 16) | ((1 << 14) if sgl else 0)
    d[1] = nsid
    d[6], d[7] = prp1 & 0xFFFFFFFF, prp1 >> 32
    if sgl:
        d[8], d[9] = sgl_len, 0                  # one Data Block descriptor
    else:
        d[8], d[9] = prp2 & 0xFFFFFFFF, prp2 >> 32
    d[10], d[11] = slba & 0xFFFFFFFF, slba >> 32
    d[12] = ((nlb - 1) & 0xFFFF) | cdw12
    return d


class World:
    """One controller slot's data path over a file namespace, driven like a host."""

    def __init__(self, datapath: str, path: str, dirty: bool, depth: int = 32,
                 direct: bool = False, **rkw) -> None:
        self.ram = mmap.mmap(-1, NPAGES * P)
        self.mem = FlatMemory()
        self.mem.add(RAM, memoryview(self.ram))
        self.dbpage = mmap.mmap(-1, P)
        self.db = Doorbells(memoryview(self.dbpage))
        self.qt_map = mmap.mmap(-1, table_bytes(4))
        self.fb = create_backend("file", path, name_prefix="x", direct=direct)
        self.ex = IoExecutor({1: Namespace.for_backend(1, self.fb)}, self.mem, 64 * 1024)
        self.log = DirtyLog() if dirty else None
        if self.log is not None:
            self.bm = bytearray(NPAGES)
            self.log.add(RAM, NPAGES * P, memoryview(self.bm))
            self.ex.dirty = self.log
        self.irqs: list[int] = []
        self.r = runner(datapath, executor=self.ex, doorbells=self.db, mem=self.mem,
                        execute=self.ex.execute, irq=self.irqs.append,
                        doorbell_error=lambda i, q: None, table=QueueTable(self.qt_map, 4, init=True),
                        **rkw)
        if self.log is not None:
            self.r.set_dirty(self.log)
        self.bio = BackendIo(lambda *a: self.r.complete(*a, signal=False), signal=self.r.signal_pending)
        self.bio.bind(self.ex)
        assert self.bio.attach(1, self.fb, depth=depth)
        if datapath == "native":
            self.bio.serve_native(self.r)
            assert 1 in self.bio.native, "no native ring for the file namespace"
        self.r.add_cq(CqState(cqid=1, base=CQ_AT, size=QSIZE, iv=1, ien=True))
        self.r.add_sq(SqState(sqid=1, cqid=1, base=SQ_AT, size=QSIZE))
        self.tail = 0
        self.chead = 0
        self.phase = 1

    def w32(self, addr: int, words: list[int]) -> None:
        off = addr - RAM
        self.ram[off:off + 4 * len(words)] = b"".join(w.to_bytes(4, "little") for w in words)

    def submit(self, cmds: list[list[int]]) -> None:
        for d in cmds:
            self.w32(SQ_AT + 64 * self.tail, d)
            self.tail = (self.tail + 1) % QSIZE
        self.db.set_sq_tail(1, self.tail)

    def reap_host(self) -> list[tuple[int, int]]:
        out = []
        while True:
            off = CQ_AT - RAM + 16 * self.chead
            dw3 = int.from_bytes(self.ram[off + 12:off + 16], "little")
            if (dw3 >> 16) & 1 != self.phase:
                break
            out.append((dw3 & 0xFFFF, (dw3 >> 17) & 0x7FFF))
            self.chead += 1
            if self.chead == QSIZE:
                self.chead, self.phase = 0, self.phase ^ 1
        if out:
            self.db.set_cq_head(1, self.chead)
        return out

    def run(self, cmds: list[list[int]], timeout: float = 10.0) -> dict[int, int]:
        self.submit(cmds)
        got: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(cmds):
            assert time.monotonic() < deadline, f"{len(got)}/{len(cmds)} completions"
            self.r.poll()
            self.bio.push()
            if not self.bio.service() and self.bio.outstanding:
                select.select([self.bio.fileno()], [], [], 0.01)
                self.bio.service(woke=True)
            for cid, st in self.reap_host():
                assert cid not in got, f"CID {cid} completed twice"
                got[cid] = st
        return got

    def close(self) -> None:
        self.bio.close()
        inv = getattr(self.r, "invalidate", None)
        if inv is not None:
            inv()
        self.r.release_views()
        self.fb.destroy()


def random_batch(rnd: random.Random, base_cid: int, w: World) -> list[list[int]]:
    """Commands with disjoint LBA ranges and guest pages (they run concurrently)."""
    n = rnd.randint(1, 24)
    lbas = rnd.sample(range(NS_BYTES // (16 * BLK)), n)        # 8 KiB LBA slots
    pages = rnd.sample(range(DATA0, NPAGES - 4, 4), n)          # 4-page guest slots
    cmds = []
    for i in range(n):
        cid = (base_cid + i) & 0xFFFF
        slba = lbas[i] * 16
        page = RAM + pages[i] * P
        k = rnd.random()
        nlb = rnd.randint(1, 16)
        length = nlb * BLK
        opc = IoOpcode.READ if k < 0.55 else IoOpcode.WRITE if k < 0.85 else None
        if opc is None:
            j = rnd.random()
            if j < 0.3:
                cmds.append(sqe_words(IoOpcode.FLUSH, cid))
            elif j < 0.5:
                cmds.append(sqe_words(IoOpcode.COMPARE, cid, slba=slba, nlb=nlb, prp1=page))
            elif j < 0.7:
                cmds.append(sqe_words(IoOpcode.WRITE_ZEROES, cid, slba=slba, nlb=nlb))
            elif j < 0.85:
                cmds.append(sqe_words(IoOpcode.READ, cid, slba=NS_BYTES // BLK - 1, nlb=2, prp1=page))
            else:
                cmds.append(sqe_words(IoOpcode.READ, cid, nsid=9, prp1=page))
            continue
        shape = rnd.random()
        cdw12 = (1 << 30) if opc == IoOpcode.WRITE and rnd.random() < 0.2 else 0
        if shape < 0.25:                                         # SGL data block
            prp1 = page + 4 * rnd.randint(0, 64)
            cmds.append(sqe_words(opc, cid, slba=slba, nlb=nlb, prp1=prp1, sgl=True, sgl_len=length,
                                  cdw12=cdw12))
            continue
        off = rnd.choice([0, 0, 512, 4 * rnd.randint(1, 1000)])
        prp1 = page + off
        first = P - off
        prp2 = 0
        if length > first:
            rest = length - first
            if rest <= P:
                prp2 = page + P
            else:                                                # a PRP list in a list page
                lst = LISTS + (i % 8) * P
                ents = [page + P * (1 + e) for e in range((rest + P - 1) // P)]
                words = []
                for e in ents:
                    words += [e & 0xFFFFFFFF, e >> 32]
                w.w32(lst, words)
                prp2 = lst
        cmds.append(sqe_words(opc, cid, slba=slba, nlb=nlb, prp1=prp1, prp2=prp2, cdw12=cdw12))
    return cmds


def _file(tmp_path, name: str, seed: int) -> str:
    p = tmp_path / name
    p.write_bytes(random.Random(seed).randbytes(NS_BYTES))
    return str(p)


@pytest.mark.parametrize("seed", range(6))
def test_same_answers_same_bytes(tmp_path, seed):
    src = _file(tmp_path, "src", seed)
    paths = {dp: str(tmp_path / dp) for dp in ("python", "native")}
    for p in paths.values():
        shutil.copy(src, p)
    rnd = random.Random(seed)
    dirty = seed % 2 == 1
    worlds = {dp: World(dp, paths[dp], dirty) for dp in paths}
    try:
        fill = rnd.randbytes(NPAGES * P)
        for w in worlds.values():
            w.ram[DATA0 * P:] = fill[DATA0 * P:]
        cid = 0
        for batch in range(12):
            # the same stream for both worlds (list pages are written while generating)
            state = rnd.getstate()
            got = {}
            for dp, w in worlds.items():
                rnd.setstate(state)
                cmds = random_batch(rnd, cid, w)
                got[dp] = w.run(cmds)
            cid += len(cmds)
            assert got["python"] == got["native"], f"batch {batch}"
            a, b = worlds["python"], worlds["native"]
            assert a.ram[DATA0 * P:] == b.ram[DATA0 * P:], f"guest memory differs after batch {batch}"
            if dirty:
                assert a.bm == b.bm, f"dirty pages differ after batch {batch}"
            assert sorted(a.r.take_failures()) == sorted(b.r.take_failures())
        for p in paths.values():
            os.sync()
        with open(paths["python"], "rb") as f1, open(paths["native"], "rb") as f2:
            assert f1.read() == f2.read(), "file contents differ"
        nat = worlds["native"].r
        assert nat.native_io()[0] + nat.native_io()[1] > 0, "the rings served nothing"
        assert worlds["native"].r.inflight() == 0 and worlds["python"].r.inflight() == 0
    finally:
        for w in worlds.values():
            w.close()


@pytest.fixture
def nworld(tmp_path):
    w = World("native", _file(tmp_path, "disk", 1), dirty=False, depth=4)
    yield w
    w.close()


def test_depth_bound_journal_and_quiesce_count(nworld):
    """16 reads on a depth-4 ring: never more than 4 in the kernel, each journaled while
    in flight (recovery finds them) and cleared when its CQE is posted."""
    w = nworld
    ring = w.bio.native[1]
    j = w.r.table.journal(1)
    w.submit([sqe_words(IoOpcode.READ, c, slba=16 * c, nlb=8, prp1=RAM + (DATA0 + c) * P) for c in range(16)])
    w.r.poll()
    assert ring.busy() == 4 and w.r.inflight() == 4 and w.r.inflight(1) == 4
    cids, overflow = journaled(j)
    assert sorted(cids) == [0, 1, 2, 3] and not overflow
    assert w.bio.outstanding == 4
    # The 12 SQEs left wait for ring room, and a completion's eventfd wakes the worker:
    # no reason to keep polling (a polling worker is a CPU hog on a shared core).
    assert not w.r.has_work() and w.r.prepare_sleep()
    deadline = time.monotonic() + 10
    while ring.busy() == 4:                 # one finishes: now there is work again
        assert time.monotonic() < deadline
        select.select([w.bio.fileno()], [], [], 0.01)
        w.r.reap_native()
    assert not w.r.prepare_sleep()
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while len(seen) < 16:
        assert time.monotonic() < deadline
        assert ring.busy() <= 4
        w.bio.service(woke=True)
        w.r.poll()
        for cid, st in w.reap_host():
            seen[cid] = st
            assert cid not in journaled(j)[0]
    assert seen == {c: 0 for c in range(16)}
    assert journaled(j) == ([], False) and w.r.inflight() == 0
    with open(w.fb.path, "rb") as f:
        want = f.read(16 * 16 * BLK)
    for c in range(16):
        assert w.ram[(DATA0 + c) * P:(DATA0 + c) * P + 8 * BLK] == want[c * 16 * BLK:c * 16 * BLK + 8 * BLK]


def test_cid_conflict_answered_like_python(nworld):
    w = nworld
    w.submit([sqe_words(IoOpcode.READ, 5, slba=0, nlb=8, prp1=RAM + DATA0 * P),
              sqe_words(IoOpcode.READ, 5, slba=8, nlb=8, prp1=RAM + (DATA0 + 1) * P)])
    w.r.poll()                # the first goes to the ring, the second is answered at once
    deadline = time.monotonic() + 10
    got = w.reap_host()
    while len(got) < 2:
        assert time.monotonic() < deadline
        w.bio.service(woke=True)
        got += w.reap_host()
    assert [(c, st & 0x7FF) for c, st in got] == [(5, Status.CID_CONFLICT), (5, 0)]
    assert w.r.take_failures()[0][:3] == (1, 5, Status.CID_CONFLICT)


def test_delete_sq_and_detach_answer_what_is_in_flight(nworld, tmp_path):
    """Requests the kernel still holds when their SQ goes away complete as ABORTED_SQ_DELETION
    (Python's rule); detaching the namespace answers the rest with a retryable status."""
    w = nworld
    w.submit([sqe_words(IoOpcode.READ, c, slba=16 * c, nlb=8, prp1=RAM + (DATA0 + c) * P) for c in range(3)])
    w.r.poll()
    assert w.r.inflight(1) == 3
    w.r.remove_sq(1)          # without draining first: the worker's del_sq drains, bounded
    got = w.reap_host()
    assert sorted((c, st & 0x7FF) for c, st in got) == [(c, Status.ABORTED_SQ_DELETION) for c in range(3)]
    assert w.r.inflight(1) == 0
    deadline = time.monotonic() + 5
    while w.r.inflight() or w.bio.outstanding:   # the kernel's late completions only free slots
        assert time.monotonic() < deadline
        w.bio.service(woke=True)
        time.sleep(0.001)
    assert w.reap_host() == []
    # A new SQ; then the namespace goes away (timeout 0: no drain) with reads in flight.
    w.r.add_sq(SqState(sqid=2, cqid=1, base=SQ_AT, size=QSIZE))
    for c in range(3):
        w.w32(SQ_AT + 64 * c, sqe_words(IoOpcode.READ, 10 + c, slba=16 * c, nlb=8, prp1=RAM + (DATA0 + c) * P))
    w.db.set_sq_tail(2, 3)
    w.r.poll()
    assert w.r.inflight(2) == 3
    w.bio.detach(1, timeout=0)
    assert 1 not in w.bio.native and not w.ex.native_rings
    got = w.reap_host()
    assert sorted(c for c, _ in got) == [10, 11, 12]
    assert {st for _, st in got} == {int(Status.NAMESPACE_NOT_READY)}    # DNR clear: retried
    assert w.r.inflight() == 0



def test_a_completion_wakes_a_sleeping_worker():
    """A worker with reads in the kernel sleeps on the ring's eventfd (a backend that
    stopped completing, or no ring spin).  The ring defers the completions' task work
    until the worker enters it (uring.c), so the kernel's eventfd signal when it queues
    that work is all that wakes the worker: an O_DIRECT read on a real disk (never
    complete at submission) must make the eventfd readable with nobody polling."""
    d = tempfile.mkdtemp(prefix="vnvmed-wake-", dir="/var/tmp")   # a disk, not tmpfs
    try:
        path = os.path.join(d, "disk")
        data = random.Random(7).randbytes(NS_BYTES)
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError as e:
            pytest.skip(f"/var/tmp takes no O_DIRECT here ({e.strerror}): nothing would be deferred")
        w = World("native", path, dirty=False, direct=True, ring_spin_us=0)
        try:
            ring = w.bio.native[1]
            for i in range(16):
                ring.drain()                       # no count left from the last completion
                slba = (i * 37 % (NS_BYTES // P)) * (P // BLK)
                w.submit([sqe_words(IoOpcode.READ, i, slba=slba, nlb=P // BLK, prp1=RAM + DATA0 * P)])
                w.r.poll()                          # takes the SQE, enters the ring, returns
                assert ring.busy() == 1 or w.reap_host() == [(i, 0)]
                if ring.busy():
                    ready, _, _ = select.select([ring.fileno()], [], [], 5.0)
                    assert ready, f"read {i}: its completion never signalled the ring's eventfd"
                    got = []
                    deadline = time.monotonic() + 5
                    while not got and time.monotonic() < deadline:
                        w.r.poll()
                        got = w.reap_host()
                    assert got == [(i, 0)]
                off = slba * BLK
                assert w.ram[DATA0 * P:DATA0 * P + P] == data[off:off + P], f"read {i}: wrong bytes"
        finally:
            w.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
