"""A host-side NVMe driver over vfio-user: the tests' (and the benchmark's) guest driver.

It plays the role of the guest kernel's nvme driver, in user space: "guest RAM" is a
memfd mapped with DMA_MAP, the doorbells are written straight into the BAR0 sparse-
mmap area (as a guest's MMIO would land there), and completions are polled by phase.
Everything goes through the real socket and real shared memory.

With `trapped = True` every doorbell write is a REGION_WRITE (what QEMU does when
BAR0 offers no mmap area).  After `enable_shadow()` (Doorbell Buffer Config) the I/O
queue doorbells follow the shadow-doorbell rule of Linux's nvme driver: store the
new value in the shadow page, full barrier, read EventIdx, and write the real
doorbell only if need_event(EventIdx, new, old); `doorbell_writes` /
`doorbells_skipped` count what happened.
"""
from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Callable

from nvme.fence import full_barrier
from vfio_user.client import GuestRam, VfioUserClient as Client
from vfio_user.wire import DmaMapFlag, IrqSetFlag

PAGE = 4096
MSIX_INDEX = 2   # VFIO_PCI_MSIX_IRQ_INDEX
# SGL descriptor type bytes (type in bits 7:4, subtype 0 = address)
SGL_DATA_BLOCK, SGL_BIT_BUCKET, SGL_SEGMENT, SGL_LAST_SEGMENT = 0x00, 0x10, 0x20, 0x30
REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0, 8, 0x14, 0x1C, 0x24, 0x28, 0x30
DB = 0x1000




def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux nvme_dbbuf_need_event (16-bit): event_idx in [old, new) modulo 2^16."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass
class Queue:
    qid: int
    depth: int
    sq: int
    cq: int
    tail: int = 0
    head: int = 0
    phase: int = 1
    sq_head: int = 0
    iv: int = 0
    ien: bool = False
    cq_depth: int = 0      # entries of the CQ if it differs from the SQ's (0: same)
    cqid: int = -1         # the CQ this SQ posts to (-1: its own, qid)

    @property
    def cq_entries(self) -> int:
        return self.cq_depth or self.depth


@dataclass(slots=True)
class Cqe:
    cid: int
    status: int     # SCT << 8 | SC (the 15 bits above the phase, i.e. incl. CRD/M/DNR)
    dw0: int
    sqhd: int
    sqid: int

    @property
    def sc(self) -> int:
        return self.status & 0xFF

    @property
    def sct(self) -> int:
        return (self.status >> 8) & 7

    @property
    def code(self) -> int:
        """(SCT << 8) | SC, without CRD/More/DNR: compare with nvme.status.Status values."""
        return self.status & 0x7FF


def status_code(status: int) -> int:
    """SCT/SC of a raw 15-bit status (drops CRD, More and DNR)."""
    return status & 0x7FF


def sgl_desc(addr: int, length: int, type_byte: int = SGL_DATA_BLOCK) -> bytes:
    """One 16-byte SGL descriptor: address, length, 3 reserved bytes, type/subtype."""
    return struct.pack("<QI3xB", addr, length, type_byte)


class HostNvme:
    def __init__(self, client: Client, ram: GuestRam) -> None:
        self.c = client
        self.ram = ram
        info, fd = client.get_region_info(0)
        self.bar_fd = fd
        self.bar = mmap.mmap(fd, info.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=info.offset) if fd is not None else None
        self.db = memoryview(self.bar).cast("I") if self.bar is not None else None
        self.queues: dict[int, Queue] = {}
        self._cid = 0
        # Completions reaped while waiting for another CID (e.g. an AER that fired
        # while an admin command was outstanding), per queue, in arrival order.
        self.stray: dict[int, list[Cqe]] = {}
        # How long admin() waits for a completion.  Tests keep 5 s; a driver that models
        # Linux (its nvme admin_timeout is 60 s) raises it.
        self.admin_timeout = 5.0
        # Asked about once a second while a completion is awaited (keep it cheap and
        # side-effect free): False (the front-end is gone and the socket closed) ends the
        # wait with ConnectionError at once, as a removed device ends Linux's wait, rather
        # than after admin_timeout.
        self.alive: Callable[[], bool] | None = None
        self.regions: list[GuestRam] = []     # extra DMA regions (add_region)
        self.irq_fds: list[int] = []
        self.shadow_db: memoryview | None = None    # shadow doorbell page, cast 'I'
        self.shadow_ei: memoryview | None = None    # EventIdx page, cast 'I'
        self.doorbell_writes = 0      # real doorbell writes (MMIO or REGION_WRITE)
        self.doorbells_skipped = 0    # shadow-only updates (need_event said no)

    # memory ---------------------------------------------------------------------------
    def add_region(self, base: int, size: int, writable: bool = True) -> GuestRam:
        """Map a second memfd at iova `base`; READ only if not `writable` (PRP lists, SGLs).

        We keep a read-write mapping on our side (the "guest" fills it); only the
        device's view is read-only.
        """
        r = GuestRam(size, base)
        flags = DmaMapFlag.READ | (DmaMapFlag.WRITE if writable else 0)
        try:
            self.c.dma_map(base, size, r.fd, 0, flags=flags)
        except BaseException:
            r.close()
            raise
        self.regions.append(r)
        return r

    def fill(self, addr: int, data: bytes) -> None:
        self._ram_of(addr).view(addr, len(data))[:] = data

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self._ram_of(addr).view(addr, n))

    def _ram_of(self, addr: int) -> GuestRam:
        for r in [self.ram, *self.regions]:
            if r.base <= addr < r.base + r.size:
                return r
        raise ValueError(f"{addr:#x} is not in any region of ours")

    # registers -------------------------------------------------------------------------
    def reg_read(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.c.region_read(0, off, size), "little")

    def reg_write(self, off: int, value: int, size: int = 4) -> None:
        self.c.region_write(0, off, value.to_bytes(size, "little"))

    def ring(self, qid: int, value: int, cq: bool = False, trapped: bool | None = None) -> None:
        """Doorbell write: into the mmapped page (a guest MMIO) or as a trapped REGION_WRITE.

        `trapped=None` uses the instance default `self.trapped` (False: mmapped).
        """
        word = 2 * qid + (1 if cq else 0)
        off = DB + word * 4
        if qid and self.shadow_db is not None and self.shadow_ei is not None:
            # Linux nvme_dbbuf_update_and_check_event: value into the shadow page, mb(),
            # then the EventIdx the device armed decides whether the doorbell is written.
            old = self.shadow_db[word]
            self.shadow_db[word] = value
            full_barrier()
            if not need_event(self.shadow_ei[word], value, old):
                self.doorbells_skipped += 1
                return
        self.doorbell_writes += 1
        if trapped is None:
            trapped = self.trapped
        if trapped or self.db is None:
            self.c.region_write(0, off, value.to_bytes(4, "little"))
        else:
            self.db[off // 4] = value   # one aligned 32-bit store, as a guest MMIO write

    trapped = False

    def wait_csts(self, mask: int, want: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            v = self.reg_read(REG_CSTS)
            if v & mask == want:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS={v:#x}, waiting for {want:#x} under {mask:#x}")
            time.sleep(0.001)

    def enable(self, depth: int = 32) -> None:
        q = Queue(0, depth, self.ram.alloc(depth * 64), self.ram.alloc(depth * 16), ien=True)
        self.queues[0] = q
        self.stray.clear()
        self.reg_write(REG_AQA, ((depth - 1) << 16) | (depth - 1))
        self.reg_write(REG_ASQ, q.sq, 8)
        self.reg_write(REG_ACQ, q.cq, 8)
        self.reg_write(REG_CC, (4 << 20) | (6 << 16) | 1)
        self.wait_csts(1, 1)

    def disable(self) -> None:
        self.reg_write(REG_CC, 0)
        self.wait_csts(1, 0)
        self.queues.clear()
        self.stray.clear()

    def shutdown(self, abrupt: bool = False, timeout: float = 5.0) -> int:
        """CC.SHN = 01b (normal) or 10b (abrupt); returns CSTS once SHST = 10b."""
        cc = self.reg_read(REG_CC)
        self.reg_write(REG_CC, (cc & ~(3 << 14)) | ((2 if abrupt else 1) << 14))
        return self.wait_csts(3 << 2, 2 << 2, timeout)

    # commands ----------------------------------------------------------------------------
    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def sqe(self, opcode: int, cid: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
            cdw: tuple[int, ...] = (), psdt: int = 0, fuse: int = 0,
            dptr: bytes | None = None) -> bytes:
        """A 64-byte SQE; `dptr` (16 bytes, e.g. an SGL descriptor) replaces PRP1/PRP2."""
        dw = list(cdw) + [0] * (6 - len(cdw))
        if dptr is not None:
            prp1, prp2 = struct.unpack("<QQ", dptr)
        return struct.pack("<BBHIQQQQ6I", opcode, (psdt << 6) | fuse, cid, nsid, 0, 0, prp1, prp2, *dw)

    def submit(self, qid: int, entry: bytes, ring: bool = True) -> None:
        q = self.queues[qid]
        self.ram.view(q.sq + q.tail * 64, 64)[:] = entry
        q.tail = (q.tail + 1) % q.depth
        if ring:
            self.ring(qid, q.tail)

    def reap_cqes(self, qid: int, n: int = 1, timeout: float = 5.0) -> list[Cqe]:
        """The next n completions of CQ `qid`, in order (head doorbell rung after each)."""
        q = self.queues[qid]
        out: list[Cqe] = []
        deadline = time.monotonic() + timeout
        next_alive = time.monotonic() + 1.0
        spins = 0
        while len(out) < n:
            e = self.ram.view(q.cq + q.head * 16, 16).cast("I")
            dw3 = e[3]          # the phase word first: one aligned load
            if (dw3 >> 16) & 1 != q.phase:
                e.release()
                spins += 1
                if spins & 0x3FF == 0:
                    now = time.monotonic()
                    if now > deadline:
                        raise TimeoutError(f"queue {qid}: {len(out)}/{n} completions")
                    if self.alive is not None and now > next_alive:
                        if not self.alive():
                            raise ConnectionError(f"queue {qid}: the connection closed while "
                                                  f"waiting for {n - len(out)} completion(s)")
                        next_alive = now + 1.0
                    time.sleep(0.0001)  # leave the daemon some CPU on a 2-core box
                continue
            dw0, sqhd_sqid = e[0], e[2]
            e.release()
            out.append(Cqe(dw3 & 0xFFFF, (dw3 >> 17) & 0x7FFF, dw0, sqhd_sqid & 0xFFFF,
                           sqhd_sqid >> 16))
            q.sq_head = sqhd_sqid & 0xFFFF
            q.head += 1
            if q.head == q.cq_entries:
                q.head = 0
                q.phase ^= 1
            self.ring(qid, q.head, cq=True)
        return out

    def reap(self, qid: int, n: int = 1, timeout: float = 5.0) -> list[tuple[int, int, int, int]]:
        """(cid, status, dw0, sqhd) of the next n completions (status without phase)."""
        return [(e.cid, e.status, e.dw0, e.sqhd) for e in self.reap_cqes(qid, n, timeout)]

    def wait_cid(self, qid: int, cid: int, timeout: float = 5.0) -> Cqe:
        """The completion of `cid` on CQ `qid`; others seen meanwhile go to self.stray."""
        stash = self.stray.setdefault(qid, [])
        for i, e in enumerate(stash):
            if e.cid == cid:
                return stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            e = self.reap_cqes(qid, 1, max(0.0, deadline - time.monotonic()))[0]
            if e.cid == cid:
                return e
            stash.append(e)

    def poll_cqe(self, qid: int) -> Cqe | None:
        """A completion if one is there now (stray ones first), else None."""
        stash = self.stray.get(qid)
        if stash:
            return stash.pop(0)
        q = self.queues[qid]
        e = self.ram.view(q.cq + q.head * 16, 16).cast("I")
        ready = (e[3] >> 16) & 1 == q.phase
        e.release()
        return self.reap_cqes(qid, 1)[0] if ready else None

    def command(self, qid: int, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
                cdw: tuple[int, ...] = (), psdt: int = 0, fuse: int = 0,
                dptr: bytes | None = None, timeout: float = 5.0) -> Cqe:
        """Submit one command on `qid` and wait for its completion."""
        cid = self.next_cid()
        self.submit(qid, self.sqe(opcode, cid, nsid, prp1, prp2, cdw, psdt, fuse, dptr))
        return self.wait_cid(qid, cid, timeout)

    def admin(self, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
              cdw: tuple[int, ...] = ()) -> tuple[int, int]:
        e = self.command(0, opcode, nsid, prp1, prp2, cdw, timeout=self.admin_timeout)
        return e.status, e.dw0

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        buf = self.ram.alloc(PAGE)
        st, _ = self.admin(0x06, nsid, buf, 0, (cns,))
        if st:
            raise RuntimeError(f"identify cns {cns}: status {st:#x}")
        return bytes(self.ram.view(buf, PAGE))

    def get_log_page(self, lid: int, nbytes: int, nsid: int = 0xFFFFFFFF, rae: bool = False,
                     offset: int = 0) -> tuple[int, bytes]:
        """Get Log Page (02h): (status, data); NUMD is 0's based dwords."""
        buf = self.ram.alloc(max(nbytes, PAGE))
        numd = nbytes // 4 - 1
        cdw10 = lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16)
        st, _ = self.admin(0x02, nsid, buf, 0, (cdw10, numd >> 16, offset & 0xFFFFFFFF, offset >> 32))
        return st, bytes(self.ram.view(buf, nbytes))

    def enable_shadow(self) -> tuple[int, int]:
        """Doorbell Buffer Config (7Ch): shadow doorbell and EventIdx pages; (dbbuf, eventidx)."""
        dbbuf, ei = self.ram.alloc(PAGE), self.ram.alloc(PAGE)
        st, _ = self.admin(0x7C, 0, dbbuf, ei)
        if st:
            raise RuntimeError(f"doorbell buffer config: status {st:#x}")
        self.shadow_db = self.ram.view(dbbuf, PAGE).cast("I")
        self.shadow_ei = self.ram.view(ei, PAGE).cast("I")
        return dbbuf, ei

    def submit_aer(self) -> int:
        """Post an Asynchronous Event Request (0Ch); returns its CID (completes later)."""
        cid = self.next_cid()
        self.submit(0, self.sqe(0x0C, cid))
        return cid

    def create_io_queue(self, qid: int, depth: int, iv: int = 0, ien: bool = False,
                        cq_depth: int = 0, cqid: int | None = None) -> Queue:
        """Create CQ `qid` (cq_depth entries, default depth) then SQ `qid` on it.

        With `cqid` (an existing CQ of ours) only the SQ is created, posting to that CQ:
        reap its completions with reap(cqid).
        """
        if cqid is not None and cqid != qid:
            cq = self.queues[cqid]
            q = Queue(qid, depth, self.ram.alloc(depth * 64), cq.cq, cqid=cqid)
        else:
            cqid = qid
            q = Queue(qid, depth, self.ram.alloc(depth * 64), self.ram.alloc((cq_depth or depth) * 16),
                      iv=iv, ien=ien, cq_depth=cq_depth, cqid=qid)
            st, _ = self.admin(0x05, 0, q.cq, 0, (((q.cq_entries - 1) << 16) | qid,
                                                  (iv << 16) | (2 if ien else 0) | 1))
            if st:
                raise RuntimeError(f"create CQ {qid}: status {st:#x}")
        st, _ = self.admin(0x01, 0, q.sq, 0, (((depth - 1) << 16) | qid, (cqid << 16) | 1))
        if st:
            raise RuntimeError(f"create SQ {qid}: status {st:#x}")
        self.queues[qid] = q
        return q

    def delete_io_queue(self, qid: int) -> None:
        st, _ = self.admin(0x00, 0, 0, 0, (qid,))
        assert st == 0, f"delete SQ {qid}: {st:#x}"
        st, _ = self.admin(0x04, 0, 0, 0, (qid,))
        assert st == 0, f"delete CQ {qid}: {st:#x}"
        del self.queues[qid]

    # data pointers -------------------------------------------------------------------------
    def prps(self, buf: int, nbytes: int, list_ram: GuestRam | None = None) -> tuple[int, int]:
        """PRP1/PRP2 for `nbytes` at `buf` (PRP1 may carry an offset; the rest page aligned).

        More than two pages need a PRP list: it is written into `list_ram` (default our
        RAM), chained across list pages when it does not fit in one.
        """
        first = min(nbytes, PAGE - (buf % PAGE))
        rest = nbytes - first
        if rest <= 0:
            return buf, 0
        nxt = buf + first
        if rest <= PAGE:
            return buf, nxt
        ents = [nxt + PAGE * i for i in range((rest + PAGE - 1) // PAGE)]
        ram = list_ram or self.ram
        per = PAGE // 8
        pages: list[list[int]] = []
        while ents:
            if len(ents) <= per:
                pages.append(ents)
                ents = []
            else:
                pages.append(ents[:per - 1])
                ents = ents[per - 1:]
        addrs = [ram.alloc(PAGE) for _ in pages]
        for i, (addr, chunk) in enumerate(zip(addrs, pages)):
            words = chunk + ([addrs[i + 1]] if i + 1 < len(addrs) else [])
            ram.view(addr, 8 * len(words))[:] = struct.pack(f"<{len(words)}Q", *words)
        return buf, addrs[0]

    def io(self, qid: int, opcode: int, nsid: int, slba: int, nblocks: int, prp1: int = 0,
           prp2: int = 0, psdt: int = 0, dptr: bytes | None = None, cdw12_flags: int = 0,
           timeout: float = 5.0) -> Cqe:
        """One NVM command with an explicit data pointer (PRPs or an SGL in `dptr`)."""
        return self.command(qid, opcode, nsid, prp1, prp2,
                            (slba & 0xFFFFFFFF, slba >> 32, ((nblocks - 1) & 0xFFFF) | cdw12_flags),
                            psdt, 0, dptr, timeout)

    def rw(self, qid: int, write: bool, nsid: int, slba: int, nblocks: int, buf: int,
           block_size: int = 512, list_ram: GuestRam | None = None) -> int:
        """One read/write with PRPs for a page-aligned buffer; returns the status."""
        prp1, prp2 = self.prps(buf, nblocks * block_size, list_ram)
        return self.io(qid, 0x01 if write else 0x02, nsid, slba, nblocks, prp1, prp2).status

    def sgl_rw(self, qid: int, write: bool, nsid: int, slba: int, nblocks: int,
               chunks: list[tuple[int, int]], seg_ram: GuestRam | None = None,
               per_segment: int = 0) -> int:
        """Read/write with an SGL over data `chunks` [(addr, len)]; returns the status.

        One chunk: a Data Block descriptor in the SQE.  Several: descriptor lists in
        `seg_ram`; with `per_segment` > 0 the data descriptors are split over Segment
        lists of that many, chained, the last list reached through a Last Segment.
        """
        if len(chunks) == 1:
            dptr = sgl_desc(chunks[0][0], chunks[0][1])
        else:
            ram = seg_ram or self.ram
            per = per_segment or len(chunks)
            groups = [chunks[i:i + per] for i in range(0, len(chunks), per)]
            # list i holds its data descriptors plus, unless last, the pointer to list i+1
            sizes = [16 * (len(g) + (1 if i + 1 < len(groups) else 0)) for i, g in enumerate(groups)]
            addrs = [ram.alloc(n, 16) for n in sizes]
            for i, g in enumerate(groups):
                body = b"".join(sgl_desc(a, n) for a, n in g)
                if i + 1 < len(groups):
                    kind = SGL_LAST_SEGMENT if i + 2 == len(groups) else SGL_SEGMENT
                    body += sgl_desc(addrs[i + 1], sizes[i + 1], kind)
                ram.view(addrs[i], len(body))[:] = body
            first = sizes[0]
            # A list that holds a segment descriptor must itself be a (plain) Segment.
            dptr = sgl_desc(addrs[0], first, SGL_LAST_SEGMENT if len(groups) == 1 else SGL_SEGMENT)
        return self.io(qid, 0x01 if write else 0x02, nsid, slba, nblocks, psdt=1, dptr=dptr).status

    # interrupts ---------------------------------------------------------------------------
    def setup_msix(self, vectors: int) -> list[int]:
        """Eventfds for MSI-X vectors 0..vectors-1 (SET_IRQS DATA_EVENTFD|ACTION_TRIGGER)."""
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(vectors)]
        try:
            self.c.set_irqs(MSIX_INDEX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                            0, vectors, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.irq_fds.extend(fds)
        return fds

    @staticmethod
    def wait_eventfd(fd: int, timeout: float = 5.0) -> int:
        """The eventfd's counter once it is non-zero (read resets it); 0 on timeout."""
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for v in (self.shadow_db, self.shadow_ei):
            if v is not None:
                v.release()
        self.shadow_db = self.shadow_ei = None
        if self.db is not None:
            self.db.release()
        if self.bar is not None:
            self.bar.close()
        if self.bar_fd is not None:
            os.close(self.bar_fd)
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds.clear()
        for r in self.regions:
            r.close()
        self.regions.clear()
