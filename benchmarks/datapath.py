"""Per-I/O CPU budget of the worker data path, in one process (no sockets, no daemon).

    python -m benchmarks.datapath [-n 200000] [-q 32] [-o 4096] [--backend null|ram|file|file-async|nbd] [--profile]
                                  [--datapath python|native]

Drives `nvme.qpair.QueueRunner` + `nvme.io.IoExecutor` exactly as a worker does
(doorbell words in a shared buffer, SQ/CQ/data in a FlatMemory "guest RAM"), with
a minimal host side: fill `depth` SQEs, store the tail, `poll()`, consume the CQEs,
store the CQ head.  `file` reads a page-cached 64 MiB file with preadv (the synchronous
path); `file-async` the same file through the worker's asynchronous path (workers.aio
BackendIo + io_uring or the thread pool): commands park in poll() and complete when
reaped, so the whole-loop figure is the one to compare between the two.  `nbd` runs the
same asynchronous path on an nbdkit memory export (UNIX socket); the server's own CPU is
not in the figure.
Reported: CPU ns per I/O of the whole loop and of `poll()` alone
(process_time), i.e. the ceiling one worker core could reach.  A CPU-time figure,
so it is far less disturbed by other load on the machine than wall-clock IOPS.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import select
import struct
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvme.doorbell import Doorbells  # noqa: E402
from nvme.io import IoExecutor  # noqa: E402
from nvme.memory import FlatMemory  # noqa: E402
from nvme.msgwindow import MessageWriteWindows  # noqa: E402
from nvme.namespace import Namespace  # noqa: E402
from nvme.qpair import QueueRunner  # noqa: E402
from nvme.state import CqState, SqState  # noqa: E402

PAGE = 4096
# Guest memory above 1 MiB, like a Linux guest's (outside the default message-write window).
BASE = 0x1000_0000


def setup(depth: int, io_size: int, backend: str, flat: bool = False, windows: bool = False,
          dirty: bool = False, datapath: str = "python"):
    size = depth + 1
    npages = (io_size + PAGE - 1) // PAGE
    nbytes = PAGE * (8 + depth * (npages + 1)) + size * 80
    nbytes = (nbytes + PAGE - 1) // PAGE * PAGE
    mem: Any
    ram: Any
    be: Any
    if flat:
        ram = bytearray(nbytes)
        mem = FlatMemory()
        mem.add(BASE, ram)
    else:   # the worker's own guest memory class, over a memfd like QEMU's RAM
        from reactor.guestmem import MappedGuestMemory
        from vfio_user.client import GuestRam
        guest = GuestRam(nbytes, base=BASE, name="datapath-bench")
        mem = MappedGuestMemory()
        mem.map(BASE, nbytes, 0, guest.fd, True, True)
        ram = guest.mm
    db = bytearray(PAGE)
    dbw = memoryview(db).cast("I")
    sq, cq = BASE, BASE + PAGE * ((size * 64 + PAGE - 1) // PAGE)
    data = cq + PAGE * ((size * 16 + PAGE - 1) // PAGE)
    bio = None
    if backend == "ram":
        from backends.ram import RamBackend
        be = RamBackend.create(1 << 26, name_prefix=f"vnvmed-dp-{os.getpid()}")
    elif backend == "nbd":       # an nbdkit memory export on a UNIX socket, through NbdEngine
        import tempfile
        from backends.nbd import NbdBackend
        from tests.nbdserver import NbdServer
        tmp = tempfile.mkdtemp(prefix="vnvmed-datapath-nbd-")
        srv = NbdServer.nbdkit_memory("256M", sock=os.path.join(tmp, "nbd.sock")).start()
        be = NbdBackend.create(srv.uri)
        be.server = (srv, tmp)         # stopped by bench()
    elif backend in ("file", "file-async"):
        from backends.file import FileBackend
        path = f"/var/tmp/vnvmed-datapath-{os.getpid()}.img"
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * 64)       # 64 MiB, in the page cache
        be = FileBackend(path)
        os.unlink(path)                              # the open fd keeps it
    else:
        from backends.null import NullBackend
        be = NullBackend(1 << 30)
    ns = {1: Namespace.for_backend(1, be)}
    # --windows: the executor's memory wrapped as in a worker (default window [0, 1 MiB)).
    ex = IoExecutor(ns, MessageWriteWindows(mem) if windows else mem, 1 << 20)
    kw: dict[str, Any] = dict(doorbells=Doorbells(memoryview(db)), mem=mem,
                              execute=lambda sqe, sqid: ex.execute(sqe, sqid),
                              irq=lambda v: None, doorbell_error=lambda i, q: None)
    if datapath == "native":     # nvme/native: the C loop for what it serves, Python for the rest
        from nvme.native import NativeQueueRunner
        runner: QueueRunner = NativeQueueRunner(executor=ex, **kw)
    else:
        runner = QueueRunner(**kw)
    if backend in ("file-async", "nbd"):
        from workers.aio import BackendIo
        bio = BackendIo(runner.complete)
        bio.bind(ex)
        bio.attach(1, be, depth)
        if datapath == "native":    # file: on the C loop's own io_uring ring (nvme/native/uring.c)
            bio.serve_native(runner)
    runner.add_cq(CqState(cqid=1, base=cq, size=size, iv=0, ien=False))
    runner.add_sq(SqState(sqid=1, base=sq, size=size, cqid=1))
    if dirty:   # migration's dirty-page logging on, as a worker has it (migration/dirty.py)
        from migration.dirty import DirtyLog, map_size
        log = DirtyLog()
        log.add(BASE, nbytes, memoryview(bytearray(map_size(BASE, nbytes))))
        ex.dirty = log
        runner.set_dirty(log)
    sqes = []
    nlb = io_size // 512
    for cid in range(depth):
        buf = data + cid * (npages + 1) * PAGE
        prp2 = buf + PAGE if npages == 2 else 0
        if npages > 2:
            lst = buf + npages * PAGE
            off = lst - BASE
            ents = [buf + PAGE * i for i in range(1, npages)]
            ram[off:off + 8 * len(ents)] = struct.pack(f"<{len(ents)}Q", *ents)
            prp2 = lst
        sqes.append(struct.pack("<BBHIQQQQ6I", 0x02, 0, cid, 1, 0, 0, buf, prp2,
                                (cid * 8 * nlb) & 0xFFFFFFFF, 0, nlb - 1, 0, 0, 0))
    return ram, dbw, runner, sqes, sq - BASE, cq - BASE, size, (be, bio)


def bench(n: int, depth: int, io_size: int, backend: str, profile: bool,
          flat: bool = False, windows: bool = False, dirty: bool = False,
          datapath: str = "python") -> dict[str, float]:
    ram, dbw, runner, sqes, sqo, cqo, size, (be, bio) = setup(depth, io_size, backend, flat, windows,
                                                               dirty, datapath)
    mv = memoryview(ram)
    cqw = mv[cqo:cqo + size * 16].cast("I")
    tail = head = 0
    phase = 1
    done = 0
    poll_ns = 0
    prof = cProfile.Profile() if profile else None
    clock = time.process_time_ns
    t0 = clock()
    while done < n:
        for cid in range(depth):
            o = sqo + tail * 64
            mv[o:o + 64] = sqes[cid]
            tail = (tail + 1) % size
        dbw[2] = tail
        p0 = clock()
        if prof:
            prof.enable()
        got = runner.poll()
        if bio is not None:         # parked on the backend: submit, then reap until all are back
            bio.push()
            while got < depth:
                k = bio.service()         # (not `n`: that is the run's length)
                if not k:
                    select.select([bio.fileno()], [], [], 0.01)
                    k = bio.service(woke=True)
                got += k
        if prof:
            prof.disable()
        poll_ns += clock() - p0
        assert got == depth, got
        for _ in range(depth):
            dw3 = cqw[head * 4 + 3]
            assert (dw3 >> 16) & 1 == phase and dw3 >> 17 == 0, hex(dw3)
            head += 1
            if head == size:
                head, phase = 0, phase ^ 1
        dbw[3] = head
        done += depth
    total = clock() - t0
    cqw.release()
    mv.release()
    if bio is not None:
        bio.close()
    invalidate = getattr(runner, "invalidate", None)
    if invalidate is not None:
        invalidate()            # the native runner lets go of the backend's memory
    be.close()
    if hasattr(be, "destroy"):
        be.destroy()
    if hasattr(be, "server"):
        import shutil
        be.server[0].stop()
        shutil.rmtree(be.server[1], ignore_errors=True)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return {"ios": done, "ns_per_io_total": total / done, "ns_per_io_poll": poll_ns / done,
            "poll_iops_ceiling": 1e9 * done / poll_ns}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=200_000)
    p.add_argument("-q", type=int, default=32)
    p.add_argument("-o", type=int, default=4096)
    p.add_argument("--backend", choices=("null", "ram", "file", "file-async", "nbd"), default="null")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--flat", action="store_true", help="nvme.memory.FlatMemory instead of the worker's MappedGuestMemory")
    p.add_argument("--windows", action="store_true",
                   help="wrap the executor's memory in the default message-write window, as workers do")
    p.add_argument("--dirty", action="store_true",
                   help="dirty-page logging on (every read and CQ batch marks its pages)")
    p.add_argument("--datapath", choices=("python", "native"), default="python")
    a = p.parse_args()
    r = bench(a.n, a.q, a.o, a.backend, a.profile, a.flat, a.windows, a.dirty, a.datapath)
    print(f"{a.datapath} {a.backend} {a.o}B qd={a.q}{' windows' if a.windows else ''}{' dirty' if a.dirty else ''}: poll() {r['ns_per_io_poll']:.0f} ns/IO CPU "
          f"(ceiling {r['poll_iops_ceiling']:,.0f} IOPS/core); whole loop {r['ns_per_io_total']:.0f} ns/IO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
