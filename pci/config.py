"""PCI configuration space of an NVMe function (4 KiB, PCIe extended), pure.

Layout (offsets in config space):
    0x00 header type 0: vendor/device, command/status, class 01/08/02 (NVMe),
         BAR0+BAR1 = one 64-bit non-prefetchable memory BAR (registers + doorbells),
         BAR4 = MSI-X table, BAR5 = MSI-X PBA (32-bit memory BARs), INTx pin A
    0x40 PM capability      0x50 MSI-X capability      0x60 PCIe capability (endpoint, v2)
    0x100.. extended space: empty (reads 0)

Writes go through a per-byte writable mask, so a guest (or QEMU forwarding its config
cycles) can only change what real hardware lets it change.  BAR sizing works the
usual way: writing all-ones to a BAR reads back the size mask; the low flag bits are
read-only.  QEMU emulates BAR addresses and the MSI-X table itself, but forwards every
config write to us, so our view of the command register and MSI-X enable is current.
"""
from __future__ import annotations

import errno

from vfio_user.errors import ProtocolError

SIZE = 0x1000
CAP_PM, CAP_MSIX, CAP_PCIE = 0x40, 0x50, 0x60


class PciConfig:
    def __init__(self, *, bar0_size: int = 0x4000, msix_vectors: int = 64,
                 vendor: int = 0x4E56, device: int = 0x0001, revision: int = 0,
                 table_bar_size: int = 0x1000, pba_bar_size: int = 0x1000) -> None:
        if bar0_size & (bar0_size - 1) or bar0_size < 0x4000:
            raise ValueError("BAR0 must be a power of two of at least 16 KiB")
        self.vendor, self.device, self.revision = vendor, device, revision
        self.bar_sizes = {0: bar0_size, 4: table_bar_size, 5: pba_bar_size}
        self.msix_vectors = msix_vectors
        self.space = bytearray(SIZE)
        self.wmask = bytearray(SIZE)
        self.reset()

    # ------------------------------------------------------------------ build
    def _w(self, off: int, value: int, size: int, wmask: int = 0) -> None:
        self.space[off:off + size] = value.to_bytes(size, "little")
        self.wmask[off:off + size] = wmask.to_bytes(size, "little")

    def reset(self) -> None:
        """Power-on values (also what a function-level reset restores)."""
        self.space[:] = bytes(SIZE)
        self.wmask[:] = bytes(SIZE)
        self._w(0x00, self.vendor, 2)
        self._w(0x02, self.device, 2)
        # command: I/O space (0) off, memory space, bus master, SERR, INTx disable writable
        self._w(0x04, 0, 2, 0x0546)
        self._w(0x06, 0x0010, 2)            # status: capabilities list
        self._w(0x08, self.revision, 1)
        self._w(0x09, 0x02, 1)              # prog-if NVMe (NVM Express)
        self._w(0x0A, 0x08, 1)              # subclass: non-volatile memory controller
        self._w(0x0B, 0x01, 1)              # class: mass storage
        self._w(0x0C, 0, 1, 0xFF)           # cache line size
        self._w(0x0E, 0x00, 1)              # header type 0
        self._w(0x10, 0x4, 4, ~(self.bar_sizes[0] - 1) & 0xFFFFFFF0)  # 64-bit mem BAR
        self._w(0x14, 0, 4, 0xFFFFFFFF)     # upper half of BAR0
        self._w(0x20, 0x0, 4, ~(self.bar_sizes[4] - 1) & 0xFFFFFFF0)
        self._w(0x24, 0x0, 4, ~(self.bar_sizes[5] - 1) & 0xFFFFFFF0)
        self._w(0x2C, self.vendor, 2)       # subsystem vendor
        self._w(0x2E, self.device, 2)       # subsystem id
        self._w(0x34, CAP_PM, 1)
        self._w(0x3C, 0, 1, 0xFF)           # interrupt line (scratch for the OS)
        self._w(0x3D, 0x01, 1)              # interrupt pin A
        # PM capability v3, no soft reset on D3hot->D0
        self._w(CAP_PM, 0x01 | (CAP_MSIX << 8), 2)
        self._w(CAP_PM + 2, 0x0003, 2)
        self._w(CAP_PM + 4, 0x0008, 2, 0x0003)   # PMCSR: NoSoftReset, power state writable
        # MSI-X: table in BAR4 at 0, PBA in BAR5 at 0; enable + function mask writable
        self._w(CAP_MSIX, 0x11 | (CAP_PCIE << 8), 2)
        self._w(CAP_MSIX + 2, (self.msix_vectors - 1) & 0x7FF, 2, 0xC000)
        self._w(CAP_MSIX + 4, 4, 4)
        self._w(CAP_MSIX + 8, 5, 4)
        # PCIe capability v2, endpoint; FLR capable; device control writable
        self._w(CAP_PCIE, 0x10, 2)
        self._w(CAP_PCIE + 2, 0x0002, 2)
        self._w(CAP_PCIE + 4, 0x10008000, 4)     # devcap: FLR (bit 28), role-based error
        self._w(CAP_PCIE + 8, 0x2810, 2, 0xFFFF)  # devctl: max payload/read request writable
        self._w(CAP_PCIE + 0x0C, 0x00400041, 4)   # linkcap: x4, gen1 (cosmetic)
        self._w(CAP_PCIE + 0x12, 0x0041, 2)        # linkstatus
        self._w(CAP_PCIE + 0x24, 0x0, 4)           # devcap2
        self._w(CAP_PCIE + 0x28, 0, 2, 0xFFFF)    # devctl2

    # ------------------------------------------------------------------ access
    @staticmethod
    def _check(offset: int, count: int) -> None:
        if count not in (1, 2, 4) or offset < 0 or offset + count > SIZE:
            raise ProtocolError(errno.EINVAL, f"config access of {count} bytes at {offset:#x}")

    def read(self, offset: int, count: int) -> bytes:
        # QEMU reads whole chunks (e.g. 256 bytes at once) when it probes the device.
        if offset < 0 or count <= 0 or offset + count > SIZE:
            raise ProtocolError(errno.EINVAL, f"config read of {count} bytes at {offset:#x}")
        return bytes(self.space[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or not data or offset + len(data) > SIZE:
            raise ProtocolError(errno.EINVAL, f"config write of {len(data)} bytes at {offset:#x}")
        for i, b in enumerate(data):
            m = self.wmask[offset + i]
            if m:
                cur = self.space[offset + i]
                self.space[offset + i] = (cur & ~m) | (b & m)

    def u16(self, off: int) -> int:
        return int.from_bytes(self.space[off:off + 2], "little")

    @property
    def intx_disabled(self) -> bool:
        return bool(self.u16(0x04) & 0x400)

    @property
    def bus_master(self) -> bool:
        return bool(self.u16(0x04) & 0x4)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.u16(CAP_MSIX + 2) & 0x8000)
