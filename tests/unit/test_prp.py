import struct

import pytest

from nvme.errors import CommandError
from nvme.memory import FlatMemory, NeedsMessageDma
from nvme.prp import map_dptr, map_prp, prp_pages
from nvme.status import Status

pytestmark = pytest.mark.timeout(20)

P = 4096


def make_mem():
    mem = FlatMemory()
    ram = bytearray(64 * P)
    mem.add(0x100000, ram)                      # RW RAM
    rom = bytearray(4 * P)
    mem.add(0x10000, rom, writable=False)       # RO region (e.g. firmware)
    return mem, ram, rom


def put_list(buf, off, entries):
    for i, e in enumerate(entries):
        struct.pack_into("<Q", buf, off + 8 * i, e)


def joined(views):
    return b"".join(bytes(v) for v in views)


def test_prp1_only_with_offset():
    mem, ram, _ = make_mem()
    ram[0x10:0x10 + 100] = bytes(range(100))
    vs = map_prp(mem, 0x100010, 0, 100, to_guest=True)
    assert joined(vs) == bytes(range(100))
    assert all(not v.readonly for v in vs)


def test_prp1_plus_prp2_data():
    mem, ram, _ = make_mem()
    assert prp_pages(mem, 0x100800, 0x105000, 4096) == [(0x100800, 2048), (0x105000, 2048)]
    # contiguous pages coalesce into one run
    assert prp_pages(mem, 0x100800, 0x101000, 4096) == [(0x100800, 4096)]


def test_prp2_data_with_offset_refused():
    mem, _, _ = make_mem()
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100000, 0x105010, 8192, True)
    assert e.value.status == Status.INVALID_PRP_OFFSET


def test_prp1_not_dword_aligned():
    mem, _, _ = make_mem()
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100002, 0, 16, True)
    assert e.value.status == Status.INVALID_PRP_OFFSET


def test_prp_list():
    mem, ram, _ = make_mem()
    pages = [0x110000, 0x108000, 0x120000]
    put_list(ram, 0x1000, pages)                 # list at 0x101000
    for i, p in enumerate([0x100000] + pages):
        ram[p - 0x100000:p - 0x100000 + P] = bytes([i + 1]) * P
    vs = map_prp(mem, 0x100000, 0x101000, 4 * P, to_guest=False)
    data = joined(vs)
    assert [data[i * P] for i in range(4)] == [1, 2, 3, 4]
    assert all(v.readonly for v in vs)


def test_prp_list_in_readonly_region_works():
    mem, ram, rom = make_mem()
    put_list(rom, 0x100, [0x101000, 0x102000])   # list at 0x10100 (offset in page)
    vs = map_prp(mem, 0x100000, 0x10100, 3 * P, to_guest=True)
    assert sum(len(v) for v in vs) == 3 * P
    assert all(not v.readonly for v in vs)


def test_data_in_readonly_region_refused_for_read():
    mem, _, _ = make_mem()
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x10000, 0, 512, to_guest=True)
    assert e.value.status == Status.DATA_TRANSFER_ERROR
    # but fine for a write (device reads guest memory)
    assert len(map_prp(mem, 0x10000, 0, 512, to_guest=False)[0]) == 512


def test_chained_lists_across_pages():
    mem, ram, _ = make_mem()
    # first list starts 16 bytes before the end of its page: 1 data entry + chain ptr
    first_list = 0x101000 + P - 16
    data_pages = [0x110000 + i * 2 * P for i in range(5)]   # non contiguous
    put_list(ram, first_list - 0x100000, [data_pages[0], 0x102000])
    put_list(ram, 0x2000, data_pages[1:])
    for i, p in enumerate(data_pages):
        ram[p - 0x100000] = 0x40 + i
    length = 512 + 5 * P
    runs = prp_pages(mem, 0x100000 + P - 512, first_list, length)
    assert [a for a, _ in runs] == [0x100000 + P - 512] + data_pages
    assert sum(n for _, n in runs) == length
    vs = map_prp(mem, 0x100000 + P - 512, first_list, length, False)
    assert sum(len(v) for v in vs) == length


def test_full_list_page_chains_exactly_when_more_remain():
    mem, ram, _ = make_mem()
    n = P // 8                      # 512 slots: with 512 pages after PRP1 -> 511 + chain
    ents = [0x100000 + ((i % 40) + 8) * P for i in range(n)]
    # exactly 512 entries fit without chaining
    put_list(ram, 0x1000, ents)
    runs = prp_pages(mem, 0x100000, 0x101000, P + n * P)
    assert sum(x for _, x in runs) == P + n * P
    # one more page: last slot becomes a chain pointer
    put_list(ram, 0x1000, ents[:n - 1] + [0x102000])
    put_list(ram, 0x2000, [0x100000 + 9 * P, 0x100000 + 10 * P])
    runs = prp_pages(mem, 0x100000, 0x101000, P + (n + 1) * P)
    assert runs[-1] == (0x100000 + 9 * P, 2 * P)


def test_misaligned_list_entry():
    mem, ram, _ = make_mem()
    put_list(ram, 0x1000, [0x102000, 0x103008])
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100000, 0x101000, 3 * P, True)
    assert e.value.status == Status.INVALID_PRP_OFFSET


def test_misaligned_chain_pointer_and_list_pointer():
    mem, ram, _ = make_mem()
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100000, 0x101004, 3 * P, True)
    assert e.value.status == Status.INVALID_PRP_OFFSET
    put_list(ram, 0x1000 + P - 16, [0x104000, 0x102100])
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100000, 0x101000 + P - 16, 4 * P, True)
    assert e.value.status == Status.INVALID_PRP_OFFSET


def test_out_of_mapping():
    mem, ram, _ = make_mem()
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x900000, 0, 512, True)
    assert e.value.status == Status.DATA_TRANSFER_ERROR
    with pytest.raises(CommandError) as e:       # list itself unmapped
        map_prp(mem, 0x100000, 0x900000, 3 * P, True)
    assert e.value.status == Status.DATA_TRANSFER_ERROR
    put_list(ram, 0x1000, [0x102000, (1 << 64) - P])   # entry near 2^64: no wrap
    with pytest.raises(CommandError) as e:
        map_prp(mem, 0x100000, 0x101000, 3 * P, True)
    assert e.value.status == Status.DATA_TRANSFER_ERROR


def test_run_straddling_two_adjacent_regions_is_split():
    mem = FlatMemory()
    a, b = bytearray(P), bytearray(P)
    mem.add(0x0, a)
    mem.add(P, b)
    vs = map_prp(mem, 0x0, P, 2 * P, True)
    assert [len(v) for v in vs] == [P, P]


def test_needs_message_dma_propagates():
    mem, _, _ = make_mem()
    mem.add(0x800000, None, size=P)
    with pytest.raises(NeedsMessageDma):
        map_prp(mem, 0x800000, 0, 512, True)


def test_map_dptr_dispatch():
    mem, ram, _ = make_mem()
    sqe = bytearray(64)
    dw = memoryview(sqe).cast("I")
    dw[6] = 0x100000
    assert sum(len(v) for v in map_dptr(mem, dw, 512, True)) == 512
    dw[0] = 3 << 14
    with pytest.raises(CommandError) as e:
        map_dptr(mem, dw, 512, True)
    assert e.value.status == Status.INVALID_FIELD
    dw[0] = 1 << 14                 # SGL data block
    dw[8] = 512
    dw[9] = 0
    assert sum(len(v) for v in map_dptr(mem, dw, 512, True)) == 512
