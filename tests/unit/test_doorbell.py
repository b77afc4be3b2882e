import mmap

import pytest

from nvme.doorbell import Doorbells, ShadowDoorbellView
from nvme.memory import DmaFault, FlatMemory
from nvme.state import ShadowDoorbells

pytestmark = pytest.mark.timeout(20)


def test_layout_dstrd0_over_shared_mapping():
    mm = mmap.mmap(-1, 4096)
    try:
        area = memoryview(mm)
        db = Doorbells(area)
        assert db.nqueues == 512
        mm[8 * 3:8 * 3 + 4] = (0x11).to_bytes(4, "little")      # SQ3 tail
        mm[8 * 3 + 4:8 * 3 + 8] = (0x22).to_bytes(4, "little")  # CQ3 head
        assert db.sq_tail(3) == 0x11 and db.cq_head(3) == 0x22
        db.set_sq_tail(0, 5)
        assert mm[0:4] == (5).to_bytes(4, "little")
        db.zero(3)
        assert db.sq_tail(3) == 0 and db.cq_head(3) == 0
        assert Doorbells.decode(0x1000 + 8 * 7 + 4) == (7, True)
        assert Doorbells.decode(0x1000 + 8 * 2) == (2, False)
        del db, area
    finally:
        mm.close()


def test_shadow_view_reads_and_eventidx_store():
    mem = FlatMemory()
    ram = bytearray(3 * 4096)
    mem.add(0x1000, ram)
    sh = ShadowDoorbellView(mem, ShadowDoorbells(dbbuf=0x1000, eventidx=0x2000))
    ram[16:20] = (9).to_bytes(4, "little")        # SQ2 shadow tail
    ram[8 + 4:8 + 8] = (3).to_bytes(4, "little")  # CQ1 shadow head
    assert sh.sq_tail(2) == 9 and sh.cq_head(1) == 3
    sh.set_sq_eventidx(2, 9)
    sh.set_cq_eventidx(1, 0xFFFFFFFF)
    assert ram[4096 + 16:4096 + 20] == (9).to_bytes(4, "little")
    assert ram[4096 + 12:4096 + 16] == b"\xff" * 4


def test_shadow_unmapped_or_readonly_eventidx_refused():
    mem = FlatMemory()
    mem.add(0x1000, bytearray(4096))
    mem.add(0x2000, bytearray(4096), writable=False)
    with pytest.raises(DmaFault):
        ShadowDoorbellView(mem, ShadowDoorbells(dbbuf=0x1000, eventidx=0x9000))
    with pytest.raises(DmaFault):
        ShadowDoorbellView(mem, ShadowDoorbells(dbbuf=0x1000, eventidx=0x2000))
