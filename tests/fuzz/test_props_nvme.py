"""Property tests of the NVMe data-path helpers (PRP and SGL walkers, ring checks, queue
table records) and of the guarded command paths the atheris targets use (issue 12)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given, strategies as st

from fuzz.guarded import guarded_memory
from fuzz.targets import NvmeAdminTarget, NvmeIoTarget
from nvme.errors import CommandError
from nvme.memory import DmaFault, FlatMemory, NeedsMessageDma
from nvme.prp import list_is_contiguous, map_prp, prp_pages
from nvme.qtable import QueueTable
from nvme.ring import cq_head_ok, fetch_budget, free_slots
from nvme.sgl import map_sgl
from nvme.state import CqState, SqState

P = 4096
BASE = 0x100000
NPAGES = 96


def _mem() -> tuple[FlatMemory, memoryview, list]:
    mem, regions = guarded_memory([(BASE, NPAGES * P, True)])
    return mem, regions[0].data, regions


@st.composite
def prp_transfer(draw):
    """A well-formed PRP transfer: data pages anywhere in pages 0..63, lists in 64..95."""
    first_off = draw(st.integers(0, P // 4 - 1)) * 4
    length = draw(st.integers(1, 40 * P))
    first = min(length, P - first_off)
    rest = length - first
    npages = (rest + P - 1) // P
    data_pages = draw(st.lists(st.integers(1, 63), min_size=npages, max_size=npages))
    if draw(st.booleans()) and npages:
        start = draw(st.integers(1, max(1, 63 - npages)))
        data_pages = list(range(start, start + npages))          # contiguous (fast path)
    list_off = draw(st.integers(0, P // 8 - 1)) * 8
    return first_off, length, data_pages, list_off


def _layout(buf: memoryview, first_off: int, length: int, pages: list[int], list_off: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Write the PRP list(s); return prp1, prp2 and the expected (addr, len) pieces."""
    prp1 = BASE + first_off
    first = min(length, P - first_off)
    pieces = [(prp1, first)]
    rest = length - first
    addrs = [BASE + p * P for p in pages]
    for a in addrs:
        n = min(P, rest)
        pieces.append((a, n))
        rest -= n
    if len(addrs) == 0:
        return prp1, 0, pieces
    if len(addrs) == 1:
        return prp1, addrs[0], pieces
    # lists in pages 64.., the first one starting list_off into its page, chained
    lpage, off, ents = 64, list_off, list(addrs)
    prp2 = BASE + lpage * P + off
    while ents:
        slots = (P - off) // 8
        if len(ents) <= slots:
            chunk, nxt = ents, None
        else:
            chunk, nxt = ents[:slots - 1], BASE + (lpage + 1) * P
        words = chunk + ([nxt] if nxt is not None else [])
        o = lpage * P + off
        buf[o:o + 8 * len(words)] = struct.pack(f"<{len(words)}Q", *words)
        ents = ents[len(chunk):]
        lpage, off = lpage + 1, 0
    return prp1, prp2, pieces


def _coalesce(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, n in pieces:
        if out and out[-1][0] + out[-1][1] == a:
            out[-1][1] += n
        else:
            out.append([a, n])
    return [(a, n) for a, n in out]


@given(prp_transfer())
def test_prp_walk_matches_the_model(t) -> None:
    first_off, length, pages, list_off = t
    mem, buf, regions = _mem()
    prp1, prp2, pieces = _layout(buf, first_off, length, pages, list_off)
    assert prp_pages(mem, prp1, prp2, length) == _coalesce(pieces)
    views = map_prp(mem, prp1, prp2, length, to_guest=True)
    assert sum(len(v) for v in views) == length
    for v in views:
        v.release()


@given(st.integers(1, 30), st.integers(0, 60), st.integers(0, P // 8 - 1))
def test_contiguous_list_check_agrees_with_the_walker(npages, start, slot) -> None:
    mem, buf, _ = _mem()
    assume(slot + npages <= P // 8)
    first = BASE + (start + 1) * P
    ents = [first + i * P for i in range(npages)]
    o = 64 * P + slot * 8
    buf[o:o + 8 * npages] = struct.pack(f"<{npages}Q", *ents)
    prp2 = BASE + o
    assert list_is_contiguous(mem, prp2, first, npages)
    if npages > 1:
        buf[o + 8:o + 16] = struct.pack("<Q", first + 7 * P + 3 * P)
        assert not list_is_contiguous(mem, prp2, first, npages) or ents[1] == first + 10 * P


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(1, 64 * P),
       st.binary(min_size=0, max_size=2 * P))
def test_prp_garbage_is_a_status_never_an_exception(prp1, prp2, length, listbytes) -> None:
    mem, buf, _ = _mem()
    buf[64 * P:64 * P + len(listbytes)] = listbytes
    for p2 in (prp2, BASE + 64 * P + (prp2 % P & ~7), prp2 & ~(P - 1)):
        try:
            views = map_prp(mem, prp1, p2, length, to_guest=bool(length & 1))
        except CommandError:
            continue
        assert sum(len(v) for v in views) == length
        for v in views:
            v.release()


SGL_DATA, SGL_SEG, SGL_LAST = 0x00, 0x20, 0x30


def _desc(addr: int, n: int, t: int) -> bytes:
    return struct.pack("<QI3xB", addr, n, t)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, P - 1), st.integers(1, 3 * P)),
                min_size=1, max_size=12), st.integers(1, 5))
def test_sgl_walk_returns_exactly_the_described_bytes(chunks, per) -> None:
    mem, buf, _ = _mem()
    data = [(BASE + pg * P + off, n) for pg, off, n in chunks]
    assume(all(a + n <= BASE + 64 * P for a, n in data))
    length = sum(n for _, n in data)
    if len(data) == 1:
        views = map_sgl(mem, data[0][0], data[0][1], SGL_DATA, length, True)
    else:
        groups = [data[i:i + per] for i in range(0, len(data), per)]
        sizes = [16 * (len(g) + (1 if i + 1 < len(groups) else 0)) for i, g in enumerate(groups)]
        addrs = [BASE + (64 + i) * P for i in range(len(groups))]
        for i, g in enumerate(groups):
            body = b"".join(_desc(a, n, SGL_DATA) for a, n in g)
            if i + 1 < len(groups):
                body += _desc(addrs[i + 1], sizes[i + 1], SGL_LAST if i + 2 == len(groups) else SGL_SEG)
            buf[(64 + i) * P:(64 + i) * P + len(body)] = body
        kind = SGL_LAST if len(groups) == 1 else SGL_SEG
        views = map_sgl(mem, addrs[0], sizes[0], kind, length, True)
    assert [len(v) for v in views] == [n for _, n in data]
    for v, (a, n) in zip(views, data):
        v[:1] = b"\x5a"
        assert buf[a - BASE] == 0x5A
        v.release()


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
       st.integers(1, 64 * P), st.binary(max_size=P))
def test_sgl_garbage_is_a_status_never_an_exception(addr, dlen, tb, length, seg) -> None:
    mem, buf, _ = _mem()
    buf[64 * P:64 * P + len(seg)] = seg
    for a in (addr, BASE + 64 * P):
        try:
            views = map_sgl(mem, a, dlen, tb, length, bool(tb & 1))
        except CommandError:
            continue
        assert sum(len(v) for v in views) == length


@given(st.integers(2, 70000), st.data())
def test_ring_head_check_and_budget(size, data) -> None:
    head = data.draw(st.integers(0, size - 1))
    tail = data.draw(st.integers(0, size - 1))
    new = data.draw(st.integers(-2, size + 2))
    ok = cq_head_ok(head, tail, size, new)
    # valid iff new lies on the way from head to tail (inclusive), inside the ring
    walk = {(head + i) % size for i in range((tail - head) % size + 1)}
    assert ok == (0 <= new < size and new in walk)
    assert 0 <= free_slots(head, tail, size) <= size - 1
    sq = SqState(1, 1, 0, size, head=head, tail=tail)
    cq = CqState(1, 0, size, 0, True, tail=tail, head=head)
    inflight = data.draw(st.integers(0, size))
    b = fetch_budget(sq, cq, inflight)
    assert 0 <= b <= (tail - head) % size
    assert b + inflight <= max(free_slots(head, tail, size), inflight)


@given(st.integers(0, 63), st.integers(0, 63), st.integers(2, 65536), st.integers(0, 2**64 - 1),
       st.integers(0, 65535), st.integers(0, 65535), st.booleans(), st.integers(0, 2047), st.booleans())
def test_queue_table_records_roundtrip(sqid, cqid, size, base, head, tail, broken, iv, ien) -> None:
    t = QueueTable.private(64)
    sq = SqState(sqid, cqid, base, size, head=head % size, tail=tail % size, broken=broken)
    cq = CqState(cqid, base, size, iv, ien, tail=tail % size, phase=head & 1, head=head % size, broken=broken)
    t.put_sq(sq)
    t.put_cq(cq)
    assert t.get_sq(sqid) == sq
    assert t.get_cq(cqid) == cq


_IO = None
_ADMIN = None


@given(st.binary(min_size=66, max_size=1200))
def test_io_command_path_over_guarded_memory(data) -> None:
    global _IO
    _IO = _IO or NvmeIoTarget()
    _IO.one(data)


@given(st.binary(min_size=66, max_size=1200))
def test_admin_command_path_over_guarded_memory(data) -> None:
    global _ADMIN
    _ADMIN = _ADMIN or NvmeAdminTarget()
    _ADMIN.one(data)


def test_guarded_memory_refuses_views_outside() -> None:
    mem, buf, _ = _mem()
    with pytest.raises(DmaFault):
        mem.view(BASE + NPAGES * P - 8, 16)
    with pytest.raises(DmaFault):
        mem.view(BASE - 1, 2)
    mem.add(1 << 40, None, size=P)
    with pytest.raises(NeedsMessageDma):
        mem.view(1 << 40, 8)
