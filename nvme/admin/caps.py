"""Opcodes and command effects: the data half of the capability table.

One source feeds three consumers: admin dispatch (an opcode not in the admin table
is INVALID_OPCODE), the Commands Supported and Effects log (05h), and Identify
(OACS for admin, ONCS for the optional I/O commands).  The I/O half comes from the
I/O command set (nvme.io.opcodes), so ONCS and log 05h match what workers dispatch.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import Iterable, Mapping

from nvme.io.opcodes import IO_COMMAND_EFFECTS

# Commands Supported and Effects entry bits (NVMe Base 1.4 figure 210)
CSUPP = 1 << 0   # command supported
LBCC = 1 << 1    # logical block content change
NCC = 1 << 2     # namespace capability change
NIC = 1 << 3     # namespace inventory change
CCC = 1 << 4     # controller capability change


class AdminOpcode(IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    COPY = 0x19


# The I/O command set's own table (what its executor dispatches) is the default.
DEFAULT_IO_EFFECTS: dict[int, int] = dict(IO_COMMAND_EFFECTS)

# ONCS bit for each optional I/O command (NVMe Base 1.4 Identify Controller byte 521:520)
_ONCS_BITS: dict[int, int] = {
    IoOpcode.COMPARE: 0,
    IoOpcode.WRITE_UNCORRECTABLE: 1,
    IoOpcode.DATASET_MANAGEMENT: 2,
    IoOpcode.WRITE_ZEROES: 3,
    IoOpcode.VERIFY: 7,
    IoOpcode.COPY: 8,
}
ONCS_SAVE_SELECT = 1 << 4   # Get Features SEL / Set Features SV understood
ONCS_TIMESTAMP = 1 << 6     # feature 0Eh


def oncs(io_opcodes: Iterable[int]) -> int:
    value = ONCS_SAVE_SELECT | ONCS_TIMESTAMP
    for op in io_opcodes:
        if op in _ONCS_BITS:
            value |= 1 << _ONCS_BITS[op]
    return value


def effects_log(admin_effects: Mapping[int, int], io_effects: Mapping[int, int]) -> bytes:
    """Log page 05h: 256 admin entries then 256 I/O entries, 4 bytes each (4096 bytes)."""
    acs = [0] * 256
    iocs = [0] * 256
    for op, eff in admin_effects.items():
        acs[op] = eff
    for op, eff in io_effects.items():
        iocs[op] = eff
    return struct.pack("<256I256I", *acs, *iocs) + bytes(2048)
