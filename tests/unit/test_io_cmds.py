import os
import struct

import pytest

from backends.base import create_backend
from nvme.errors import CommandError
from nvme.io import IO_COMMAND_EFFECTS, NAMESPACE_WRITE_PROTECTED, ONCS, SUPPORTED_IO_OPCODES, IoExecutor, IoOpcode
from nvme.memory import FlatMemory, NeedsMessageDma
from nvme.namespace import Namespace
from nvme.state import NamespaceInfo
from nvme.status import Status

pytestmark = pytest.mark.timeout(20)

P = 4096
RAM = 0x100000
PREFIX = f"vnvmediot{os.getpid()}"


@pytest.fixture(params=["ram", "null", "file"])
def env(request, tmp_path):
    kind = request.param
    if kind == "file":
        path = tmp_path / "disk"
        path.write_bytes(bytes(1 << 20))
        b = create_backend("file", str(path), name_prefix=PREFIX)
    else:
        b = create_backend(kind, "1M", name_prefix=PREFIX)
    mem = FlatMemory()
    ram = bytearray(64 * P)
    mem.add(RAM, ram)
    rom = bytearray(P)
    mem.add(0x10000, rom, writable=False)
    ns = Namespace.for_backend(1, b)
    ex = IoExecutor({1: ns}, mem, mdts_bytes=32 * P)
    yield kind, ex, ram, rom, mem, b
    b.destroy()


def sqe(opc, nsid=1, slba=0, nlb=1, prp1=RAM, prp2=0, cdw10=None, cdw11=None, cdw12=None, fuse=0, cid=7):
    d = memoryview(bytearray(64)).cast("I")
    d[0] = opc | (fuse << 8) | (cid << 16)
    d[1] = nsid
    d[6], d[7] = prp1 & 0xFFFFFFFF, prp1 >> 32
    d[8], d[9] = prp2 & 0xFFFFFFFF, prp2 >> 32
    d[10] = (slba & 0xFFFFFFFF) if cdw10 is None else cdw10
    d[11] = (slba >> 32) if cdw11 is None else cdw11
    d[12] = ((nlb - 1) & 0xFFFF) if cdw12 is None else cdw12
    return d


def test_write_read_roundtrip(env):
    kind, ex, ram, *_ = env
    ram[0:1024] = os.urandom(1024)
    payload = bytes(ram[0:1024])
    assert ex.execute(sqe(IoOpcode.WRITE, slba=4, nlb=2)) == (0, 0)
    ram[0x2000:0x2400] = b"\xee" * 1024
    assert ex.execute(sqe(IoOpcode.READ, slba=4, nlb=2, prp1=RAM + 0x2000)) == (0, 0)
    expect = bytes(1024) if kind == "null" else payload
    assert bytes(ram[0x2000:0x2400]) == expect


def test_multi_page_prp_list_read(env):
    kind, ex, ram, _, _, b = env
    pattern = bytes(range(256)) * 48          # 3 pages
    if kind != "null":
        b.write_from(0, [memoryview(pattern)])
    struct.pack_into("<QQ", ram, 0x1000, RAM + 0x8000, RAM + 0x5000)
    st = ex.execute(sqe(IoOpcode.READ, slba=0, nlb=24, prp1=RAM + 0x3000, prp2=RAM + 0x1000))
    assert st == (0, 0)
    got = bytes(ram[0x3000:0x4000]) + bytes(ram[0x8000:0x9000]) + bytes(ram[0x5000:0x6000])
    assert got == (bytes(len(pattern)) if kind == "null" else pattern)


def test_sqe_given_as_bytes_view(env):
    _, ex, *_ = env
    raw = sqe(IoOpcode.READ).cast("B")
    assert ex.execute(raw) == (0, 0)


def test_invalid_namespace(env):
    _, ex, *_ = env
    for nsid in (0, 2, 0xFFFFFFFF):
        assert ex.execute(sqe(IoOpcode.READ, nsid=nsid))[0] == Status.INVALID_NAMESPACE
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, nsid=5))[0] == Status.INVALID_NAMESPACE


def test_lba_out_of_range_no_wrap(env):
    _, ex, *_ = env
    blocks = (1 << 20) // 512
    assert ex.execute(sqe(IoOpcode.READ, slba=blocks - 1, nlb=1))[0] == 0
    assert ex.execute(sqe(IoOpcode.READ, slba=blocks - 1, nlb=2))[0] == Status.LBA_OUT_OF_RANGE
    assert ex.execute(sqe(IoOpcode.WRITE, slba=(1 << 64) - 1, nlb=2))[0] == Status.LBA_OUT_OF_RANGE
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, slba=blocks, nlb=1))[0] == Status.LBA_OUT_OF_RANGE
    assert ex.execute(sqe(IoOpcode.COMPARE, slba=blocks, nlb=1))[0] == Status.LBA_OUT_OF_RANGE


def test_mdts(env):
    _, ex, *_ = env
    assert ex.execute(sqe(IoOpcode.READ, nlb=8 * 32 + 1))[0] == Status.INVALID_FIELD
    # Write Zeroes is not bound by MDTS
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, nlb=1024))[0] == 0


def test_unknown_opcode_and_fused(env):
    _, ex, *_ = env
    for opc in (0x04, 0x0C, 0x19, 0x7D, 0xFF):
        assert ex.execute(sqe(opc))[0] == Status.INVALID_OPCODE
    assert ex.execute(sqe(IoOpcode.COMPARE, fuse=1))[0] == Status.INVALID_FIELD
    assert ex.execute(sqe(IoOpcode.WRITE, fuse=2))[0] == Status.INVALID_FIELD


def test_data_transfer_errors(env):
    _, ex, *_ = env
    assert ex.execute(sqe(IoOpcode.READ, prp1=0x900000))[0] == Status.DATA_TRANSFER_ERROR
    assert ex.execute(sqe(IoOpcode.READ, prp1=0x10000))[0] == Status.DATA_TRANSFER_ERROR   # RO for a read
    assert ex.execute(sqe(IoOpcode.WRITE, prp1=0x10000))[0] == 0                          # fine for a write
    assert ex.execute(sqe(IoOpcode.READ, prp1=RAM + 2))[0] == Status.INVALID_PRP_OFFSET


def test_needs_message_dma_propagates(env):
    _, ex, _, _, mem, _ = env
    mem.add(0x800000, None, size=P)
    with pytest.raises(NeedsMessageDma):
        ex.execute(sqe(IoOpcode.READ, prp1=0x800000))


def test_flush(env):
    _, ex, *_ = env
    assert ex.execute(sqe(IoOpcode.FLUSH))[0] == 0
    assert ex.execute(sqe(IoOpcode.FLUSH, nsid=0xFFFFFFFF))[0] == 0
    assert ex.execute(sqe(IoOpcode.FLUSH, nsid=3))[0] == Status.INVALID_NAMESPACE


def test_write_zeroes(env):
    kind, ex, ram, _, _, b = env
    if kind == "null":
        assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, slba=1, nlb=2))[0] == 0
        return
    b.write_from(0, [memoryview(b"\xab" * 4096)])
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, slba=1, nlb=2))[0] == 0
    assert ex.execute(sqe(IoOpcode.WRITE_ZEROES, slba=5, nlb=1, cdw12=(1 << 25)))[0] == 0  # DEAC
    out = bytearray(4096)
    b.read_into(0, [memoryview(out)])
    assert out[:512] == b"\xab" * 512 and out[512:1536] == bytes(1024)
    assert out[1536:2560] == b"\xab" * 1024 and out[2560:3072] == bytes(512)


def test_dsm_deallocate(env):
    kind, ex, ram, rom, _, b = env
    if kind != "null":
        b.write_from(0, [memoryview(b"\xcd" * 8192)])
    # two ranges (context attr, nlb, slba) in a READ-ONLY page: the list is only read
    struct.pack_into("<IIQIIQ", rom, 0, 0, 2, 1, 0, 1, 10)
    assert ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, prp1=0x10000, cdw10=1, cdw11=1 << 2, cdw12=0))[0] == 0
    if kind != "null":
        out = bytearray(8192)
        b.read_into(0, [memoryview(out)])
        assert out[:512] == b"\xcd" * 512 and out[512:1536] == bytes(1024)
        assert out[5120:5632] == bytes(512) and out[5632:6144] == b"\xcd" * 512
    # out-of-range range: nothing is discarded
    struct.pack_into("<IIQ", rom, 0, 0, 1, (1 << 20) // 512)
    assert ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, prp1=0x10000, cdw10=0, cdw11=1 << 2, cdw12=0))[0] \
        == Status.LBA_OUT_OF_RANGE
    # no deallocate attribute: hints only, success without touching the list
    assert ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, prp1=0x900000, cdw10=0, cdw11=1, cdw12=0))[0] == 0
    # 256 ranges spanning two pages via PRP1 offset + PRP2
    struct.pack_into("<IIQ", ram, 0x800, 0, 1, 3)
    st = ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, prp1=RAM + 0x800, prp2=RAM + 0x1000,
                        cdw10=255, cdw11=1 << 2, cdw12=0))
    assert st[0] == 0


def test_compare(env):
    kind, ex, ram, *_ = env
    ram[0:512] = b"\x5a" * 512
    assert ex.execute(sqe(IoOpcode.WRITE, slba=3))[0] == 0
    expect_same = bytes(512) if kind == "null" else b"\x5a" * 512
    ram[0x1000:0x1200] = expect_same
    assert ex.execute(sqe(IoOpcode.COMPARE, slba=3, prp1=RAM + 0x1000))[0] == 0
    ram[0x11FF] ^= 1
    assert ex.execute(sqe(IoOpcode.COMPARE, slba=3, prp1=RAM + 0x1000))[0] == Status.COMPARE_FAILURE


def test_read_only_namespace(env):
    kind, ex, ram, _, mem, b = env
    ro = Namespace(NamespaceInfo(nsid=2, block_size=512, blocks=16, read_only=True), b)
    ex.namespaces[2] = ro
    for opc in (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES):
        assert ex.execute(sqe(opc, nsid=2))[0] == NAMESPACE_WRITE_PROTECTED
    assert ex.execute(sqe(IoOpcode.DATASET_MANAGEMENT, nsid=2, cdw10=0, cdw11=4, cdw12=0))[0] \
        == NAMESPACE_WRITE_PROTECTED
    assert ex.execute(sqe(IoOpcode.READ, nsid=2))[0] == 0
    assert ex.execute(sqe(IoOpcode.READ, nsid=2, slba=16))[0] == Status.LBA_OUT_OF_RANGE


def test_backend_error_is_media_status(tmp_path):
    path = tmp_path / "d"
    path.write_bytes(bytes(8192))
    b = create_backend("file", str(path), name_prefix=PREFIX)
    mem = FlatMemory()
    mem.add(RAM, bytearray(P))
    ex = IoExecutor({1: Namespace.for_backend(1, b)}, mem, 0)
    os.truncate(path, 512)
    try:
        assert ex.execute(sqe(IoOpcode.READ, slba=4))[0] == Status.UNRECOVERED_READ_ERROR
    finally:
        b.destroy()


def test_namespace_math_and_validation():
    b = create_backend("null", "64K", name_prefix=PREFIX)
    ns = Namespace(NamespaceInfo(nsid=1, block_size=4096, blocks=16), b)
    assert ns.byte_range(2, 3) == (8192, 12288)
    with pytest.raises(CommandError):
        ns.byte_range(15, 2)
    with pytest.raises(ValueError):
        Namespace(NamespaceInfo(nsid=1, block_size=4096, blocks=17), b)
    with pytest.raises(ValueError):
        Namespace(NamespaceInfo(nsid=1, block_size=1000, blocks=1), b)


def test_capability_table():
    assert SUPPORTED_IO_OPCODES == {0, 1, 2, 5, 8, 9}
    assert IO_COMMAND_EFFECTS[IoOpcode.WRITE] & 2 and not IO_COMMAND_EFFECTS[IoOpcode.READ] & 2
    assert ONCS == 0b1101
