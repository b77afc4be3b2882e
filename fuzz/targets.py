"""Fuzz targets: one input (bytes) in, nothing out; a bug raises.

Theory of operation
-------------------
Each target wraps a sans-I/O piece of the daemon and knows which outcomes are the
*protocol's* answer to bad input (ProtocolError, StreamError, an NVMe status,
`NeedsMessageDma` for fd-less memory).  Anything else that escapes - any other
exception, a broken invariant (`FuzzBug`), a SIGSEGV on a guard page (see
fuzz/guarded.py) - is a bug the runner reports.  The same `one(data)` serves
atheris (coverage-guided, fuzz/atheris_main.py) and plain random or
hypothesis-generated inputs (tests/fuzz/), so a crash input found by one replays in
the other.

Targets
  vfio_message  the server's decode stage: bytes in arbitrary chunks -> Framer ->
                each frame through its command's decoder (the pipeline's table) and
                VERSION through the negotiation; decodable messages must re-encode to
                an equal message.
  nvme_io       one I/O SQE through `IoExecutor` over guarded guest memory (RW, RO
                and fd-less regions) and guarded namespaces; a read-only namespace
                must never be written, read-only guest memory never changes, the
                status is a 15-bit NVMe status.
  nvme_admin    admin SQEs through the controller model's admin queue (identify,
                logs, features, queue creation, Doorbell Buffer Config...) over the
                same guarded memory; the controller answers every command with one
                CQE (or parks it: AER) and never raises.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from nvme.config import ControllerConfig
from nvme.controller import Controller
from nvme.io import IoExecutor
from nvme.memory import NeedsMessageDma
from nvme.namespace import Namespace
from nvme.regs import Reg
from nvme.state import NamespaceInfo
from vfio_user.errors import ProtocolError, StreamError
from vfio_user.framing import Framer
from vfio_user.negotiate import parse_client_version
from vfio_user.wire import HEADER_SIZE, Command, Header

from .guarded import GuardedBackend, guarded_memory

MAX_MESSAGE = (1 << 20) + 4096      # as reactor.session.MAX_MESSAGE


class FuzzBug(AssertionError):
    """An invariant the target checks does not hold."""


# --------------------------------------------------------------------- vfio-user
def _decoders() -> dict[int, Callable[[bytes], Any]]:
    # The pipeline's own table: the decoders the server really runs.  Imported lazily
    # so that atheris can instrument the modules it imports.
    from reactor.pipeline import TABLE
    return {int(cmd): spec.decode for cmd, spec in TABLE.items()}


class VfioMessageTarget:
    name = "vfio_message"

    def __init__(self) -> None:
        self.decoders = _decoders()

    def one(self, data: bytes) -> None:
        if len(data) < 2:
            return
        # data[0] bit 7: a raw byte stream; else data[1] picks a command and the rest is
        # one well-framed message's payload (reaches the decoders far more often).
        # data[0] & 0x7F: recvmsg chunk size (0: the whole stream at once).
        step = (data[0] & 0x7F) or len(data)
        if data[0] & 0x80:
            body = data[2:]
        else:
            payload = data[2:]
            body = Header(0x1234, data[1] % 24, HEADER_SIZE + len(payload), 0).encode() + payload
        framer = Framer(MAX_MESSAGE)
        try:
            for pos in range(0, len(body), step):
                for frame in framer.feed(body[pos:pos + step]):
                    self._decode(frame.header.command, frame.payload)
        except StreamError:
            return
        finally:
            framer.close()

    def _decode(self, command: int, payload: bytes) -> None:
        dec = self.decoders.get(command)
        if dec is None:
            return
        try:
            if command == Command.VERSION:
                parse_client_version(payload)
                return
            msg = dec(payload)
        except ProtocolError:
            return
        _check_roundtrip(command, dec, msg)


def _check_roundtrip(command: int, dec: Callable[[bytes], Any], msg: Any) -> None:
    enc = getattr(msg, "encode", None)
    if not callable(enc) or isinstance(msg, (bytes, bytearray)):
        return
    try:
        again = dec(enc())
    except ProtocolError as e:
        raise FuzzBug(f"command {command}: {msg!r} re-encodes to something its decoder refuses: {e}")
    if again != msg:
        raise FuzzBug(f"command {command}: decode(encode(m)) != m: {msg!r} -> {again!r}")


# --------------------------------------------------------------------- NVMe
RW_BASE, RW_SIZE = 0x0, 64 * 4096            # guest RAM
RO_BASE, RO_SIZE = 1 << 32, 4 * 4096         # read-only (PRP lists / SGL segments in "ROM")
NOFD_BASE, NOFD_SIZE = 1 << 40, 4 * 4096     # mapped without fd: NeedsMessageDma
NS_BYTES = 256 * 1024
MDTS = 32 * 4096


class _NeverWrite(GuardedBackend):
    """The backend of a read-only namespace: a write reaching it is a bug."""

    read_only = True

    def write_from(self, offset: int, bufs: Any) -> None:
        raise FuzzBug("write reached a read-only namespace's backend")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise FuzzBug("write zeroes reached a read-only namespace's backend")

    discard = write_zeroes


def _guest() -> tuple[Any, list[Any]]:
    mem, regions = guarded_memory([(RW_BASE, RW_SIZE, True), (RO_BASE, RO_SIZE, False)])
    mem.add(NOFD_BASE, None, size=NOFD_SIZE)
    return mem, regions


def _aim(raw: int, sel: int) -> int:
    """Bias a 64-bit fuzzed address into (or just around) one of the regions."""
    if sel == 0:
        return raw
    base, size = ((RW_BASE, RW_SIZE), (RO_BASE, RO_SIZE), (NOFD_BASE, NOFD_SIZE))[(sel - 1) % 3]
    # Land inside, or a little past either end (the interesting edges).
    return (base + raw % (size + 8192) - 4096) & 0xFFFFFFFFFFFFFFFF if raw & 1 else base + raw % size


class NvmeIoTarget:
    name = "nvme_io"

    def __init__(self) -> None:
        self.mem, self.regions = _guest()
        self.rw = self.regions[0].data
        self.ro = self.regions[1].data
        b1, b2 = GuardedBackend(NS_BYTES), _NeverWrite(NS_BYTES)
        self.namespaces = {
            1: Namespace(NamespaceInfo(1, 512, NS_BYTES // 512), b1),
            2: Namespace(NamespaceInfo(2, 4096, NS_BYTES // 4096, read_only=True), b2),
        }
        self.ex = IoExecutor(self.namespaces, self.mem, MDTS)
        self.ro_image = bytes(self.ro)

    def one(self, data: bytes) -> None:
        if len(data) < 66:
            return
        sel, fill = data[0], data[1]
        sqe = bytearray(data[2:66])
        d = memoryview(sqe).cast("I")
        prp1 = _aim(d[6] | (d[7] << 32), sel & 3)
        prp2 = _aim(d[8] | (d[9] << 32), (sel >> 2) & 3)
        d[6], d[7], d[8], d[9] = prp1 & 0xFFFFFFFF, prp1 >> 32, prp2 & 0xFFFFFFFF, prp2 >> 32
        if sel & 0x10:
            d[1] = 1 + (d[1] & 1)               # a namespace that exists
        if sel & 0x20:
            d[12] &= ~0xFF00                    # short transfers (<= 256 blocks)
        rest = data[66:]
        # The rest of the input is guest memory content: PRP lists, SGL segments, data.
        where = (fill % 16) * 4096
        n = min(len(rest), RW_SIZE - where)
        self.rw[where:where + n] = rest[:n]
        m = min(len(rest), RO_SIZE)
        self.ro[:m] = rest[:m]                  # "ROM" content set by the test, not the device
        image = bytes(self.ro)
        try:
            res = self.ex.execute(d)
        except NeedsMessageDma:
            res = (0, 0)
        if res is None:
            raise FuzzBug("a synchronous backend's command was parked")
        status = res[0]
        if not isinstance(status, int) or not 0 <= status <= 0x7FF:
            raise FuzzBug(f"status {status!r} is not an NVMe status")
        if bytes(self.ro) != image:
            raise FuzzBug("read-only guest memory changed")
        d.release()


class _Hooks:
    def irq(self, vector: int) -> None: ...
    def io_cq_created(self, cq: Any) -> None: ...
    def io_sq_created(self, sq: Any) -> None: ...
    def io_sq_deleted(self, sqid: int) -> None: ...
    def sq_busy(self, sqid: int) -> bool: return False
    def io_cq_deleted(self, cqid: int) -> None: ...
    def shadow_doorbells_changed(self, shadow: Any) -> None: ...
    def coalescing_changed(self, threshold: int, time_100us: int, exempt_vectors: set[int]) -> None: ...
    def fatal(self, reason: str) -> None: ...


# The admin rings live in a region of their own that _aim() never points at, so a
# fuzzed Identify cannot scribble over the CQ the harness reaps (a legal write that
# would only confuse the harness).
ADMIN_BASE = 1 << 36
ASQ, ACQ, ADEPTH = ADMIN_BASE, ADMIN_BASE + 4096, 16


class NvmeAdminTarget:
    name = "nvme_admin"

    def __init__(self) -> None:
        self.mem, self.regions = _guest()
        self.rw = self.regions[0].data
        self.ro = self.regions[1].data
        _, ring_regions = guarded_memory([(ADMIN_BASE, 2 * 4096, True)])
        self.rings = ring_regions[0].data
        self.regions += ring_regions
        self.mem.add(ADMIN_BASE, self.rings)
        self.dbpage = bytearray(4096)
        self.db = memoryview(self.dbpage).cast("I")
        ns = {1: Namespace(NamespaceInfo(1, 512, NS_BYTES // 512), GuardedBackend(NS_BYTES)),
              2: Namespace(NamespaceInfo(2, 4096, NS_BYTES // 4096, read_only=True), _NeverWrite(NS_BYTES))}
        self.ctrl = Controller(ControllerConfig(max_io_queues=8, mqes=64), ns,
                               memoryview(self.dbpage), self.mem, _Hooks())
        self.tail = self.head = 0
        self.phase = 1
        self._enable()

    def _enable(self) -> None:
        c = self.ctrl
        if c.enabled:
            c.write_register(Reg.CC, 4, 0)
        self.rings[4096:4096 + 16 * ADEPTH] = bytes(16 * ADEPTH)
        c.write_register(Reg.AQA, 4, (ADEPTH - 1) | ((ADEPTH - 1) << 16))
        c.write_register(Reg.ASQ, 8, ASQ)
        c.write_register(Reg.ACQ, 8, ACQ)
        c.write_register(Reg.CC, 4, (6 << 16) | (4 << 20) | 1)
        self.tail = self.head = 0
        self.phase = 1
        if not c.ready:
            raise FuzzBug(f"controller not ready after enable: {c.state}")

    def one(self, data: bytes) -> None:
        if len(data) < 66:
            return
        sel, fill = data[0], data[1]
        sqe = bytearray(data[2:66])
        d = memoryview(sqe).cast("I")
        prp1 = _aim(d[6] | (d[7] << 32), sel & 3)
        prp2 = _aim(d[8] | (d[9] << 32), (sel >> 2) & 3)
        d[6], d[7], d[8], d[9] = prp1 & 0xFFFFFFFF, prp1 >> 32, prp2 & 0xFFFFFFFF, prp2 >> 32
        cid = d[0] >> 16
        d.release()
        rest = data[66:]
        where = (fill % 16) * 4096
        n = min(len(rest), RW_SIZE - where)
        self.rw[where:where + n] = rest[:n]
        image = bytes(self.ro)
        if not self.ctrl.ready:
            self._enable()
        off = 64 * self.tail
        self.rings[off:off + 64] = sqe
        self.tail = (self.tail + 1) % ADEPTH
        self.db[0] = self.tail
        self.ctrl.poll_admin()
        got = self._reap()
        if bytes(self.ro) != image:
            raise FuzzBug("read-only guest memory changed")
        opcode = sqe[0]
        if opcode == 0x0C:                       # AER: parked, completes later (or never)
            return
        if self.ctrl.fatal:
            self._enable()                       # e.g. CFS is a legal answer to nothing here
            raise FuzzBug(f"admin opcode {opcode:#x} made the controller fatal: {self.ctrl.fatal_reason}")
        if cid not in [c for c, _ in got]:
            raise FuzzBug(f"admin opcode {opcode:#x} cid {cid}: no completion (got {got})")

    def _reap(self) -> list[tuple[int, int]]:
        out = []
        while True:
            off = 4096 + 16 * self.head
            dw3 = struct.unpack_from("<I", self.rings, off + 12)[0]
            if (dw3 >> 16) & 1 != self.phase:
                break
            out.append((dw3 & 0xFFFF, (dw3 >> 17) & 0x7FFF))
            self.head += 1
            if self.head == ADEPTH:
                self.head, self.phase = 0, self.phase ^ 1
        self.db[1] = self.head
        return out


TARGETS: dict[str, Callable[[], Any]] = {
    "vfio_message": VfioMessageTarget,
    "nvme_io": NvmeIoTarget,
    "nvme_admin": NvmeAdminTarget,
}


class SelfTestTarget:
    """Known-bad targets that check the runner's classification end to end (tests only):
    an input starting with b"X" raises, crashes on a guard page, or never returns."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "guard":
            from .guarded import GuardedRegion
            self.region = GuardedRegion(4096)

    def one(self, data: bytes) -> None:
        if data[:1] != b"X":
            return
        if self.kind == "crash":
            raise FuzzBug("self-test crash")
        if self.kind == "guard":
            import ctypes
            ctypes.string_at(self.region.base + self.region.guard + self.region.size, 1)
        while self.kind == "hang":
            pass


def _selftest(kind: str) -> Callable[[], Any]:
    return lambda: SelfTestTarget(kind)


SELFTEST: dict[str, Callable[[], Any]] = {f"selftest_{k}": _selftest(k) for k in ("crash", "guard", "hang")}
