"""What the vfio-user request pipeline needs from a device: `VfioDevice`.

The pipeline (reactor/pipeline.py, run by reactor/session.py) owns the protocol: decoding, validation,
ordering, quiesce bracketing, DMA mapping in its own `MappedGuestMemory`, replies.
A device only answers questions and applies validated changes.  `DeviceBase`
supplies the optional parts (no quiesce needed, no features, no migration data) so a
device implements only what it has.

Errors: a device method may raise `ProtocolError(errno)`; the pipeline turns it into
the error reply for that request.  Any other exception is a bug in the device: the
pipeline logs it with the message id and replies EIO (the session survives).

fd ownership:
- `RegionInfo.fd` stays the device's: the pipeline only sends a copy (SCM_RIGHTS).
- `dma_mapped(..., fd)`: the fd stays the pipeline's and is closed at unmap/
  disconnect; a device that needs it longer (to pass it to a worker) must dup it.
- `set_irqs(..., fds)`: the fds belong to the device once the call returns
  normally; if it raises, the pipeline closes them.

Order on disconnect: quiesce -> dma_unmapped() for every region -> unmap -> resume
-> client_disconnected().  `client_connected` is called after VERSION succeeded.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vfio_user.errors import ProtocolError

if TYPE_CHECKING:
    from .session import Session


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    flags: int                 # vfio_user.wire.DeviceFlag: RESET | PCI
    num_regions: int
    num_irqs: int


@dataclass(frozen=True, slots=True)
class RegionInfo:
    size: int
    flags: int                              # RegionFlag READ/WRITE/MMAP
    sparse: tuple[tuple[int, int], ...] | None = None   # mmap areas (offset, size)
    cap_type: tuple[int, int] | None = None  # (type, subtype) for device-specific regions
    fd: int | None = None                    # backing fd for MMAP areas
    offset: int = 0                          # file offset of the region in fd


@dataclass(frozen=True, slots=True)
class IrqInfo:
    count: int
    flags: int                               # IrqInfoFlag


class VfioDevice(Protocol):
    def device_info(self) -> DeviceInfo: ...
    def region_info(self, index: int) -> RegionInfo: ...
    def irq_info(self, index: int) -> IrqInfo: ...
    def needs_quiesce(self, region: int, offset: int, data: bytes) -> bool: ...
    async def quiesce(self) -> None: ...
    async def resume(self) -> None: ...
    def region_read(self, region: int, offset: int, count: int) -> bytes: ...
    def region_write(self, region: int, offset: int, data: bytes) -> None: ...
    def dma_mapped(self, iova: int, size: int, offset: int, fd: int | None,
                   readable: bool, writable: bool) -> None: ...
    def dma_unmapped(self, iova: int, size: int) -> None: ...
    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: list[int], data: bytes) -> None: ...
    def reset(self) -> None: ...
    def client_connected(self, session: "Session") -> None: ...
    def client_disconnected(self) -> None: ...
    def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes: ...
    def mig_data_read(self, size: int) -> bytes: ...
    def mig_data_write(self, data: bytes) -> None: ...
    def dirty_pages(self, msg: Any, caps: Any) -> bytes: ...
    def unmap_dirty_bitmap(self, iova: int, size: int, pgsize: int, bitmap_size: int) -> bytes: ...


class DeviceBase:
    """Defaults for the optional parts of `VfioDevice`."""

    def needs_quiesce(self, region: int, offset: int, data: bytes) -> bool:
        return False

    def feature_needs_quiesce(self, flags: int, data: bytes) -> bool:
        """Optional hook: DEVICE_FEATURE SETs that change migration state do."""
        return False

    async def quiesce(self) -> None:
        return None

    async def resume(self) -> None:
        return None

    def dma_mapped(self, iova: int, size: int, offset: int, fd: int | None,
                   readable: bool, writable: bool) -> None:
        return None

    def dma_unmapped(self, iova: int, size: int) -> None:
        return None

    def client_connected(self, session: "Session") -> None:
        return None

    def client_disconnected(self) -> None:
        return None

    def reset(self) -> None:
        return None

    def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        raise ProtocolError(errno.EINVAL, "no device features")

    def dirty_pages(self, msg: Any, caps: Any) -> bytes:
        raise ProtocolError(errno.ENOTSUP, "no dirty page tracking")

    def unmap_dirty_bitmap(self, iova: int, size: int, pgsize: int, bitmap_size: int) -> bytes:
        raise ProtocolError(errno.EINVAL, "no dirty page tracking")

    def mig_data_read(self, size: int) -> bytes:
        raise ProtocolError(errno.EINVAL, "no migration")

    def mig_data_write(self, data: bytes) -> None:
        raise ProtocolError(errno.EINVAL, "no migration")
