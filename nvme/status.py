"""NVMe completion status: (SCT << 8) | SC as one int, and the CQE DW3 encoding.

Shared by admin and I/O handlers.  Values from the NVMe Base spec, figure
"Status Code - Generic/Command Specific/Media" tables.
"""
from __future__ import annotations

from enum import IntEnum


class SCT(IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3


def status(sct: int, sc: int) -> int:
    return (sct << 8) | sc


class Status(IntEnum):
    SUCCESS = 0x000
    # generic (SCT 0)
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    CID_CONFLICT = 0x003
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORTED_BY_REQUEST = 0x007
    ABORTED_SQ_DELETION = 0x008
    ABORTED_FAILED_FUSED = 0x009
    ABORTED_MISSING_FUSED = 0x00A
    INVALID_NAMESPACE = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x00D
    INVALID_NUMBER_OF_SGL_DESCRIPTORS = 0x00E
    DATA_SGL_LENGTH_INVALID = 0x00F
    SGL_DESCRIPTOR_TYPE_INVALID = 0x011
    INVALID_PRP_OFFSET = 0x013
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    NAMESPACE_NOT_READY = 0x082
    # command specific (SCT 1)
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    ABORT_LIMIT_EXCEEDED = 0x103
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E
    FEATURE_NOT_NS_SPECIFIC = 0x10F
    CONFLICTING_ATTRIBUTES = 0x180
    WRITE_TO_READ_ONLY_RANGE = 0x182
    # media (SCT 2)
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    COMPARE_FAILURE = 0x285
    ACCESS_DENIED = 0x286


DNR = 1 << 15  # "do not retry", bit 31 of DW3 = bit 15 of the 16-bit status field
# Flag on a status value (above the 11 bits of SCT|SC): post it with DNR clear, the host
# may retry (a backend that lost its connection: the command can succeed later).
RETRY = 1 << 12


def status_field(st: int, dnr: bool = True) -> int:
    """The 15-bit status field (without phase) as it sits in DW3[31:17], shifted to [15:1]."""
    if st == 0:
        return 0
    return ((st & 0x7FF) << 1) | (DNR if dnr and not st & RETRY else 0)


def dw3(cid: int, st: int, phase: int, dnr: bool = True) -> int:
    """CQE DW3: CID[15:0], P[16], SF[31:17]."""
    return (cid & 0xFFFF) | ((status_field(st, dnr) | (phase & 1)) << 16)
