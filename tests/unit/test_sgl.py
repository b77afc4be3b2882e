import struct

import pytest

from nvme.errors import CommandError
from nvme.memory import FlatMemory
from nvme.sgl import map_sgl
from nvme.status import Status

pytestmark = pytest.mark.timeout(20)

BASE = 0x200000


def setup():
    mem = FlatMemory()
    ram = bytearray(1 << 20)
    mem.add(BASE, ram)
    rom = bytearray(4096)
    mem.add(0x10000, rom, writable=False)
    return mem, ram, rom


def desc(addr, length, typ, sub=0):
    return struct.pack("<QI3xB", addr, length, (typ << 4) | sub)


def put(buf, off, *descs):
    b = b"".join(descs)
    buf[off:off + len(b)] = b


def test_single_data_block():
    mem, ram, _ = setup()
    ram[0:4] = b"abcd"
    vs = map_sgl(mem, BASE, 512, 0x00, 512, to_guest=False)
    assert len(vs) == 1 and bytes(vs[0][:4]) == b"abcd" and vs[0].readonly


def test_data_block_length_mismatch():
    mem, _, _ = setup()
    for n in (256, 1024):
        with pytest.raises(CommandError) as e:
            map_sgl(mem, BASE, n, 0x00, 512, True)
        assert e.value.status == Status.DATA_SGL_LENGTH_INVALID


def test_last_segment_in_readonly_memory():
    mem, ram, rom = setup()
    put(rom, 0, desc(BASE + 0x1000, 100, 0), desc(BASE + 0x3003, 412, 0))
    vs = map_sgl(mem, 0x10000, 32, 0x30, 512, to_guest=True)
    assert [len(v) for v in vs] == [100, 412]
    assert not vs[0].readonly


def test_segment_chain():
    mem, ram, _ = setup()
    # segment 1 at +0x8000: data, then Last Segment -> +0x9000
    put(ram, 0x8000, desc(BASE + 0x1000, 200, 0), desc(BASE + 0x9000, 32, 3))
    put(ram, 0x9000, desc(BASE + 0x2000, 100, 0), desc(BASE + 0x3000, 212, 0))
    vs = map_sgl(mem, BASE + 0x8000, 32, 0x20, 512, True)
    assert [len(v) for v in vs] == [200, 100, 212]


def test_segment_descriptor_not_last():
    mem, ram, _ = setup()
    put(ram, 0x8000, desc(BASE + 0x9000, 16, 3), desc(BASE + 0x1000, 512, 0))
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 32, 0x20, 512, True)
    assert e.value.status == Status.INVALID_SGL_SEGMENT_DESCRIPTOR


def test_segment_inside_last_segment_and_bad_length():
    mem, ram, _ = setup()
    put(ram, 0x8000, desc(BASE + 0x1000, 256, 0), desc(BASE + 0x9000, 16, 3))
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 32, 0x30, 512, True)
    assert e.value.status == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 24, 0x30, 512, True)
    assert e.value.status == Status.INVALID_SGL_SEGMENT_DESCRIPTOR


def test_bad_types():
    mem, ram, _ = setup()
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE, 512, 0x40, 512, True)     # keyed data block
    assert e.value.status == Status.SGL_DESCRIPTOR_TYPE_INVALID
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE, 512, 0x01, 512, True)     # data block, offset subtype
    assert e.value.status == Status.SGL_DESCRIPTOR_TYPE_INVALID
    put(ram, 0x8000, desc(BASE, 512, 5))
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 16, 0x30, 512, True)
    assert e.value.status == Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_bit_bucket_read_only_for_reads():
    mem, ram, _ = setup()
    put(ram, 0x8000, desc(BASE + 0x1000, 256, 0), desc(0, 256, 1))
    vs = map_sgl(mem, BASE + 0x8000, 32, 0x30, 512, True)
    assert [len(v) for v in vs] == [256, 256]
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 32, 0x30, 512, False)
    assert e.value.status == Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_segment_loop_is_bounded():
    mem, ram, _ = setup()
    put(ram, 0x8000, desc(BASE + 0x1000, 0, 0), desc(BASE + 0x8000, 32, 2))
    with pytest.raises(CommandError) as e:
        map_sgl(mem, BASE + 0x8000, 32, 0x20, 512, True)
    assert e.value.status == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS


def test_unmapped_segment_and_data():
    mem, ram, _ = setup()
    with pytest.raises(CommandError) as e:
        map_sgl(mem, 0x900000, 32, 0x30, 512, True)
    assert e.value.status == Status.DATA_TRANSFER_ERROR
    with pytest.raises(CommandError) as e:
        map_sgl(mem, (1 << 64) - 256, 512, 0x00, 512, False)
    assert e.value.status == Status.DATA_TRANSFER_ERROR
