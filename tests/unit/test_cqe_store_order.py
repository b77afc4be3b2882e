"""The CQE store order on the real data path: DW0..DW2 first, DW3 (CID, status, phase)
last and in one store (DESIGN §4).  The host polls DW3's phase bit; an entry whose DW3
lands before its DW0..DW2 shows the host a completion with a stale result.

QueueRunner's hot loop posts CQEs inline (no call per completion), so nothing but a
recording of its stores can catch a reordering there: the CQ ring handed to the
runner here is a recorder that logs every word store, on top of real memory.
"""
from __future__ import annotations

import mmap

from nvme.doorbell import Doorbells
from nvme.memory import FlatMemory
from nvme.qpair import QueueRunner
from nvme.state import CqState, SqState
from nvme.status import Status

P = 4096
RAM = 0x100000
SQ, CQ = RAM, RAM + P


class RecordingWords:
    """A stand-in for a memoryview cast 'I': loads and stores go to `real`, stores logged."""

    def __init__(self, real: memoryview) -> None:
        self.real = real
        self.log: list[tuple[int, int]] = []
        self.format = "I"

    def cast(self, fmt: str) -> "RecordingWords":
        assert fmt == "I"
        return self

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, i):
        return self.real[i]

    def __setitem__(self, i: int, v: int) -> None:
        self.log.append((i, v))
        self.real[i] = v


class RecordingMemory(FlatMemory):
    def __init__(self) -> None:
        super().__init__()
        self.cq: RecordingWords | None = None

    def view(self, addr: int, length: int, write: bool = False):  # type: ignore[override]
        v = super().view(addr, length, write)
        if addr == CQ and write:
            self.cq = RecordingWords(v.cast("I"))
            return self.cq
        return v


def _check_order(log: list[tuple[int, int]], entries: int) -> list[int]:
    """Every CQE written as DW0, DW1, DW2 then DW3 exactly once; returns the DW3 values."""
    dw3s = []
    per_entry: dict[int, list[int]] = {}
    for i, v in log:
        words = per_entry.setdefault(i >> 2, [])
        assert (i & 3) not in words, f"word {i & 3} of entry {i >> 2} stored twice"
        words.append(i & 3)
        if i & 3 == 3:
            assert sorted(words) == [0, 1, 2, 3] and words[-1] == 3, \
                f"entry {i >> 2}: DW3 stored before DW{sorted(set(range(4)) - set(words))}"
            dw3s.append(v)
            del per_entry[i >> 2]          # the slot may be written again after a wrap
    assert not per_entry, f"entries left without DW3: {per_entry}"
    assert len(dw3s) == entries
    return dw3s


def test_inline_and_parked_completions_store_dw3_last():
    mm = mmap.mmap(-1, P)
    ram = bytearray(4 * P)
    mem = RecordingMemory()
    mem.add(RAM, ram)
    parked = {7}

    def execute(sqe, sqid):
        cid = sqe[0] >> 16
        if cid in parked:
            return None
        return (Status.INVALID_FIELD if cid == 2 else 0, 0xABCD0000 | cid)

    r = QueueRunner(doorbells=Doorbells(memoryview(mm)), mem=mem, execute=execute,
                    irq=lambda v: None, doorbell_error=lambda i, q: None)
    r.add_cq(CqState(cqid=1, base=CQ, size=4, iv=0, ien=False))
    r.add_sq(SqState(sqid=1, cqid=1, base=SQ, size=8))
    sqw = memoryview(ram).cast("I")
    for slot, cid in enumerate((1, 2, 7)):
        sqw[slot * 16] = 0x02 | (cid << 16)
    Doorbells(memoryview(mm)).set_sq_tail(1, 3)
    assert r.poll() == 2                       # 1 and 2 posted inline, 7 parked
    r.complete(1, 7, 0, 0x1234)                # the parked one through the posting helper
    for cid in (3, 4):                         # wrap the 4-entry CQ: phase flips to 0
        sqw[(cid) * 16] = 0x02 | (cid << 16)
    Doorbells(memoryview(mm)).set_cq_head(1, 3)
    Doorbells(memoryview(mm)).set_sq_tail(1, 5)
    assert r.poll() == 2
    assert mem.cq is not None
    dw3s = _check_order(mem.cq.log, 5)
    assert [d & 0xFFFF for d in dw3s] == [1, 2, 7, 3, 4]
    assert [(d >> 16) & 1 for d in dw3s] == [1, 1, 1, 1, 0]     # slot 0 again: phase 0
    assert (dw3s[1] >> 17) & 0x7FF == Status.INVALID_FIELD
