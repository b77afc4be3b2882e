"""Message-write windows (nvme/msgwindow.py): which views are refused, and why.

Read payloads bound for a window must leave the data path as NeedsMessageDma (the
front-end then writes them with DMA_WRITE); reads of guest memory in the window,
writes outside it, and faults the memory itself would raise stay as they were.
"""
from __future__ import annotations

import os

import pytest

from backends.base import create_backend
from nvme.io import IoExecutor, IoOpcode
from nvme.memory import DmaFault, FlatMemory, NeedsMessageDma
from nvme.msgwindow import LOW_MEMORY, MessageWriteWindows, normalize, overlaps
from nvme.namespace import Namespace
from reactor.slowpath import MessageDmaMemory
from tests.unit.test_io_cmds import sqe

pytestmark = pytest.mark.timeout(20)

MB = 1 << 20
P = 4096


@pytest.fixture
def mem():
    m = FlatMemory()
    low = bytearray(MB - 0x10000)       # [0, 0xf0000): writable RAM below 1 MiB
    m.add(0, low)
    m.add(0xF0000, bytearray(0x10000), writable=False)   # shadowed BIOS: read-only
    high = bytearray(4 * MB)
    m.add(MB, high)
    m.add(0x4000_0000, None, size=P)     # fd-less
    return m, low, high


def test_writes_in_the_window_are_refused_reads_are_not(mem):
    m, low, _ = mem
    w = MessageWriteWindows(m)
    assert w.windows == LOW_MEMORY
    with pytest.raises(NeedsMessageDma, match="message-write window"):
        w.view(0x7C00, 512, write=True)
    low[0x7C00:0x7E00] = b"\x55" * 512
    assert bytes(w.view(0x7C00, 512)) == b"\x55" * 512          # reading low memory: the mapping
    assert len(w.view(MB, P, write=True)) == P                    # writing above 1 MiB: the mapping
    with pytest.raises(NeedsMessageDma):                          # straddling the end of a window
        MessageWriteWindows(m, [(0, MB + P)]).view(MB, 2 * P, write=True)
    assert len(w.view(0x7C00, 0, write=True)) == 0                # an empty view writes nothing


def test_memory_faults_win_over_the_window(mem):
    m, *_ = mem
    w = MessageWriteWindows(m)
    with pytest.raises(DmaFault, match="read-only") as e:         # shadowed BIOS stays read-only
        w.view(0xF0000, P, write=True)
    assert not isinstance(e.value, NeedsMessageDma)
    w2 = MessageWriteWindows(m, [(0, MB), (0x3000_0000, 0x3000_1000)])
    with pytest.raises(DmaFault, match="not mapped|outside") as e:  # unmapped inside a window
        w2.view(0x3000_0000, P, write=True)
    assert not isinstance(e.value, NeedsMessageDma)


def test_no_windows_is_the_memory_itself(mem):
    m, *_ = mem
    w = MessageWriteWindows(m, [])
    assert w.view == m.view                  # the bound method itself: no wrapper on the hot path
    assert len(w.view(0x7C00, 512, write=True)) == 512


def test_normalize_and_overlaps():
    assert normalize([(0x100000, 0x200000), (0, 0xA0000)]) == ((0, 0xA0000), (0x100000, 0x200000))
    assert normalize([(0, 10), (10, 20)]) == ((0, 10), (10, 20))          # touching is fine
    for bad in ([(5, 5)], [(10, 5)], [(-1, 4)], [(0, 1 << 64)], [(0, 10), (9, 20)],
                [(i * 2, i * 2 + 1) for i in range(17)]):
        with pytest.raises(ValueError):
            normalize(bad)
    ws = ((0, 0xA0000), (0x100000, 0x200000))
    assert overlaps(ws, 0x9F000, 0x2000) and overlaps(ws, 0x1FFFFF, 1)
    assert not overlaps(ws, 0xA0000, 0x60000) and not overlaps(ws, 0x200000, P)
    assert not overlaps(ws, 0x1000, 0)


@pytest.fixture
def executor(mem):
    m, low, high = mem
    b = create_backend("ram", "1M", name_prefix=f"vnvmedmw{os.getpid()}")
    ns = Namespace.for_backend(1, b)
    yield {1: ns}, m, low, high
    b.destroy()


def test_executor_parks_a_read_into_the_window_and_the_slow_path_completes_it(executor):
    nss, m, low, high = executor
    ex = IoExecutor(nss, MessageWriteWindows(m), mdts_bytes=32 * P)
    payload = os.urandom(2 * P)
    high[0:2 * P] = payload
    # A write whose payload sits in the window reads it through the mapping: no parking.
    low[0x8000:0x8000 + 2 * P] = payload
    assert ex.execute(sqe(IoOpcode.WRITE, slba=0, nlb=16, prp1=0x8000, prp2=0x9000)) == (0, 0)
    # A read into 0x7000 (two pages, like an MBR loading a boot sector) must park...
    with pytest.raises(NeedsMessageDma):
        ex.execute(sqe(IoOpcode.READ, slba=0, nlb=16, prp1=0x7000, prp2=0x8000))
    # ...and the same executor on the slow path's memory writes into scratch buffers,
    # which the front-end then sends with DMA_WRITE; guest memory is untouched until then.
    low[0x7000:0x9000] = bytes(2 * P)
    sm = MessageDmaMemory(MessageWriteWindows(m))
    slow = IoExecutor(nss, sm, mdts_bytes=32 * P)
    assert slow.execute(sqe(IoOpcode.READ, slba=0, nlb=16, prp1=0x7000, prp2=0x8000)) == (0, 0)
    assert bytes(low[0x7000:0x9000]) == bytes(2 * P)
    got = b"".join(bytes(buf) for addr, buf in sorted(sm.writeback))
    assert [a for a, _ in sorted(sm.writeback)][0] == 0x7000 and got == payload
    # A read above 1 MiB is not affected.
    assert ex.execute(sqe(IoOpcode.READ, slba=0, nlb=16, prp1=MB + 0x10000, prp2=MB + 0x11000)) == (0, 0)
    assert bytes(high[0x10000:0x10000 + 2 * P]) == payload
