"""A host-side NVMe driver over vfio-user: the tests' (and the benchmark's) guest driver.

It plays the role of the guest kernel's nvme driver, in user space: "guest RAM" is a
memfd mapped with DMA_MAP, the doorbells are written straight into the BAR0 sparse-
mmap area (as a guest's MMIO would land there), and completions are polled by phase.
Everything goes through the real socket and real shared memory.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from vfio_user.client import VfioUserClient as Client

PAGE = 4096
REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0, 8, 0x14, 0x1C, 0x24, 0x28, 0x30
DB = 0x1000


class GuestRam:
    """memfd-backed 'guest RAM' with a page allocator (iova == offset + base)."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.fd = os.memfd_create("vnvmed-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = size
        self.base = base
        self._next = PAGE  # keep page 0 unused: address 0 is a classic bug magnet

    def alloc(self, n: int, align: int = PAGE) -> int:
        off = (self._next + align - 1) // align * align
        if off + n > self.size:
            raise MemoryError("guest RAM exhausted")
        self._next = off + n
        return self.base + off

    def view(self, addr: int, n: int) -> memoryview:
        return memoryview(self.mm)[addr - self.base:addr - self.base + n]

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


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

    # registers -------------------------------------------------------------------------
    def reg_read(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.c.region_read(0, off, size), "little")

    def reg_write(self, off: int, value: int, size: int = 4) -> None:
        self.c.region_write(0, off, value.to_bytes(size, "little"))

    def ring(self, qid: int, value: int, cq: bool = False, trapped: bool = False) -> None:
        off = DB + (2 * qid + (1 if cq else 0)) * 4
        if trapped or self.db is None:
            self.c.region_write(0, off, value.to_bytes(4, "little"))
        else:
            self.db[off // 4] = value   # one aligned 32-bit store, as a guest MMIO write

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
        q = Queue(0, depth, self.ram.alloc(depth * 64), self.ram.alloc(depth * 16))
        self.queues[0] = q
        self.reg_write(REG_AQA, ((depth - 1) << 16) | (depth - 1))
        self.reg_write(REG_ASQ, q.sq, 8)
        self.reg_write(REG_ACQ, q.cq, 8)
        self.reg_write(REG_CC, (4 << 20) | (6 << 16) | 1)
        self.wait_csts(1, 1)

    def disable(self) -> None:
        self.reg_write(REG_CC, 0)
        self.wait_csts(1, 0)
        self.queues.clear()

    # commands ----------------------------------------------------------------------------
    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def sqe(self, opcode: int, cid: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
            cdw: tuple[int, ...] = (), psdt: int = 0, fuse: int = 0) -> bytes:
        dw = list(cdw) + [0] * (6 - len(cdw))
        return struct.pack("<BBHIQQQQ6I", opcode, (psdt << 6) | fuse, cid, nsid, 0, 0, prp1, prp2, *dw)

    def submit(self, qid: int, entry: bytes, ring: bool = True) -> None:
        q = self.queues[qid]
        self.ram.view(q.sq + q.tail * 64, 64)[:] = entry
        q.tail = (q.tail + 1) % q.depth
        if ring:
            self.ring(qid, q.tail)

    def reap(self, qid: int, n: int = 1, timeout: float = 5.0) -> list[tuple[int, int, int, int]]:
        """(cid, status, dw0, sqhd) of the next n completions (status without phase)."""
        q = self.queues[qid]
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            e = self.ram.view(q.cq + q.head * 16, 16)
            dw0, _, sqhd_sqid, dw3 = struct.unpack("<IIII", e)
            if (dw3 >> 16) & 1 != q.phase:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"queue {qid}: {len(out)}/{n} completions")
                continue
            out.append((dw3 & 0xFFFF, (dw3 >> 17) & 0x7FFF, dw0, sqhd_sqid & 0xFFFF))
            q.sq_head = sqhd_sqid & 0xFFFF
            q.head += 1
            if q.head == q.depth:
                q.head = 0
                q.phase ^= 1
            self.ring(qid, q.head, cq=True)
        return out

    def admin(self, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
              cdw: tuple[int, ...] = ()) -> tuple[int, int]:
        cid = self.next_cid()
        self.submit(0, self.sqe(opcode, cid, nsid, prp1, prp2, cdw))
        got = self.reap(0)[0]
        assert got[0] == cid, f"admin completion for cid {got[0]}, expected {cid}"
        return got[1], got[2]

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        buf = self.ram.alloc(PAGE)
        st, _ = self.admin(0x06, nsid, buf, 0, (cns,))
        if st:
            raise RuntimeError(f"identify cns {cns}: status {st:#x}")
        return bytes(self.ram.view(buf, PAGE))

    def create_io_queue(self, qid: int, depth: int, iv: int = 0, ien: bool = False) -> Queue:
        q = Queue(qid, depth, self.ram.alloc(depth * 64), self.ram.alloc(depth * 16))
        st, _ = self.admin(0x05, 0, q.cq, 0, (((depth - 1) << 16) | qid, (iv << 16) | (2 if ien else 0) | 1))
        if st:
            raise RuntimeError(f"create CQ {qid}: status {st:#x}")
        st, _ = self.admin(0x01, 0, q.sq, 0, (((depth - 1) << 16) | qid, (qid << 16) | 1))
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

    def rw(self, qid: int, write: bool, nsid: int, slba: int, nblocks: int, buf: int,
           block_size: int = 512) -> int:
        """One read/write with PRPs for a page-aligned buffer; returns the status."""
        nbytes = nblocks * block_size
        prp1 = buf
        prp2 = 0
        pages = (nbytes + PAGE - 1) // PAGE
        if pages == 2:
            prp2 = buf + PAGE
        elif pages > 2:
            lst = self.ram.alloc(PAGE)
            ents = [buf + PAGE * i for i in range(1, pages)]
            self.ram.view(lst, 8 * len(ents))[:] = struct.pack(f"<{len(ents)}Q", *ents)
            prp2 = lst
        cid = self.next_cid()
        self.submit(qid, self.sqe(0x01 if write else 0x02, cid, nsid, prp1, prp2,
                                  (slba & 0xFFFFFFFF, slba >> 32, nblocks - 1)))
        got = self.reap(qid)[0]
        assert got[0] == cid
        return got[1]

    def close(self) -> None:
        if self.db is not None:
            self.db.release()
        if self.bar is not None:
            self.bar.close()
        if self.bar_fd is not None:
            os.close(self.bar_fd)
