"""Static configuration of one emulated NVMe controller and its namespaces.

These records are what the supervisor parses from the command line / management
socket and hands to the front-end; the device model only reads them.  Every
value that ends up in Identify or CAP lives here so the two can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

# MPS is fixed at 4 KiB (CAP.MPSMIN = CAP.MPSMAX = 0), so MDTS units are 4 KiB pages.
PAGE_SIZE = 4096
PAGE_SHIFT = 12


def _pad(text: str, width: int) -> str:
    """ASCII, space padded, truncated: the format of SN/MN/FR in Identify."""
    raw = text.encode("ascii", "replace").decode("ascii")
    return raw[:width].ljust(width)


@dataclass(slots=True)
class ControllerConfig:
    serial: str = "VNVMED00000000000001"
    model: str = "vnvmed emulated NVMe controller"
    firmware: str = "0.1"
    max_io_queues: int = 64          # I/O SQs (and CQs) this controller can allocate
    mqes: int = 1024                 # max entries per I/O queue (1's based here; CAP.MQES = mqes-1)
    mdts: int = 5                    # 2^mdts pages of 4 KiB per command: 5 = 128 KiB
    msix_vectors: int = 64
    nssr_supported: bool = True
    shadow_doorbells: bool = True    # advertise Doorbell Buffer Config (OACS bit 8)
    cntlid: int = 1
    subnqn: str = "nqn.2024-01.io.vnvmed:ctrl0"
    vid: int = 0x1B36                # PCI vendor id reported in Identify (Red Hat/QEMU range)
    ssvid: int = 0x1AF4
    ieee_oui: int = 0x000000
    max_namespaces: int = 32         # Identify NN
    aerl: int = 3                    # AER limit, 0's based (4 outstanding)
    elpe: int = 63                   # error log entries, 0's based (64 kept)
    timeout_500ms: int = 30          # CAP.TO: 15 s to become ready
    admin_mqes: int = 4096           # admin queues may be up to 4096 entries (AQA is 12 bits)

    def __post_init__(self) -> None:
        if not 1 <= self.max_io_queues <= 511:
            raise ValueError("max_io_queues must be 1..511 (doorbell page holds 512 pairs)")
        if not 2 <= self.mqes <= 65536:
            raise ValueError("mqes must be 2..65536")
        if not 0 <= self.mdts <= 15:
            raise ValueError("mdts must be 0..15")
        if not 1 <= self.msix_vectors <= 2048:
            raise ValueError("msix_vectors must be 1..2048")
        if not 0 <= self.cntlid <= 0xFFEF:
            raise ValueError("cntlid out of range")
        if len(self.subnqn.encode()) > 255:
            raise ValueError("subnqn longer than 255 bytes")

    @property
    def serial_field(self) -> str:
        return _pad(self.serial, 20)

    @property
    def model_field(self) -> str:
        return _pad(self.model, 40)

    @property
    def firmware_field(self) -> str:
        return _pad(self.firmware, 8)

    @property
    def max_transfer(self) -> int:
        """Largest data transfer of one command in bytes; 0 = no limit (MDTS 0, NVMe 5.15.2.1)."""
        return PAGE_SIZE << self.mdts if self.mdts else 0
