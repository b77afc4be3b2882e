"""Socket-level fuzzer: mutated valid vfio-user sessions against the real daemon.

Theory of operation
-------------------
A *case* is one client connection to a running ``bin/vnvmed`` (started here through
tests/daemon.py, the one daemon runner).  It is built from a valid session and then
mutated, in one of two modes:

* ``protocol``: the message sequence a QEMU would send (VERSION, GET_INFO, region
  and IRQ info, DMA_MAP of a memfd, SET_IRQS with an eventfd, register writes that
  enable the controller, doorbells, REGION_READs, DMA_UNMAP, RESET, features and
  migration messages) with per-message mutations: bit flips in header or payload,
  interesting values at aligned offsets, truncation, extension, wrong size fields,
  dropped / duplicated / swapped messages, fds added or removed, NO_REPLY toggled;
  messages are sent pipelined, replies drained (server DMA requests served).
* ``nvme``: a well-formed session that enables the controller and creates I/O
  queues, then submits biased-random NVMe commands (opcodes, namespaces, PRPs and
  SGLs in and out of guest memory, LBA ranges around the end), rings doorbells with
  valid and invalid values, toggles CC.EN, unmaps and remaps guest memory, resets.

After every case the connection is closed and liveness is probed on a *fresh*
connection: VERSION, GET_INFO and a CSTS read must answer within PROBE_TIMEOUT.  A
probe that times out while every daemon process lives is a **hang**; a daemon
process that died (the supervisor's children changed) or a log line showing our own
bug ("Traceback", "internal error", "failed in poll") is a **crash**.  Either saves
the case's seed under the work dir and restarts the daemon.  Steps are messages and
NVMe commands sent.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.hostnvme import HostNvme
from tests.daemon import Daemon
from vfio_user.client import QEMU_VERSION_JSON, GuestRam, VfioUserClient
from vfio_user.errors import ProtocolError
from vfio_user.messages import (DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfoMsg, RegionAccess,
                                RegionInfoRequest, SetIrqs, Version)
from vfio_user.wire import HEADER_SIZE, Command, DmaMapFlag, Header, HeaderFlag, IrqSetFlag

PROBE_TIMEOUT = 10.0
RAM = 4 << 20
BUG_MARKS = ("Traceback", "internal error", "failed in poll", "executor failed")
INTERESTING32 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE)
INTERESTING64 = (0, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096, 1 << 32, RAM, RAM - 8)


@dataclass
class Outcome:
    steps: int = 0
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    guard_hits: int = 0
    notes: list[str] = field(default_factory=list)


class DaemonUnderTest:
    """bin/vnvmed with one mmap and one trapped controller, watched for deaths and bug lines."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.d: Daemon | None = None
        self.run: str = ""
        self._log_pos = 0
        self._children: dict[int, str] = {}

    def start(self) -> None:
        self.run = tempfile.mkdtemp(prefix="vnfz-", dir="/tmp")
        args = ["--cores", "0", "--log-level", "info",
                "--controller", f"fm={self.run}/fm.sock", "--namespace", "fm=ram:8M",
                "--namespace", "fm=null:8M",
                "--controller", f"ft={self.run}/ft.sock", "--namespace", "ft=ram:8M",
                "--doorbells", "ft=trapped"]
        self.d = Daemon(args, self.run).start()
        self._log_pos = 0
        self._children = self.d.children()

    @property
    def sockets(self) -> list[str]:
        assert self.d is not None
        return list(self.d.sockets.values())

    def stop(self) -> None:
        if self.d is not None:
            self.d.stop()
            from reactor.shm.names import cleanup_stale
            cleanup_stale(self.run)
            shutil.rmtree(self.run, ignore_errors=True)
            self.d = None

    def check(self) -> str | None:
        """A crash description, or None if every process lives and the log is clean."""
        assert self.d is not None
        if not self.d.alive():
            return f"supervisor exited ({self.d.proc.returncode if self.d.proc else '?'})"
        now = self.d.children()
        if set(now) != set(self._children):
            gone = {p: c for p, c in self._children.items() if p not in now}
            return f"daemon process(es) died and were replaced: {gone}"
        log = self.d.log()
        new, self._log_pos = log[self._log_pos:], len(log)
        for line in new.splitlines():
            if any(m in line for m in BUG_MARKS):
                return f"log: {line[:300]}"
        return None

    def probe(self, sock: str) -> bool:
        """Liveness on a fresh connection: VERSION, GET_INFO, CSTS read."""
        deadline = time.monotonic() + PROBE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with VfioUserClient(sock, timeout=max(0.5, deadline - time.monotonic())) as c:
                    c.negotiate()
                    c.get_device_info()
                    c.region_read(0, 0x1C, 4)
                    return True
            except (ConnectionError, OSError, ProtocolError, TimeoutError):
                time.sleep(0.05)   # e.g. the previous session still tearing down
        return False


# ------------------------------------------------------------------ protocol mode
def _msg(cmd: int, payload: bytes, fds: list[int] | None = None, flags: int = 0) -> list[Any]:
    return [cmd, bytearray(payload), list(fds or []), flags]


def valid_sequence(rng: random.Random, ram_fd: int, efd: int) -> list[list[Any]]:
    asq, acq = 0x10000, 0x20000
    regs = [(0x24, struct.pack("<I", 31 | (31 << 16))), (0x28, struct.pack("<Q", asq)),
            (0x30, struct.pack("<Q", acq)), (0x14, struct.pack("<I", (4 << 20) | (6 << 16) | 1))]
    seq = [_msg(Command.VERSION, Version(0, 0, QEMU_VERSION_JSON).encode()),
           _msg(Command.DEVICE_GET_INFO, DeviceInfoMsg(16).encode()),
           _msg(Command.DEVICE_GET_REGION_INFO, RegionInfoRequest(32, rng.randrange(10)).encode()),
           _msg(Command.DEVICE_GET_IRQ_INFO, IrqInfoMsg(16, 0, rng.randrange(5)).encode()),
           _msg(Command.DMA_MAP, DmaMap(32, DmaMapFlag.READ | DmaMapFlag.WRITE, 0, 0, RAM).encode(), [ram_fd]),
           _msg(Command.DEVICE_SET_IRQS, SetIrqs(20, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                                                 2, 0, 1).encode(), [efd])]
    seq += [_msg(Command.REGION_WRITE, RegionAccess(off, 0, len(v), v).encode()) for off, v in regs]
    seq += [_msg(Command.REGION_READ, RegionAccess(0x1C, 0, 4).encode()),
            _msg(Command.REGION_WRITE, RegionAccess(0x1000, 0, 4, struct.pack("<I", rng.randrange(4))).encode()),
            _msg(Command.REGION_WRITE, RegionAccess(4, 7, 2, b"\x06\x04").encode()),
            _msg(Command.REGION_READ, RegionAccess(0, 7, 64).encode()),
            _msg(Command.DEVICE_FEATURE, struct.pack("<II", 16, rng.randrange(1 << 17))),
            _msg(Command.MIG_DATA_READ, struct.pack("<II", 8, 64)),
            _msg(Command.DMA_UNMAP, DmaUnmap(24, 0, 0, RAM).encode()),
            _msg(Command.DEVICE_RESET, b"")]
    return seq


def mutate(rng: random.Random, seq: list[list[Any]], spare_fd: int) -> None:
    for _ in range(rng.randrange(1, 6)):
        if not seq:
            return
        i = rng.randrange(len(seq))
        m = seq[i]
        p: bytearray = m[1]
        k = rng.randrange(11)
        if k == 0 and p:
            for _ in range(rng.randrange(1, 5)):
                p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
        elif k == 1 and len(p) >= 4:
            off = rng.randrange(0, len(p) - 3) & ~3
            p[off:off + 4] = struct.pack("<I", rng.choice(INTERESTING32))
        elif k == 2 and len(p) >= 8:
            off = rng.randrange(0, len(p) - 7) & ~7
            p[off:off + 8] = struct.pack("<Q", rng.choice(INTERESTING64))
        elif k == 3:
            del p[rng.randrange(len(p) + 1):]
        elif k == 4:
            p += rng.randbytes(rng.randrange(1, 64))
        elif k == 5:
            m[0] = rng.randrange(0, 32)
        elif k == 6:
            del seq[i]
        elif k == 7:
            seq.insert(i, [m[0], bytearray(p), list(m[2]), m[3]])
        elif k == 8 and i + 1 < len(seq):
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
        elif k == 9:
            m[2] = [] if m[2] else [spare_fd] * rng.randrange(1, 3)
        elif k == 10:
            m[3] ^= rng.choice((HeaderFlag.NO_REPLY, HeaderFlag.REPLY, HeaderFlag.ERROR, 0x40))


def protocol_case(rng: random.Random, sock: str) -> int:
    ram = GuestRam(RAM)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    spare = os.eventfd(0, os.EFD_CLOEXEC)
    sent = 0
    try:
        ram.view(0x10000, 64)[:] = struct.pack("<BBHI", 0x06, 0, 1, 0) + bytes(56)  # Identify
        seq = valid_sequence(rng, ram.fd, efd)
        mutate(rng, seq, spare)
        with VfioUserClient(sock, timeout=2.0) as c:
            c.add_dma_buffer(0, ram.view(0, RAM))
            for cmd, payload, fds, flags in seq:
                size = HEADER_SIZE + len(payload)
                if rng.randrange(16) == 0:
                    size = rng.choice((0, 8, 15, size - 1, size + 1, 1 << 31, 0xFFFFFFFF))
                hdr = Header(rng.randrange(0x8000), cmd & 0xFFFF, size & 0xFFFFFFFF, flags & 0xFFFF)
                try:
                    c.send_raw(hdr.encode() + bytes(payload), fds)
                except OSError:
                    break
                sent += 1
            try:
                c.poll(0.2)
            except (ConnectionError, OSError):
                pass
    finally:
        os.close(efd)
        os.close(spare)
        try:
            ram.close()
        except BufferError:
            os.close(ram.fd)
    return sent


# ------------------------------------------------------------------ NVMe mode
def nvme_case(rng: random.Random, sock: str, trapped: bool) -> int:
    c = VfioUserClient(sock, timeout=3.0)
    ram = GuestRam(RAM)
    n: HostNvme | None = None
    sent = 0
    try:
        c.negotiate()
        c.dma_map(0, RAM, ram.fd, 0)
        n = HostNvme(c, ram)
        n.trapped = trapped
        n.setup_msix(2)
        n.enable()
        for qid in (1, 2):
            n.create_io_queue(qid, rng.choice((2, 4, 16, 64)), iv=1, ien=True)
        bufs = [ram.alloc(8 * 4096) for _ in range(4)]
        for _ in range(rng.randrange(10, 60)):
            k = rng.randrange(20)
            qid = rng.choice((1, 2))
            if k < 12:
                cid = n.next_cid()
                opc = rng.choice((0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x01, 0x02, rng.randrange(256)))
                nsid = rng.choice((1, 1, 2, 0, 3, 0xFFFFFFFF))
                prp1 = rng.choice(bufs) + rng.choice((0, 0, 4, 3, 4092))
                prp2 = rng.choice((0, prp1 + 4096, rng.choice(bufs), RAM - 8, RAM, 1 << 63,
                                   rng.getrandbits(64)))
                slba = rng.choice((0, 1, 100, 16383, 16384, 1 << 40, rng.getrandbits(64)))
                cdw12 = rng.choice((0, 7, 31, 255, 0xFFFF)) | rng.choice((0, 0, 1 << 30, 1 << 31))
                psdt = rng.choice((0, 0, 0, 1, 2, 3))
                n.submit(qid, n.sqe(opc, cid, nsid, prp1, prp2,
                                    (slba & 0xFFFFFFFF, slba >> 32, cdw12, rng.getrandbits(32)), psdt=psdt))
            elif k < 14:
                n.ring(qid, rng.choice((0, 1, 0xFFFF, rng.getrandbits(32))), cq=rng.random() < 0.5)
            elif k == 14:
                n.ring(rng.randrange(3, 600), rng.getrandbits(16))
            elif k == 15:
                c.dma_unmap(0, RAM)
                c.dma_map(0, RAM, ram.fd, 0)
            elif k == 16 and rng.random() < 0.3:
                c.reset()
                break
            elif k == 17 and rng.random() < 0.3:
                n.reg_write(0x14, 0)
                break
            else:
                for q in (1, 2):
                    while n.poll_cqe(q) is not None:
                        pass
            sent += 1
        c.poll(0.05)
    except (ProtocolError, TimeoutError, RuntimeError, AssertionError, ConnectionError, OSError) as e:
        # The daemon's answer to our nonsense (an error status, a refused command, a
        # disconnect): fine.  Liveness is judged by the probe afterwards.
        if isinstance(e, OSError) and e.errno not in (None, errno.EPIPE, errno.ECONNRESET, errno.EBADF):
            raise
    finally:
        if n is not None:
            n.close()
        c.close()
        try:
            ram.close()
        except BufferError:
            os.close(ram.fd)
    return sent


# ------------------------------------------------------------------ driver
def run(seconds: float, workdir: str, seed: int | None = None, log: Any = None) -> Outcome:
    """Fuzz for `seconds`; crash/hang inputs (their seeds) are saved in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    out = Outcome()
    master = random.Random(seed)
    dut = DaemonUnderTest(workdir)
    dut.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            case_seed = master.getrandbits(64)
            rng = random.Random(case_seed)
            socks = dut.sockets
            i = rng.randrange(len(socks))
            mode = "protocol" if rng.random() < 0.5 else "nvme"
            if mode == "protocol":
                out.steps += protocol_case(rng, socks[i])
            else:
                out.steps += nvme_case(rng, socks[i], trapped=socks[i].endswith("ft.sock"))
            out.cases += 1
            problem = dut.check()
            kind = "crash"
            if problem is None and not all(dut.probe(s) for s in socks):
                problem, kind = "liveness probe timed out", "hang"
                problem = dut.check() or problem
            if problem is not None:
                if kind == "hang":
                    out.hangs += 1
                else:
                    out.crashes += 1
                note = f"{kind}: case seed {case_seed} ({mode}): {problem}"
                out.notes.append(note)
                with open(os.path.join(workdir, f"{kind}-{case_seed}.txt"), "w") as f:
                    f.write(note + "\n--- daemon log tail ---\n" + (dut.d.log()[-8000:] if dut.d else ""))
                if log:
                    log(note)
                dut.stop()
                dut.start()
    finally:
        dut.stop()
    return out
