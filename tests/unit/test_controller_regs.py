"""Register file: widths, alignment, CAP fields, 64-bit halves."""
import pytest

from nvme.config import ControllerConfig
from nvme.regs import Reg, RegisterAccessError, RegisterFile, VERSION_1_4


@pytest.fixture
def regs():
    return RegisterFile.for_config(ControllerConfig(mqes=256, nssr_supported=True))


def test_cap_fields(regs):
    cap = regs.read(0, 8, 0)
    assert cap & 0xFFFF == 255              # MQES 0's based
    assert cap >> 16 & 1 == 1               # CQR
    assert cap >> 32 & 0xF == 0             # DSTRD
    assert cap >> 36 & 1 == 1               # NSSRS
    assert cap >> 37 & 0xFF == 1            # CSS NVM
    assert cap >> 48 & 0xFF == 0            # MPSMIN/MPSMAX
    assert regs.read(0, 4, 0) | regs.read(4, 4, 0) << 32 == cap
    assert RegisterFile.for_config(ControllerConfig(nssr_supported=False)).read(0, 8, 0) >> 36 & 1 == 0


def test_vs_and_undefined_reads(regs):
    assert regs.read(Reg.VS, 4, 0) == VERSION_1_4
    assert regs.read(0x38, 4, 0) == 0
    assert regs.read(0xFFC, 4, 0) == 0
    assert regs.read(Reg.CSTS, 4, 0x5) == 0x5


@pytest.mark.parametrize("offset,size", [
    (0x14, 1), (0x14, 2), (0x15, 4), (0x14, 8), (0x08, 8), (0x1000, 4), (0xFFC, 8), (-4, 4),
    (0x2A, 4), (0x28, 3),
])
def test_bad_widths_refused(regs, offset, size):
    with pytest.raises(RegisterAccessError):
        regs.read(offset, size, 0)
    with pytest.raises(RegisterAccessError):
        regs.write(offset, size, 0)


def test_asq_acq_full_and_halves(regs):
    regs.write(Reg.ASQ, 8, 0x1_2345_6000)
    assert regs.asq == 0x1_2345_6000
    regs.write(Reg.ACQ, 4, 0x7000)
    regs.write(Reg.ACQ + 4, 4, 0x2)
    assert regs.acq == 0x2_0000_7000
    assert regs.read(Reg.ACQ + 4, 4, 0) == 2
    assert regs.read(Reg.ACQ, 8, 0) == 0x2_0000_7000


def test_cap_and_vs_read_only(regs):
    cap = regs.cap
    assert regs.write(Reg.CAP, 8, 0) is None
    assert regs.write(Reg.VS, 4, 0) is None
    assert regs.cap == cap and regs.read(Reg.VS, 4, 0) == VERSION_1_4


def test_cc_reserved_bits_masked_and_intms(regs):
    reg, old, new = regs.write(Reg.CC, 4, 0xFFFFFFFF)
    assert reg is Reg.CC and old == 0 and new == 0x00FFFFF1
    regs.write(Reg.INTMS, 4, 0b101)
    regs.write(Reg.INTMC, 4, 0b001)
    assert regs.read(Reg.INTMS, 4, 0) == 0b100 == regs.read(Reg.INTMC, 4, 0)
