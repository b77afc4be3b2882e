"""The NVM I/O command set we implement: one table feeding dispatch and Identify.

The admin engineer builds the Commands Supported and Effects log (log page 05h,
I/O entries) from IO_COMMAND_EFFECTS and Identify Controller ONCS/FUSES from the
constants below, so what we advertise is exactly what dispatch accepts.
"""
from __future__ import annotations

from enum import IntEnum


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


# Commands Supported and Effects entry bits (NVMe Base, log page 05h).
CSUPP = 1 << 0  # command supported
LBCC = 1 << 1   # logical block content change

IO_COMMAND_EFFECTS: dict[int, int] = {
    IoOpcode.FLUSH: CSUPP,
    IoOpcode.WRITE: CSUPP | LBCC,
    IoOpcode.READ: CSUPP,
    IoOpcode.COMPARE: CSUPP,
    IoOpcode.WRITE_ZEROES: CSUPP | LBCC,
    IoOpcode.DATASET_MANAGEMENT: CSUPP | LBCC,
}
SUPPORTED_IO_OPCODES: frozenset[int] = frozenset(IO_COMMAND_EFFECTS)

# Identify Controller ONCS: bit0 Compare, bit2 Dataset Management, bit3 Write Zeroes.
ONCS = (1 << 0) | (1 << 2) | (1 << 3)
# Identify Controller FUSES: fused Compare+Write is NOT supported.  Workers of
# different processes share a namespace, so a sequential executor cannot make the
# pair atomic; fused commands complete with INVALID_FIELD.
FUSES = 0
# Identify Controller VWC: bit0 present (flush means something for file backends),
# bits 2:1 = 11b: Flush with NSID FFFFFFFFh flushes all namespaces.
VWC = 0x07
# SGLS[1:0] = 01b: SGLs supported, no alignment or granularity requirement.
# Bit Bucket descriptors (bit 16) are accepted for reads.
SGLS = 0x1 | (1 << 16)

# Read-only namespaces answer writes with "Namespace is Write Protected" (SCT 0,
# SC 20h): it is the namespace, not an LBA range, that refuses writes (Linux maps
# it to a read-only error).  Not yet in nvme.status.Status, hence the constant.
NAMESPACE_WRITE_PROTECTED = 0x020
