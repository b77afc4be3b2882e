"""Live migration driven by a client written from the protocol reference alone
(../shared/reference/vfio-user-protocol.md: §1 framing, §2 VERSION, §3 payloads, §4 the
v1 region-9 scheme and QEMU's v1 sequence §4.4, §5 the v2 scheme), not by the
project's client or migration drivers: raw struct packing on a raw AF_UNIX socket.
It guards against the project's client and server agreeing on a private reading of
the protocol (issue 10: "an independent client will drive both schemes").

Two real daemons share a file namespace.  A guest (this module: 16 MiB of memfd RAM,
an admin queue and one I/O queue pair it rings by REGION_WRITE) writes a block, then
is moved A -> B by v2 (DMA logging, PRE_COPY, STOP_COPY, RESUMING, arcs walked by the
server) and B -> A by v1 (region 9 found by its type/subtype cap; device_state,
pending_bytes, data_offset, data_size exactly as §4.4), and after each move keeps
using the same queues: the block reads back, Identify completes, nothing re-created.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
import time
from typing import Callable

import pytest

from tests.migrig import start_hosts, stop_hosts

pytestmark = pytest.mark.timeout(180)

HDR = struct.Struct("<HHIII")           # msg_id, command, size, flags, error (§1.2)
VERSION, DMA_MAP, GET_REGION_INFO, REGION_READ, REGION_WRITE = 1, 2, 5, 9, 10
DEVICE_FEATURE, MIG_DATA_READ, MIG_DATA_WRITE = 16, 17, 18
GET, SET, PROBE = 1 << 16, 1 << 17, 1 << 18
F_MIGRATION, F_STATE, F_LOG_START, F_LOG_STOP, F_LOG_REPORT = 1, 2, 6, 7, 8
STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY = 1, 2, 3, 4, 6          # §5.3
V1_RUNNING, V1_SAVING, V1_RESUMING = 1, 2, 4                            # §4.3
RAM = 16 << 20
# above 1 MiB, where a guest driver's allocations are (below it the server may reach
# memory by DMA_READ/DMA_WRITE messages: served too, see RefClient.req)
ASQ, ACQ, IOSQ, IOCQ, IDBUF, DATABUF = 0x210000, 0x220000, 0x230000, 0x240000, 0x250000, 0x260000
DMA_READ, DMA_WRITE = 11, 12
QD = 16


class Failed(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(f"error reply errno {err}")
        self.errno = err


class RefClient:
    """One vfio-user connection, from the reference: a request, its reply."""

    def __init__(self, path: str, mem: mmap.mmap) -> None:
        self.mem = mem
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(path)
        self.mid = 0

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data, fds, _flags, _addr = socket.recv_fds(self.s, n - len(out), 4)
            for fd in fds:                  # region fds: this client never mmaps
                os.close(fd)
            if not data:
                raise ConnectionError("EOF")
            out += data
        return out

    def req(self, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        self.mid = (self.mid + 1) & 0xFFFF
        msg = HDR.pack(self.mid, cmd, 16 + len(payload), 0, 0) + payload
        if fds:
            socket.send_fds(self.s, [msg], list(fds))
        else:
            self.s.sendall(msg)
        while True:
            mid, c, size, flags, err = HDR.unpack(self._exact(16))
            body = self._exact(size - 16)
            if flags & 0xF == 0 and c in (DMA_READ, DMA_WRITE):
                self._serve_dma(mid, c, body)      # §1.1: interleaved with our reply
                continue
            break
        assert (mid, c, flags & 0xF) == (self.mid, cmd, 1), (mid, c, flags)
        if flags & 0x20:
            raise Failed(err)
        return body

    def _serve_dma(self, mid: int, cmd: int, body: bytes) -> None:
        """§3.9 (spec layout): address u64, count u64, data."""
        addr, count = struct.unpack_from("<QQ", body)
        assert addr + count <= RAM
        if cmd == DMA_WRITE:
            self.mem[addr:addr + count] = body[16:16 + count]
            out = struct.pack("<QQ", addr, count)
        else:
            out = struct.pack("<QQ", addr, count) + bytes(self.mem[addr:addr + count])
        self.s.sendall(HDR.pack(mid, cmd, 16 + len(out), 1, 0) + out)

    def negotiate(self) -> dict:
        caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
                                 "max_dma_maps": 65535,
                                 "migration": {"pgsize": 4096, "max_bitmap_size": 256 << 20}}}
        body = self.req(VERSION, struct.pack("<HH", 0, 0) + json.dumps(caps).encode() + b"\0")
        major, minor = struct.unpack_from("<HH", body)
        assert major == 0 and body[-1] == 0
        return json.loads(body[4:-1])

    # regions (§3.8): offset u64, region u32, count u32, data
    def read(self, region: int, off: int, n: int) -> bytes:
        body = self.req(REGION_READ, struct.pack("<QII", off, region, n))
        assert struct.unpack_from("<QII", body) == (off, region, n)
        return body[16:16 + n]

    def write(self, region: int, off: int, data: bytes) -> None:
        self.req(REGION_WRITE, struct.pack("<QII", off, region, len(data)) + data)

    def r32(self, off: int, region: int = 0) -> int:
        return int.from_bytes(self.read(region, off, 4), "little")

    def r64(self, off: int, region: int = 0) -> int:
        return int.from_bytes(self.read(region, off, 8), "little")

    def w32(self, off: int, v: int, region: int = 0) -> None:
        self.write(region, off, v.to_bytes(4, "little"))

    def w64(self, off: int, v: int, region: int = 0) -> None:
        self.write(region, off, v.to_bytes(8, "little"))

    # v2 (§3.12, §5)
    def feature(self, flags: int, data: bytes = b"", reply_data: int = 0) -> bytes:
        body = self.req(DEVICE_FEATURE, struct.pack("<II", 8 + len(data) + reply_data, flags) + data)
        return body[8:]

    def set_state(self, state: int) -> None:
        self.feature(SET | F_STATE, struct.pack("<II", state, 0xFFFFFFFF))

    def get_state(self) -> int:
        return struct.unpack_from("<I", self.feature(GET | F_STATE, b"", 8))[0]

    def mig_read(self, n: int = 4096) -> bytes:
        body = self.req(MIG_DATA_READ, struct.pack("<II", 8 + n, n))
        argsz, size = struct.unpack_from("<II", body)
        assert argsz == 8 + size and size <= n
        return body[8:8 + size]

    def mig_write(self, data: bytes) -> None:
        self.req(MIG_DATA_WRITE, struct.pack("<II", 8 + len(data), len(data)) + data)

    def close(self) -> None:
        self.s.close()


class RefGuest:
    """Guest RAM and an NVMe driver's queue bookkeeping (the part that must survive)."""

    def __init__(self) -> None:
        # sealed against shrinking, as QEMU's memory-backend-memfd (seal=on) is
        self.fd = os.memfd_create("ref-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, RAM)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mm = mmap.mmap(self.fd, RAM)
        self.sq_tail = {0: 0, 1: 0}
        self.cq_head = {0: 0, 1: 0}
        self.phase = {0: 1, 1: 1}
        self.size = {0: 64, 1: QD}
        self.base = {0: (ASQ, ACQ), 1: (IOSQ, IOCQ)}
        self.cid = 0
        self.c: RefClient | None = None

    def attach(self, path: str) -> RefClient:
        c = RefClient(path, self.mm)
        caps = c.negotiate()["capabilities"]
        assert caps.get("max_data_xfer_size", 1 << 20) >= 4096
        c.req(DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, RAM), (self.fd,))
        self.c = c
        return c

    def command(self, qid: int, dw: list[int], timeout: float = 20.0) -> tuple[int, int]:
        """Submit a 64-byte SQE (16 dwords, CID filled in), ring, wait, ring the CQ head."""
        assert self.c is not None
        self.cid = (self.cid + 1) & 0xFFFF
        dw = list(dw)
        dw[0] = (dw[0] & 0xFFFF) | (self.cid << 16)
        sq, cq = self.base[qid]
        slot = sq + 64 * self.sq_tail[qid]
        self.mm[slot:slot + 64] = struct.pack("<16I", *dw)
        self.sq_tail[qid] = (self.sq_tail[qid] + 1) % self.size[qid]
        self.c.w32(0x1000 + 8 * qid, self.sq_tail[qid])
        deadline = time.monotonic() + timeout
        while True:
            e = cq + 16 * self.cq_head[qid]
            dw0, _, _sqhd, dw3 = struct.unpack_from("<IIII", self.mm, e)
            if (dw3 >> 16) & 1 == self.phase[qid]:
                break
            assert time.monotonic() < deadline, f"no completion on queue {qid}"
            time.sleep(0.001)
        assert dw3 & 0xFFFF == self.cid
        self.cq_head[qid] += 1
        if self.cq_head[qid] == self.size[qid]:
            self.cq_head[qid], self.phase[qid] = 0, self.phase[qid] ^ 1
        self.c.w32(0x1000 + 8 * qid + 4, self.cq_head[qid])
        return (dw3 >> 17) & 0x7FFF, dw0

    def enable(self) -> None:
        assert self.c is not None
        self.c.w32(0x24, (63 << 16) | 63)                  # AQA
        self.c.w64(0x28, ASQ)
        self.c.w64(0x30, ACQ)
        self.c.w32(0x14, (4 << 20) | (6 << 16) | 1)        # CC: IOCQES, IOSQES, EN
        deadline = time.monotonic() + 20
        while self.c.r32(0x1C) & 1 == 0:
            assert time.monotonic() < deadline, "CSTS.RDY"
            time.sleep(0.005)
        assert self.command(0, [0x05, 0, 0, 0, 0, 0, IOCQ, 0, 0, 0, ((QD - 1) << 16) | 1, 1, 0, 0, 0, 0])[0] == 0
        assert self.command(0, [0x01, 0, 0, 0, 0, 0, IOSQ, 0, 0, 0, ((QD - 1) << 16) | 1, (1 << 16) | 1,
                                0, 0, 0, 0])[0] == 0

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        st, _ = self.command(0, [0x06, nsid, 0, 0, 0, 0, IDBUF, 0, 0, 0, cns, 0, 0, 0, 0, 0])
        assert st == 0, st
        return bytes(self.mm[IDBUF:IDBUF + 4096])

    def block_io(self, write: bool, lba: int, nlb: int) -> int:
        return self.command(1, [0x01 if write else 0x02, 1, 0, 0, 0, 0, DATABUF, 0, 0, 0, lba, 0,
                                nlb - 1, 0, 0, 0])[0]


def regs(c: RefClient) -> tuple[int, ...]:
    return (c.r64(0x0), c.r32(0x14), c.r32(0x1C), c.r32(0x24), c.r64(0x28), c.r64(0x30))


def v2_move(g: RefGuest, dst_path: str, while_logging: Callable[[], None]) -> tuple[int, bytes]:
    """§5: source PRE_COPY -> STOP_COPY -> STOP with DMA logging; destination RESUMING ->
    STOP -> RUNNING.  Returns (stream bytes, the final dirty bitmap)."""
    src = g.c
    assert src is not None
    flags = struct.unpack("<Q", src.feature(GET | F_MIGRATION, b"", 8))[0]
    assert flags & 1 and flags & 4, flags                  # STOP_COPY | PRE_COPY
    src.feature(PROBE | SET | F_STATE)
    src.feature(SET | F_LOG_START, struct.pack("<QII", 4096, 1, 0) + struct.pack("<QQ", 0, RAM))
    while_logging()
    src.set_state(PRE_COPY)
    stream = []
    while chunk := src.mig_read():
        stream.append(chunk)
        if len(chunk) < 4096:
            break
    dst = RefClient(dst_path, g.mm)
    dst.negotiate()
    dst.req(DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, RAM), (g.fd,))
    assert dst.get_state() == RUNNING
    dst.set_state(RESUMING)                                # the server walks RUNNING -> STOP -> RESUMING
    assert dst.get_state() == RESUMING
    for chunk in stream:
        dst.mig_write(chunk)
    before = regs(src)
    src.set_state(STOP_COPY)
    rest = []
    while chunk := src.mig_read():
        rest.append(chunk)
    src.set_state(STOP)
    pages = RAM // 4096
    nbytes = (pages + 63) // 64 * 8
    rep = src.feature(GET | F_LOG_REPORT, struct.pack("<QQQ", 0, RAM, 4096), nbytes)
    assert struct.unpack_from("<QQQ", rep) == (0, RAM, 4096)
    bitmap = rep[24:24 + nbytes]
    for chunk in rest:
        dst.mig_write(chunk)
    dst.set_state(STOP)
    dst.set_state(RUNNING)
    src.feature(SET | F_LOG_STOP)
    assert regs(dst) == before
    src.close()
    g.c = dst
    return sum(map(len, stream + rest)), bitmap


def region9(c: RefClient) -> int:
    """§4.1: the migration region is found by its type cap (3/1), asking twice like QEMU."""
    info = c.req(GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 9, 0, 0, 0))
    argsz = struct.unpack_from("<I", info)[0]
    if argsz > 32:
        info = c.req(GET_REGION_INFO, struct.pack("<IIIIQQ", argsz, 0, 9, 0, 0, 0))
    _argsz, flags, index, cap, size, _off = struct.unpack_from("<IIIIQQ", info)
    assert index == 9 and flags & 8 and flags & 3 == 3, flags
    found = False
    while cap:
        cid, _ver, nxt = struct.unpack_from("<HHI", info, cap)
        if cid == 2:
            found = struct.unpack_from("<II", info, cap + 8) == (3, 1)
        cap = nxt
    assert found, "no migration type cap on region 9"
    return size


def v1_set(c: RefClient, mask: int, value: int) -> None:
    """§4.4: QEMU's vfio_migration_set_state: read, (old & mask) | value, write."""
    old = c.r32(0, 9)
    c.w32(0, (old & mask) | value, 9)


def v1_buffer(c: RefClient, out: list[bytes]) -> int:
    off = c.r64(16, 9)                     # data_offset: prepares a chunk
    size = c.r64(24, 9)
    got = b""
    while len(got) < size:
        n = min(size - len(got), 1 << 20)
        got += c.read(9, off + len(got), n)
    if size:
        out.append(got)
    return size


def v1_move(g: RefGuest, dst_path: str) -> int:
    src = g.c
    assert src is not None
    region9(src)
    assert src.r32(0, 9) == V1_RUNNING
    dst = RefClient(dst_path, g.mm)
    dst.negotiate()
    dst.req(DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, RAM), (g.fd,))
    size9 = region9(dst)
    v1_set(dst, 0, V1_RESUMING)            # load_setup: set_state(~all, RESUMING)
    assert dst.r32(0, 9) == V1_RESUMING
    chunks: list[bytes] = []
    v1_set(src, 7, V1_SAVING)              # save_setup: 1 -> 3 (pre-copy)
    assert src.r32(0, 9) == V1_RUNNING | V1_SAVING
    for _ in range(8):                     # save_live_iterate
        if not src.r64(8, 9) and not src.r64(8, 9):
            break
        v1_buffer(src, chunks)
    before = regs(src)
    v1_set(src, ~V1_RUNNING & 0xFFFFFFFF, 0)           # VM stopped: 3 -> 2
    v1_set(src, ~V1_RUNNING & 0xFFFFFFFF, V1_SAVING)   # save_live_complete_precopy
    pending = src.r64(8, 9)
    while pending:
        if not v1_buffer(src, chunks):
            break
        pending = src.r64(8, 9)
    v1_set(src, ~V1_SAVING & 0xFFFFFFFF, 0)            # -> 0 stopped
    assert src.r32(0, 9) == 0
    for chunk in chunks:                   # vfio_load_buffer: offset, data, commit data_size
        pos = 0
        while pos < len(chunk):
            off = dst.r64(16, 9)
            n = min(len(chunk) - pos, size9 - off, 1 << 20)
            dst.write(9, off, chunk[pos:pos + n])
            dst.w64(24, n, 9)
            pos += n
    v1_set(dst, 0, V1_RUNNING)             # VM started: set_state(~all, RUNNING)
    assert dst.r32(0, 9) == V1_RUNNING
    assert regs(dst) == before
    src.close()
    g.c = dst
    return sum(map(len, chunks))


def test_reference_client_migrates_by_v2_then_v1() -> None:
    daemons, img = start_hosts(2)
    a, b = daemons
    g = RefGuest()
    try:
        g.attach(a.socket)
        g.enable()
        ident = g.identify(1)
        ns = g.identify(0, 1)
        lbads = ns[128 + 4 * (ns[26] & 0xF) + 2]
        nlb = 4096 >> lbads
        pattern = os.urandom(4096)
        g.mm[DATABUF:DATABUF + 4096] = pattern
        assert g.block_io(True, 8, nlb) == 0

        def read_back() -> None:              # the device writes DATABUF and a CQE in IOCQ
            g.mm[DATABUF:DATABUF + 4096] = bytes(4096)
            assert g.block_io(False, 8, nlb) == 0

        moved, bitmap = v2_move(g, b.socket, read_back)
        assert moved > 0
        # every page the device wrote while logging, and nothing else (§5.5 bit order)
        bits = int.from_bytes(bitmap, "little")
        assert {i for i in range(RAM // 4096) if bits >> i & 1} == {DATABUF >> 12, IOCQ >> 12}
        # the same queues on the destination: the block reads back, admin works
        assert g.block_io(False, 8, nlb) == 0 and bytes(g.mm[DATABUF:DATABUF + 4096]) == pattern
        assert g.identify(1)[:4096] == ident

        g.mm[DATABUF:DATABUF + 4096] = pattern[::-1]
        assert g.block_io(True, 16, nlb) == 0
        assert v1_move(g, a.socket) > 0
        g.mm[DATABUF:DATABUF + 4096] = bytes(4096)
        assert g.block_io(False, 16, nlb) == 0 and bytes(g.mm[DATABUF:DATABUF + 4096]) == pattern[::-1]
        assert g.block_io(False, 8, nlb) == 0 and bytes(g.mm[DATABUF:DATABUF + 4096]) == pattern
        assert g.identify(1) == ident
    finally:
        if g.c is not None:
            g.c.close()
        rcs = stop_hosts(daemons, img)
        g.mm.close()
        os.close(g.fd)
    assert rcs == [0, 0], [d.log()[-2000:] for d in daemons]
