"""BAR0 controller registers below 0x1000 (NVMe Base 1.4 section 3.1).

Pure storage plus access rules; the controller gives writes their meaning.
Access rules (SPDK issue #2495 and DESIGN.md section 4): only naturally aligned
4-byte accesses, plus 8-byte accesses to the 64-bit registers CAP/ASQ/ACQ (whose
4-byte halves are also accepted, since 32-bit hosts split them).  Anything else
raises `RegisterAccessError`, which the front-end answers with EINVAL.  Reads of
offsets we do not implement return 0; writes to them and to read-only registers
are ignored, as a real controller would.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from nvme.config import ControllerConfig

REG_LIMIT = 0x1000  # doorbells start here
VERSION_1_4 = 0x00010400
NSSR_MAGIC = 0x4E564D65  # "NVMe"


class Reg(IntEnum):
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30


WIDE = (Reg.CAP, Reg.ASQ, Reg.ACQ)  # 64-bit registers

# CSTS bits
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_NSSRO = 1 << 4

CC_WRITABLE = 0x00FFFFF1   # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES
AQA_WRITABLE = 0x0FFF0FFF


class RegisterAccessError(Exception):
    """A register access of a size/alignment the device does not accept (-> EINVAL)."""


def build_cap(cfg: ControllerConfig) -> int:
    cap = (cfg.mqes - 1) & 0xFFFF            # MQES, 0's based
    cap |= 1 << 16                           # CQR: I/O queues must be contiguous
    cap |= (cfg.timeout_500ms & 0xFF) << 24  # TO
    # DSTRD = 0 (4-byte doorbell stride)
    if cfg.nssr_supported:
        cap |= 1 << 36                       # NSSRS
    cap |= 1 << 37                           # CSS bit 0: NVM command set
    # MPSMIN = MPSMAX = 0: 4 KiB pages only
    return cap


def _locate(offset: int, size: int) -> tuple[Reg | None, int]:
    """Map an access to (register, byte offset inside it); validate width/alignment."""
    if offset < 0 or offset + size > REG_LIMIT:
        raise RegisterAccessError(f"register access {offset:#x}/{size} out of range")
    if size == 8:
        if offset in WIDE:
            return Reg(offset), 0
        raise RegisterAccessError(f"8-byte access to {offset:#x} (not a 64-bit register)")
    if size != 4 or offset % 4:
        raise RegisterAccessError(f"register access {offset:#x}/{size}: only 4/8-byte aligned")
    if offset in Reg.__members__.values():
        return Reg(offset), 0
    if offset - 4 in WIDE:
        return Reg(offset - 4), 4
    return None, 0


@dataclass(slots=True)
class RegisterFile:
    """Stored register values.  CSTS is owned by the controller (derived from state)."""
    cap: int
    cc: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0
    intms: int = 0   # interrupt mask (INTx/MSI only; MSI-X masking lives in the client)

    @classmethod
    def for_config(cls, cfg: ControllerConfig) -> "RegisterFile":
        return cls(cap=build_cap(cfg))

    def reset(self) -> None:
        self.cc = self.aqa = self.asq = self.acq = self.intms = 0

    def _value(self, reg: Reg, csts: int) -> int:
        match reg:
            case Reg.CAP: return self.cap
            case Reg.VS: return VERSION_1_4
            case Reg.INTMS | Reg.INTMC: return self.intms
            case Reg.CC: return self.cc
            case Reg.CSTS: return csts
            case Reg.AQA: return self.aqa
            case Reg.ASQ: return self.asq
            case Reg.ACQ: return self.acq
        return 0  # NSSR reads as 0 (write-only in practice)

    def read(self, offset: int, size: int, csts: int) -> int:
        reg, shift = _locate(offset, size)
        if reg is None:
            return 0
        value = self._value(reg, csts) >> (shift * 8)
        return value & ((1 << (size * 8)) - 1)

    def write(self, offset: int, size: int, value: int) -> tuple[Reg, int, int] | None:
        """Store a write; return (register, old, new) for the controller to act on.

        For CC the values are the stored register; for INTMS/INTMC/CSTS/NSSR `new` is the
        raw value written (their effect is not a plain store).  None: nothing to do.
        """
        reg, shift = _locate(offset, size)
        if reg is None:
            return None
        value &= (1 << (size * 8)) - 1
        match reg:
            case Reg.CC:
                old, self.cc = self.cc, value & CC_WRITABLE
                return reg, old, self.cc
            case Reg.AQA:
                old, self.aqa = self.aqa, value & AQA_WRITABLE
                return reg, old, self.aqa
            case Reg.ASQ | Reg.ACQ:
                old = self.asq if reg is Reg.ASQ else self.acq
                if size == 8:
                    new = value
                elif shift == 0:
                    new = (old & ~0xFFFFFFFF) | value
                else:
                    new = (old & 0xFFFFFFFF) | (value << 32)
                if reg is Reg.ASQ:
                    self.asq = new
                else:
                    self.acq = new
                return reg, old, new
            case Reg.INTMS:
                old, self.intms = self.intms, self.intms | value
                return reg, old, self.intms
            case Reg.INTMC:
                old, self.intms = self.intms, self.intms & ~value
                return reg, old, self.intms
            case Reg.CSTS | Reg.NSSR:
                return reg, 0, value
        return None  # CAP, VS: read-only

    def to_dict(self) -> dict[str, int]:
        return {"cc": self.cc, "aqa": self.aqa, "asq": self.asq, "acq": self.acq,
                "intms": self.intms}

    def load(self, d: dict[str, int]) -> None:
        self.cc, self.aqa, self.asq, self.acq, self.intms = (
            d["cc"], d["aqa"], d["asq"], d["acq"], d["intms"])
