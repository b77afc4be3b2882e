"""Identify (admin 06h): CNS 00h namespace, 01h controller, 02h active NS list,
03h NS identification descriptors.  Every structure is 4096 bytes through PRPs.

Field offsets are NVMe Base 1.4 figures 247 (controller) and 245 (namespace).
"""
from __future__ import annotations

import hashlib
import struct
from enum import IntEnum
from typing import TYPE_CHECKING

from nvme.errors import CommandError
from nvme.io import opcodes as io_opcodes
from nvme.status import Status

from .caps import AdminOpcode, oncs
from .command import AdminCmd, to_host

if TYPE_CHECKING:
    from nvme.controller import Controller

IDENTIFY_SIZE = 4096
NSID_BROADCAST = 0xFFFFFFFF


class Cns(IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESCRIPTORS = 0x03


def ns_nguid(serial: str, nsid: int) -> bytes:
    """A stable 16-byte NGUID per (controller serial, nsid): Linux keys its disks on it."""
    return hashlib.sha256(f"vnvmed:{serial}:{nsid}".encode()).digest()[:16]


def ns_uuid(serial: str, nsid: int) -> bytes:
    u = bytearray(hashlib.sha256(f"vnvmed-uuid:{serial}:{nsid}".encode()).digest()[:16])
    u[6] = (u[6] & 0x0F) | 0x40   # version 4 layout, RFC 4122 variant
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


def identify_controller(c: "Controller") -> bytes:
    cfg = c.cfg
    b = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", b, 0, cfg.vid, cfg.ssvid)
    b[4:24] = cfg.serial_field.encode()
    b[24:64] = cfg.model_field.encode()
    b[64:72] = cfg.firmware_field.encode()
    b[72] = 6                                           # RAB
    b[73:76] = cfg.ieee_oui.to_bytes(3, "little")
    b[77] = cfg.mdts
    struct.pack_into("<H", b, 78, cfg.cntlid)
    struct.pack_into("<I", b, 80, 0x00010400)           # VER 1.4
    struct.pack_into("<I", b, 92, 1 << 8)               # OAES: NS attribute notices
    b[111] = 1                                          # CNTRLTYPE: I/O controller
    oacs = (1 << 8) if AdminOpcode.DOORBELL_BUFFER_CONFIG in c.admin_table else 0
    struct.pack_into("<H", b, 256, oacs)
    b[258] = 3                                          # ACL: 4 concurrent Aborts
    b[259] = cfg.aerl
    b[260] = 0x03                                       # FRMW: 1 slot, slot 1 read-only
    b[261] = 0x06                                       # LPA: effects log, extended Get Log Page
    b[262] = cfg.elpe
    b[263] = 0                                          # NPSS: one power state
    struct.pack_into("<HH", b, 266, 0x0157, 0x0175)     # WCTEMP 70 C, CCTEMP 100 C
    b[512] = 0x66                                       # SQES: 64 bytes required and max
    b[513] = 0x44                                       # CQES: 16 bytes
    struct.pack_into("<I", b, 516, cfg.max_namespaces)  # NN
    struct.pack_into("<H", b, 520, oncs(c.io_effects))
    struct.pack_into("<H", b, 522, io_opcodes.FUSES)
    b[525] = io_opcodes.VWC                             # VWC as the I/O executor implements it
    struct.pack_into("<I", b, 536, io_opcodes.SGLS)     # SGLS as nvme.sgl walks them
    nqn = cfg.subnqn.encode()
    b[768:768 + len(nqn)] = nqn
    struct.pack_into("<H", b, 2048, 2500)               # PSD0: MP 25.00 W
    return bytes(b)


def identify_namespace(c: "Controller", nsid: int) -> bytes:
    b = bytearray(IDENTIFY_SIZE)
    ns = c.namespaces.get(nsid)
    if ns is None:
        return bytes(b)                                 # inactive nsid: all zeroes
    blocks, bs = ns.blocks, ns.block_size
    struct.pack_into("<QQQ", b, 0, blocks, blocks, blocks)  # NSZE, NCAP, NUSE
    b[25] = 0                                           # NLBAF: one format
    b[26] = 0                                           # FLBAS: format 0
    if _read_only(ns):
        b[99] = 1                                       # NSATTR: write protected
    b[104:120] = ns_nguid(c.cfg.serial, nsid)
    struct.pack_into("<I", b, 128, (bs.bit_length() - 1) << 16)  # LBAF0: LBADS, no metadata
    return bytes(b)


def _read_only(ns: object) -> bool:
    if hasattr(ns, "read_only"):
        return bool(getattr(ns, "read_only"))
    info = getattr(ns, "info", None)
    return bool(getattr(info, "read_only", False))


def active_ns_list(c: "Controller", after: int) -> bytes:
    ids = sorted(n for n in c.namespaces if n > after)[:IDENTIFY_SIZE // 4]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(IDENTIFY_SIZE, b"\0")


def ns_descriptors(c: "Controller", nsid: int) -> bytes:
    out = bytearray()
    out += bytes([2, 16, 0, 0]) + ns_nguid(c.cfg.serial, nsid)   # NIDT 2: NGUID
    out += bytes([3, 16, 0, 0]) + ns_uuid(c.cfg.serial, nsid)    # NIDT 3: UUID
    return bytes(out).ljust(IDENTIFY_SIZE, b"\0")


def handle_identify(c: "Controller", cmd: AdminCmd) -> int:
    cns = cmd.cdw10 & 0xFF
    nsid = cmd.nsid
    match cns:
        case Cns.NAMESPACE:
            # Without NS management, the broadcast nsid is not a valid target (1.4 5.15.2).
            if nsid == 0 or nsid > c.cfg.max_namespaces:
                raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")
            data = identify_namespace(c, nsid)
        case Cns.CONTROLLER:
            data = identify_controller(c)
        case Cns.ACTIVE_NS_LIST:
            if nsid >= 0xFFFFFFFE:
                raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")
            data = active_ns_list(c, nsid)
        case Cns.NS_DESCRIPTORS:
            if nsid not in c.namespaces:
                raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")
            data = ns_descriptors(c, nsid)
        case _:
            raise CommandError(Status.INVALID_FIELD, f"CNS {cns:#x}")
    to_host(c.mem, cmd, data)
    return 0
