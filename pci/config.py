"""A PCI Express endpoint's 4 KiB configuration space, pure.

Theory of operation
-------------------
The space is a 4096-byte image plus two per-byte masks fixed at construction:

- `wmask`: bits the guest may change.  A write does
  `new = (old & ~wmask) | (value & wmask)` byte by byte, so read-only fields (ids,
  class, capability structure, BAR flag bits) simply ignore writes.
- BAR sizing falls out of the mask: a BAR's address bits below its size are not
  writable, so writing all-ones reads back `~(size-1) | flags` (PCI 3.0 §6.2.5.1).

Layout (type 0 header, then a capability list in the first 256 bytes):

    0x00 ids, command/status, class 01/08/02 (NVMe), header type 0
    0x10 BAR0+BAR1  64-bit memory, non-prefetchable, `bar0_size` (>= 16 KiB)
    0x20 BAR4       32-bit memory: MSI-X table (offset 0)
    0x24 BAR5       32-bit memory: MSI-X PBA (offset 0)
    0x34 capabilities pointer -> 0x40
    0x3D interrupt pin 1 (INTA)
    0x40 PM (id 01)     -> 0x50
    0x50 MSI-X (id 11)  -> 0x60   Message Control: Enable / Function Mask writable
    0x60 PCIe (id 10)   end       v2, endpoint; Device Control writable
    0x100..0xFFF extended space: reads 0 (no extended capabilities)

Accesses: writes of 1, 2 or 4 bytes anywhere inside the 4 KiB; reads of 1..4096
bytes (QEMU reads the first 256 bytes in one REGION_READ at realize).  Anything else
is EINVAL.  The id defaults 0x4e56:0001 are placeholders chosen to look unused.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from vfio_user.errors import ProtocolError

CONFIG_SIZE = 4096

# Standard header offsets (PCI Local Bus 3.0 §6.1).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CACHE_LINE, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0E
BAR0, BAR4, BAR5 = 0x10, 0x20, 0x24
SUBSYS_VENDOR, SUBSYS_ID, CAP_PTR = 0x2C, 0x2E, 0x34
INTR_LINE, INTR_PIN = 0x3C, 0x3D

CMD_IO, CMD_MEMORY, CMD_BUS_MASTER = 1 << 0, 1 << 1, 1 << 2
CMD_PARITY, CMD_SERR, CMD_INTX_DISABLE = 1 << 6, 1 << 8, 1 << 10
STATUS_CAP_LIST = 1 << 4

PM_CAP, MSIX_CAP, PCIE_CAP = 0x40, 0x50, 0x60
CAP_ID_PM, CAP_ID_MSIX, CAP_ID_PCIE = 0x01, 0x11, 0x10
MSIX_CTRL_ENABLE, MSIX_CTRL_MASKALL = 1 << 15, 1 << 14
PCIE_CAP_SIZE = 0x3C


def _pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size <<= 1
    return size


@dataclass(frozen=True, slots=True)
class PciIds:
    vendor_id: int = 0x4E56
    device_id: int = 0x0001
    subsystem_vendor_id: int | None = None    # None: same as vendor_id
    subsystem_id: int | None = None           # None: same as device_id
    revision: int = 0
    class_code: int = 0x010802                # mass storage / NVM / NVMe


class PciConfig:
    def __init__(self, bar0_size: int = 0x4000, msix_vectors: int = 64,
                 ids: PciIds = PciIds()) -> None:
        if bar0_size < 0x4000 or bar0_size & (bar0_size - 1):
            raise ValueError("BAR0 must be a power of two >= 16 KiB")
        if not 1 <= msix_vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.ids = ids
        self.bar0_size = bar0_size
        self.msix_vectors = msix_vectors
        self.msix_table_size = _pow2_at_least(msix_vectors * 16, 0x1000)
        self.msix_pba_size = _pow2_at_least((msix_vectors + 63) // 64 * 8, 0x1000)
        self._data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self._build()
        self._power_on = bytes(self._data)

    # ------------------------------------------------------------ building
    def _set(self, off: int, fmt: str, value: int, wmask: int = 0) -> None:
        struct.pack_into(fmt, self._data, off, value)
        struct.pack_into(fmt, self.wmask, off, wmask)

    def _build(self) -> None:
        ids = self.ids
        self._set(VENDOR_ID, "<H", ids.vendor_id)
        self._set(DEVICE_ID, "<H", ids.device_id)
        self._set(COMMAND, "<H", 0, CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_PARITY
                  | CMD_SERR | CMD_INTX_DISABLE)
        self._set(STATUS, "<H", STATUS_CAP_LIST)
        self._set(REVISION, "<I", (ids.class_code << 8) | ids.revision)
        self._set(CACHE_LINE, "<B", 0, 0xFF)
        self._set(HEADER_TYPE, "<B", 0)
        # BAR0/1: 64-bit (type 10b), non-prefetchable memory.
        self._set(BAR0, "<I", 0x4, ~(self.bar0_size - 1) & 0xFFFFFFF0)
        self._set(BAR0 + 4, "<I", 0, 0xFFFFFFFF)
        self._set(BAR4, "<I", 0x0, ~(self.msix_table_size - 1) & 0xFFFFFFF0)
        self._set(BAR5, "<I", 0x0, ~(self.msix_pba_size - 1) & 0xFFFFFFF0)
        sv = ids.vendor_id if ids.subsystem_vendor_id is None else ids.subsystem_vendor_id
        sd = ids.device_id if ids.subsystem_id is None else ids.subsystem_id
        self._set(SUBSYS_VENDOR, "<H", sv)
        self._set(SUBSYS_ID, "<H", sd)
        self._set(CAP_PTR, "<B", PM_CAP)
        self._set(INTR_LINE, "<B", 0, 0xFF)
        self._set(INTR_PIN, "<B", 1)
        # Power Management (PCI PM 1.2): PMC v3; PMCSR power state writable,
        # No_Soft_Reset set (a D3hot->D0 transition keeps our state).
        self._data[PM_CAP:PM_CAP + 2] = bytes((CAP_ID_PM, MSIX_CAP))
        self._set(PM_CAP + 2, "<H", 0x0003)
        self._set(PM_CAP + 4, "<H", 0x0008, 0x0003)
        # MSI-X (PCI 3.0 §6.8.2): table in BAR4 @0, PBA in BAR5 @0.
        self._data[MSIX_CAP:MSIX_CAP + 2] = bytes((CAP_ID_MSIX, PCIE_CAP))
        self._set(MSIX_CAP + 2, "<H", self.msix_vectors - 1, MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL)
        self._set(MSIX_CAP + 4, "<I", 0 | 4)
        self._set(MSIX_CAP + 8, "<I", 0 | 5)
        # PCI Express capability v2, endpoint (PCIe 4.0 §7.5.3).
        self._data[PCIE_CAP:PCIE_CAP + 2] = bytes((CAP_ID_PCIE, 0))
        self._set(PCIE_CAP + 2, "<H", 0x0002)                 # version 2, type 0 endpoint
        self._set(PCIE_CAP + 4, "<I", 0)                      # DevCap: MPS 128 B, no FLR
        self._set(PCIE_CAP + 8, "<H", 0x2810, 0x7FFF)         # DevCtl: RO+NS, MRRS 512 B
        self._set(PCIE_CAP + 0xC, "<I", 0x11)                 # LinkCap: 2.5 GT/s x1
        self._set(PCIE_CAP + 0x12, "<H", 0x11)                # LinkSta: 2.5 GT/s x1

    # ------------------------------------------------------------ access
    def read(self, offset: int, count: int) -> bytes:
        if count < 1 or offset < 0 or offset + count > CONFIG_SIZE:
            raise ProtocolError(errno.EINVAL, f"config read {offset:#x}+{count}")
        return bytes(self._data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        n = len(data)
        if n not in (1, 2, 4) or offset < 0 or offset + n > CONFIG_SIZE:
            raise ProtocolError(errno.EINVAL, f"config write {offset:#x}+{n}")
        for i, b in enumerate(data):
            o = offset + i
            m = self.wmask[o]
            self._data[o] = (self._data[o] & ~m & 0xFF) | (b & m)

    def reset(self) -> None:
        self._data[:] = self._power_on

    # ------------------------------------------------------------ state
    def _u16(self, off: int) -> int:
        return self._data[off] | self._data[off + 1] << 8

    @property
    def command(self) -> int:
        return self._u16(COMMAND)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & CMD_INTX_DISABLE)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & CMD_BUS_MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & CMD_MEMORY)

    @property
    def msix_enabled(self) -> bool:
        return bool(self._u16(MSIX_CAP + 2) & MSIX_CTRL_ENABLE)

    @property
    def msix_masked(self) -> bool:
        return bool(self._u16(MSIX_CAP + 2) & MSIX_CTRL_MASKALL)

    @property
    def bar0_address(self) -> int:
        lo, hi = struct.unpack_from("<II", self._data, BAR0)
        return (hi << 32 | lo) & ~0xF

    def snapshot(self) -> bytes:
        return bytes(self._data)

    def restore(self, image: bytes) -> None:
        if len(image) != CONFIG_SIZE:
            raise ValueError("config image must be 4096 bytes")
        self._data[:] = image
