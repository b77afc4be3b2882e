"""Asynchronous backends: the file engines on a real file, the depth bound, and the
executor parking commands that workers/aio.BackendIo completes (nvme.io.aio)."""
from __future__ import annotations

import errno
import mmap
import os
import select
import sys
import time

import pytest

from backends.aio import GIL_SWITCH_S, AioQueue, Op, Req
from backends.base import create_backend
from backends.file import FileBackend
from backends.uring import ThreadPoolEngine, UringEngine, uring_unavailable
from nvme.doorbell import Doorbells
from nvme.io import IoExecutor, IoOpcode
from nvme.io.aio import AioCommand, status_for
from nvme.memory import FlatMemory
from nvme.namespace import Namespace
from nvme.state import CqState, SqState
from nvme.status import DNR, RETRY, Status, status_field
from tests.unit.datapaths import PARAMS, runner
from workers.aio import BackendIo

pytestmark = pytest.mark.timeout(30)
P = 4096
RAM = 0x100000


def engines(b: FileBackend) -> list:
    out = [ThreadPoolEngine(b, threads=2)]
    if uring_unavailable() is None:
        out.append(UringEngine(b._fd, b._dfd))
    return out


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    b = FileBackend(str(p), direct=True)
    yield b
    b.close()


def run(q: AioQueue, reqs: list[Req], timeout: float = 5.0) -> list[Req]:
    ep = select.epoll()
    ep.register(q.engine.fileno(), select.EPOLLIN)
    for r in reqs:
        q.submit(r)
    got: list[Req] = []
    deadline = time.monotonic() + timeout
    while len(got) < len(reqs) and time.monotonic() < deadline:
        ready = bool(ep.poll(0.05))          # the completion fd wakes a sleeper
        q.reap(ready, got)
    ep.close()
    assert len(got) == len(reqs)
    return got


def test_io_uring_binding_present_or_reason():
    why = uring_unavailable()
    assert why is None or "liburing" in why or "disabled" in why


def test_file_engines_move_data_and_zero(disk):
    for eng in engines(disk):
        q = AioQueue(eng, depth=4)
        mm = mmap.mmap(-1, 64 * P)
        mv = memoryview(mm)
        mv[:2 * P] = b"A" * P + b"B" * P
        got = run(q, [Req(Op.WRITE, 0, 2 * P, [mv[:P].toreadonly(), mv[P:2 * P]]),
                      Req(Op.WRITE, 2 * P, P, [mv[:P]], fua=True)]
                  + [Req(Op.WRITE, k * P, P, [mv[P:2 * P]]) for k in range(3, 12)])
        assert [r.err for r in got] == [0] * 11
        # a buffer that is not sector aligned: O_DIRECT says EINVAL, the engine retries buffered
        odd = mv[10 * P + 100:10 * P + 100 + 2 * P]
        got = run(q, [Req(Op.READ, 0, 3 * P, [mv[16 * P:19 * P]]), Req(Op.READ, P, 2 * P, [odd])])
        assert [r.err for r in got] == [0, 0]
        assert bytes(mv[16 * P:19 * P]) == b"A" * P + b"B" * P + b"A" * P
        assert bytes(odd) == b"B" * P + b"A" * P
        got = run(q, [Req(Op.FLUSH, 0, 0), Req(Op.WRITE_ZEROES, 0, P), Req(Op.DISCARD, P, P)])
        assert [r.err for r in got] == [0, 0, 0]
        got = run(q, [Req(Op.READ, 0, 2 * P, [mv[:2 * P]])])
        assert bytes(mv[:2 * P]) == bytes(2 * P)
        eng.close()


def test_engines_let_go_of_guest_memory(disk):
    """Issue 12: once a request is reaped the engine holds nothing of its buffers, so a
    guest mapping whose views are gone can be unmapped (liburing's Iovec leaked a buffer
    export per view: the mmap of a dropped slot could never be closed, and every I/O
    left its view behind).  io_uring is checked with the engine still open; the pool
    after close() (a pool thread lets go of a request just after handing it back)."""
    for eng in engines(disk):
        q = AioQueue(eng, depth=4)
        mm = mmap.mmap(-1, 16 * P)
        mv = memoryview(mm)
        views = [mv[k * P:(k + 1) * P] for k in range(8)]
        odd = mv[8 * P + 100:8 * P + 100 + P]           # O_DIRECT EINVAL -> buffered retry
        refs = [sys.getrefcount(v) for v in views]
        got = run(q, [Req(Op.WRITE, k * P, P, [views[k]]) for k in range(4)]
                  + [Req(Op.READ, 0, 2 * P, [views[4], views[5]]),
                     Req(Op.READ, 0, P, [odd]), Req(Op.WRITE_ZEROES, 0, P)])
        assert [r.err for r in got] == [0] * 7
        del got
        if isinstance(eng, ThreadPoolEngine):
            eng.close()
        assert [sys.getrefcount(v) for v in views] == refs
        for v in views + [odd, mv]:
            v.release()                  # BufferError while anything still exports it
        mm.close()
        if not isinstance(eng, ThreadPoolEngine):
            eng.close()


def test_depth_bound_and_fifo(disk):
    for eng in engines(disk):
        q = AioQueue(eng, depth=3)
        buf = bytearray(P * 16)
        reqs = [Req(Op.READ, k * P, P, [memoryview(buf)[k * P:(k + 1) * P]]) for k in range(16)]
        for r in reqs:
            q.submit(r)
            assert eng.busy() <= 3
        assert q.outstanding() == 16 and len(q.wait) == 13
        got: list[Req] = []
        while len(got) < 16:
            q.reap(True, got)
            assert eng.busy() <= 3
        assert q.outstanding() == 0
        eng.close()


def test_thread_pool_grows_to_the_depth_bound(disk):
    """One blocking call per thread is one request at the device: the pool must be able to
    have as many threads as the namespace lets requests out (a fixed 4 capped QD32 at 4),
    and a shallow stream must not start more than it uses."""
    disk.write_from(0, [memoryview(bytes(range(256)) * (16 * P // 256))])
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    for n, bound, want in ((2, 8, 2), (16, 8, 8), (40, 32, 32)):
        eng = ThreadPoolEngine(disk, threads=bound)
        # its threads get the GIL from a polling caller within 0.1 ms, not 5 ms
        assert sys.getswitchinterval() <= GIL_SWITCH_S
        q = AioQueue(eng, depth=bound)
        buf = bytearray(P * n)
        got = run(q, [Req(Op.READ, (k % 16) * P, P, [memoryview(buf)[k * P:(k + 1) * P]]) for k in range(n)])
        assert [r.err for r in got] == [0] * n
        assert len(eng._threads) == want
        assert bytes(buf[:P]) == bytes(range(256)) * (P // 256)
        eng.close()
        assert not any(t.is_alive() for t in eng._threads)
    sys.setswitchinterval(old)


def test_settle_clears_counts_of_polled_completions(disk):
    """A worker that reaped by polling must not wake at once from its next sleep (the
    eventfd still counts those completions), and must not sleep on one it has not taken."""
    for eng in engines(disk):
        ep = select.epoll()
        ep.register(eng.fileno(), select.EPOLLIN)
        buf = bytearray(P)
        eng.submit(Req(Op.READ, 0, P, [memoryview(buf)]))
        fs = getattr(eng, "flush_submit", None)
        if fs is not None:
            fs()
        deadline = time.monotonic() + 5
        while not eng.settle():                  # finished, not taken: "do not sleep"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        got: list[Req] = []
        while not got:                           # taken by polling, as a busy worker does
            eng.reap(False, got)
        assert ep.poll(0)                        # ... so its count is still on the fd
        assert eng.settle() is False             # drained, nothing waiting
        assert ep.poll(0) == []                  # the next sleep is a real one
        ep.close()
        eng.close()


def test_read_past_end_is_an_error_not_garbage(disk, tmp_path):
    for eng in engines(disk):
        q = AioQueue(eng)
        buf = bytearray(P)
        got = run(q, [Req(Op.READ, (1 << 20), P, [memoryview(buf)])])
        assert got[0].err == errno.EIO
        eng.close()


def test_status_mapping_and_retry_flag():
    assert status_for(IoOpcode.READ, 0) == 0
    st = status_for(IoOpcode.READ, errno.ENOTCONN)
    assert st & 0x7FF == Status.NAMESPACE_NOT_READY and st & RETRY
    assert not status_field(st) & DNR                      # retryable: DNR clear
    assert status_field(Status.WRITE_FAULT) & DNR
    assert status_for(IoOpcode.READ, errno.EIO) == Status.UNRECOVERED_READ_ERROR
    assert status_for(IoOpcode.WRITE, errno.EIO) == Status.WRITE_FAULT
    assert status_for(IoOpcode.WRITE, errno.ENOSPC) == Status.CAPACITY_EXCEEDED
    c = AioCommand(1, 7, IoOpcode.WRITE)
    c.pending = 2
    assert not c.part_done(errno.EIO) and c.part_done(0) and c.finish() == Status.WRITE_FAULT


def sqe(opc, nsid=1, slba=0, nlb=1, prp1=RAM, prp2=0, cdw10=None, cdw11=None, cdw12=None, cid=7):
    d = memoryview(bytearray(64)).cast("I")
    d[0] = opc | (cid << 16)
    d[1] = nsid
    d[6], d[7] = prp1 & 0xFFFFFFFF, prp1 >> 32
    d[8], d[9] = prp2 & 0xFFFFFFFF, prp2 >> 32
    d[10] = (slba & 0xFFFFFFFF) if cdw10 is None else cdw10
    d[11] = (slba >> 32) if cdw11 is None else cdw11
    d[12] = ((nlb - 1) & 0xFFFF) if cdw12 is None else cdw12
    return d


@pytest.fixture
def aio_env(tmp_path):
    p = tmp_path / "disk"
    p.write_bytes(os.urandom(1 << 20))
    fb = create_backend("file", str(p), name_prefix="x")
    rb = create_backend("null", "1M", name_prefix="x")
    mem = FlatMemory()
    ram = bytearray(64 * P)
    mem.add(RAM, ram)
    ex = IoExecutor({1: Namespace.for_backend(1, fb), 2: Namespace.for_backend(2, rb)}, mem, 32 * P)
    done: dict[tuple[int, int], int] = {}
    bio = BackendIo(lambda sqid, cid, st, dw0: done.__setitem__((sqid, cid), st))
    bio.bind(ex)
    assert bio.attach(1, fb, depth=4) and not bio.attach(2, rb)   # null stays synchronous

    def wait(key: tuple[int, int]) -> int:
        deadline = time.monotonic() + 5
        while key not in done:
            assert time.monotonic() < deadline, f"{key} never completed"
            if not bio.service():
                select.select([bio.fileno()], [], [], 0.05)
                bio.service(woke=True)
        return done.pop(key)

    yield ex, ram, bio, wait, p
    bio.close()
    fb.destroy()


def test_executor_parks_and_completes(aio_env):
    ex, ram, bio, wait, path = aio_env
    ram[0:2 * P] = os.urandom(2 * P)
    data = bytes(ram[0:2 * P])
    assert ex.execute(sqe(IoOpcode.WRITE, slba=8, nlb=16, prp2=RAM + P, cid=1), 3) is None
    assert bio.outstanding == 1
    assert wait((3, 1)) == 0
    assert ex.execute(sqe(IoOpcode.READ, slba=8, nlb=16, prp1=RAM + 8 * P, prp2=RAM + 9 * P, cid=2), 3) is None
    assert wait((3, 2)) == 0
    assert bytes(ram[8 * P:10 * P]) == data
    assert ex.io[:2] == [1, 1]
    with open(path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(2 * P) == data
    # Compare: same data succeeds, different data fails
    assert ex.execute(sqe(IoOpcode.COMPARE, slba=8, nlb=16, prp2=RAM + P, cid=3), 3) is None
    assert wait((3, 3)) == 0
    ram[0] ^= 0xFF
    assert ex.execute(sqe(IoOpcode.COMPARE, slba=8, nlb=16, prp2=RAM + P, cid=4), 3) is None
    assert wait((3, 4)) == Status.COMPARE_FAILURE
    # Synchronous namespace next to it: completes inline
    assert ex.execute(sqe(IoOpcode.READ, nsid=2, cid=5), 3) == (0, 0)
    # Validation still happens before parking
    assert ex.execute(sqe(IoOpcode.READ, slba=1 << 20, cid=6), 3) == (Status.LBA_OUT_OF_RANGE, 0)


def test_executor_zeroes_deallocate_and_broadcast_flush(aio_env):
    ex, ram, bio, wait, path = aio_env
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, slba=0, nlb=8, cid=1), 1) is None
    assert wait((1, 1)) == 0
    # DSM deallocate of two ranges: one command, two backend requests
    rng = memoryview(ram).cast("I")
    rng[0:8] = memoryview(bytes(32)).cast("I")
    rng[1], rng[2] = 8, 100          # NLB 8 at LBA 100
    rng[5], rng[6] = 8, 200          # NLB 8 at LBA 200
    del rng
    assert ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, cdw10=1, cdw11=1 << 2, cdw12=0, cid=2), 1) is None
    assert wait((1, 2)) == 0
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8 * 512] == bytes(8 * 512)
    assert blob[100 * 512:108 * 512] == bytes(4096) and blob[200 * 512:208 * 512] == bytes(4096)
    assert ex.execute(sqe(IoOpcode.FLUSH, nsid=0xFFFFFFFF, cid=3), 1) is None
    assert wait((1, 3)) == 0


def test_detach_completes_what_is_outstanding(aio_env):
    ex, ram, bio, wait, path = aio_env
    for cid in range(10):
        assert ex.execute(sqe(IoOpcode.READ, slba=cid * 8, nlb=8, prp1=RAM + cid * P, cid=cid), 2) is None
    bio.detach(1)
    assert bio.outstanding == 0
    assert 1 not in ex.aio_ns
    # every command got its completion (finished normally, or cancelled: retryable)
    for cid in range(10):
        assert wait((2, cid)) in (0, Status.NAMESPACE_NOT_READY | RETRY)


@pytest.mark.parametrize("datapath", PARAMS)
def test_runner_parks_a_whole_batch_and_serves_a_mixed_queue(tmp_path, datapath):
    """An SQ mixing a file namespace (parked on its engine) and a ram one: every command
    completes with its data, and on the native path the file SQEs of a batch go to Python
    together, not one C -> Python -> C round trip each."""
    p = tmp_path / "disk"
    p.write_bytes(bytes(range(256)) * (1 << 12))
    fb = create_backend("file", str(p), name_prefix="x")
    rb = create_backend("ram", "1M", name_prefix=f"vnvmed-aiot-{os.getpid()}")
    rb.direct_memory[:P] = b"R" * P
    mem = FlatMemory()
    ram = bytearray(64 * P)
    mem.add(RAM, ram)
    mm = mmap.mmap(-1, P)
    db = Doorbells(memoryview(mm))
    ex = IoExecutor({1: Namespace.for_backend(1, fb), 2: Namespace.for_backend(2, rb)}, mem, 32 * P)
    irqs: list[int] = []
    r = runner(datapath, executor=ex, doorbells=db, mem=mem, execute=ex.execute,
               irq=irqs.append, doorbell_error=lambda i, q: None)
    # As a worker's slot wires it: post without interrupting, one signal per reaped batch.
    bio = BackendIo(lambda *a: r.complete(*a, signal=False), signal=r.signal_pending)
    bio.bind(ex)
    try:
        assert bio.attach(1, fb, depth=32)
        r.add_cq(CqState(cqid=1, base=RAM + P, size=32, iv=1, ien=True))
        r.add_sq(SqState(sqid=1, cqid=1, base=RAM + 2 * P, size=32))
        plan = [1] * 12 + [2] + [1] * 8             # nsid per command; cid = index
        for i, nsid in enumerate(plan):
            ram[2 * P + 64 * i:2 * P + 64 * i + 64] = sqe(IoOpcode.READ, nsid=nsid, slba=8 * i if nsid == 1 else 0,
                                                          nlb=8, prp1=RAM + (8 + i) * P, cid=i).tobytes()
        db.set_sq_tail(1, len(plan))
        polls0 = getattr(r, "native_polls", 0)
        got = r.poll()
        bio.push()
        assert got == 1 and bio.outstanding == 20    # the ram read now, the file reads parked
        if datapath == "native":                     # one call, plus one resume after the batch
            assert r.native_polls - polls0 <= 3
        deadline = time.monotonic() + 5
        batches = 0
        irqs.clear()
        while bio.outstanding:
            assert time.monotonic() < deadline
            k = bio.service()
            if not k:
                select.select([bio.fileno()], [], [], 0.05)
                k = bio.service(woke=True)
            batches += k > 0
        assert 1 <= len(irqs) <= batches < 20 and set(irqs) == {1}   # one per batch, not per command
        cq = memoryview(ram).cast("I")[P // 4:P // 4 + 4 * 32]
        seen = {cq[4 * k + 3] & 0xFFFF: (cq[4 * k + 3] >> 17) for k in range(len(plan))}
        del cq
        assert seen == {i: 0 for i in range(len(plan))}
        for i, nsid in enumerate(plan):
            want = b"R" * P if nsid == 2 else (bytes(range(256)) * 16)
            assert bytes(ram[(8 + i) * P:(9 + i) * P]) == want, i
    finally:
        bio.close()
        inv = getattr(r, "invalidate", None)
        if inv is not None:
            inv()
        fb.destroy()
        rb.destroy()
