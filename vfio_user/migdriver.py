"""Client-side migration drivers: what QEMU would send, over a `VfioUserClient`.

`V2Driver` follows reference §5 (libvfio-user samples/client.c's flow):
    source       SET PRE_COPY -> MIG_DATA_READ until a short read -> SET STOP_COPY
                 -> MIG_DATA_READ until a read returns 0 -> SET STOP
    destination  SET RESUMING -> MIG_DATA_WRITE every chunk in order -> SET STOP
                 -> SET RUNNING
    DMA logging  DEVICE_FEATURE SET DMA_LOGGING_START / GET REPORT / SET STOP

`V1Driver` follows §4.4, QEMU's v1 client of 2020-2022, to the letter:
    set_state(mask, value): REGION_READ device_state, new = (old & mask) | value,
        refuse an invalid combination, REGION_WRITE it; on failure re-read, and the
        error state (6) is fatal
    source       set_state(VALID, SAVING) [= pre-copy from RUNNING] -> iterate
                 (pending_bytes, then per chunk data_offset, data_size, the data) ->
                 the VM stops: set_state(~RUNNING, 0) -> complete: set_state(~RUNNING,
                 SAVING), chunks while pending > 0 (stop when data_size is 0) ->
                 set_state(~SAVING, 0); cancel: set_state(~SAVING, RUNNING)
    destination  set_state(~VALID, RESUMING) -> per chunk: data_offset, write the data
                 (split at the region's end), write data_size = bytes written (commit)
                 -> set_state(~VALID, RUNNING)
    Data moves through the sparse mmap area when the range lies in it, else through
    REGION_READ/REGION_WRITE (chunked by the transfer size).
    DIRTY_PAGES (14): START / STOP / GET_BITMAP, at the negotiated migration pgsize.

Both raise ProtocolError with the server's errno on an error reply.
"""
from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING

from .errors import ProtocolError
from .messages import DeviceFeature, DmaUnmap, UnmapBitmap
from .migmsg import (MIG_REGION_SUBTYPE, MIG_REGION_TYPE, REG_DATA_OFFSET, REG_DATA_SIZE,
                     REG_DEVICE_STATE, REG_PENDING_BYTES, DirtyPages, DirtyPagesFlag,
                     DmaLoggingReport, DmaLoggingStart, Feature, MigDeviceState,
                     decode_migration_flags)
from .wire import Command, DmaUnmapFlag, FeatureFlag, RegionFlag

if TYPE_CHECKING:
    from .client import VfioUserClient

# v2 states (enum vfio_device_mig_state)
ERROR, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY = 0, 1, 2, 3, 4, 6
# v1 device_state bits
V1_RUNNING, V1_SAVING, V1_RESUMING, V1_MASK = 1, 2, 4, 7
MASK32 = 0xFFFFFFFF


def bitmap_bytes(length: int, pgsize: int) -> int:
    return ((length + pgsize - 1) // pgsize + 63) // 64 * 8


class V2Driver:
    def __init__(self, client: "VfioUserClient", chunk: int = 1 << 20) -> None:
        self.c = client
        self.chunk = chunk

    def feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> DeviceFeature:
        return self.c.device_feature(flags, data, argsz)

    def migration_flags(self) -> int:
        r = self.feature(FeatureFlag.GET | Feature.MIGRATION, argsz=16)
        return decode_migration_flags(r.data)

    def get_state(self) -> int:
        r = self.feature(FeatureFlag.GET | Feature.MIG_DEVICE_STATE, argsz=16)
        return MigDeviceState.decode(r.data).device_state

    def set_state(self, state: int) -> None:
        self.feature(FeatureFlag.SET | Feature.MIG_DEVICE_STATE, MigDeviceState(state, -1).encode())

    def read_until_short(self) -> bytes:
        out = bytearray()
        while True:
            d = self.c.mig_data_read(self.chunk)
            out += d
            if len(d) < self.chunk:
                return bytes(out)

    def read_until_zero(self) -> bytes:
        out = bytearray()
        while True:
            d = self.c.mig_data_read(self.chunk)
            if not d:
                return bytes(out)
            out += d

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            self.c.mig_data_write(data[i:i + self.chunk])

    # the flows ---------------------------------------------------------------------
    def precopy(self) -> bytes:
        self.set_state(PRE_COPY)
        return self.read_until_short()

    def stop_copy(self) -> bytes:
        self.set_state(STOP_COPY)
        data = self.read_until_zero()
        self.set_state(STOP)
        return data

    def resume_begin(self) -> None:
        self.set_state(RESUMING)

    def resume_end(self) -> None:
        self.set_state(STOP)
        self.set_state(RUNNING)

    # DMA logging --------------------------------------------------------------------
    def log_start(self, page_size: int = 4096, ranges: tuple[tuple[int, int], ...] = ()) -> int:
        r = self.feature(FeatureFlag.SET | Feature.DMA_LOGGING_START,
                         DmaLoggingStart(page_size, ranges).encode())
        return DmaLoggingStart.decode(r.data).page_size

    def log_report(self, iova: int, length: int, page_size: int = 4096) -> bytes:
        req = DmaLoggingReport(iova, length, page_size).encode()
        argsz = 8 + len(req) + bitmap_bytes(length, page_size)
        r = self.feature(FeatureFlag.GET | Feature.DMA_LOGGING_REPORT, req, argsz)
        return DmaLoggingReport.decode(r.data).bitmap

    def log_stop(self) -> None:
        self.feature(FeatureFlag.SET | Feature.DMA_LOGGING_STOP)


class V1Driver:
    def __init__(self, client: "VfioUserClient", use_mmap: bool = True) -> None:
        self.c = client
        n = client.get_device_info().num_regions
        self.index = -1
        for i in range(8, n):
            info, fd = client.get_region_info(i)
            if info.cap_type == (MIG_REGION_TYPE, MIG_REGION_SUBTYPE):
                self.index, self.size, self.info = i, info.size, info
                break
            if fd is not None:
                os.close(fd)
        if self.index < 0:
            raise ProtocolError(errno.ENODEV, "no migration region (type 3 / subtype 1)")
        self.areas: list[tuple[int, int, mmap.mmap]] = []     # (region offset, size, map)
        if fd is not None:
            if use_mmap and info.flags & RegionFlag.MMAP and info.sparse:
                for off, size in info.sparse:
                    if size:
                        self.areas.append((off, size, mmap.mmap(fd, size, mmap.MAP_SHARED,
                                                                mmap.PROT_READ | mmap.PROT_WRITE,
                                                                offset=info.offset + off)))
            os.close(fd)
        self.xfer = int(client.server_caps.get("max_data_xfer_size", 1 << 20))

    def close(self) -> None:
        for _, _, mm in self.areas:
            mm.close()
        self.areas.clear()

    # registers ----------------------------------------------------------------------
    def _rd(self, off: int, n: int) -> int:
        return int.from_bytes(self.c.region_read(self.index, off, n), "little")

    def _wr(self, off: int, v: int, n: int) -> None:
        self.c.region_write(self.index, off, v.to_bytes(n, "little"))

    def state(self) -> int:
        return self._rd(REG_DEVICE_STATE, 4)

    def set_state(self, mask: int, value: int) -> int:
        old = self._rd(REG_DEVICE_STATE, 4)
        new = ((old & mask) | value) & MASK32
        bits = new & V1_MASK
        if bits & V1_RESUMING and bits & ~V1_RESUMING:
            raise ProtocolError(errno.EINVAL, f"device_state {new:#x} is not valid (v1 VALID())")
        try:
            self._wr(REG_DEVICE_STATE, new, 4)
        except ProtocolError:
            if self._rd(REG_DEVICE_STATE, 4) & V1_MASK == V1_SAVING | V1_RESUMING:
                raise ProtocolError(errno.EIO, "device in the v1 error state") from None
            raise
        return new

    def pending(self) -> int:
        return self._rd(REG_PENDING_BYTES, 8)

    # data ---------------------------------------------------------------------------
    def _area(self, off: int, n: int) -> tuple[mmap.mmap, int] | None:
        for aoff, asize, mm in self.areas:
            if aoff <= off and off + n <= aoff + asize:
                return mm, off - aoff
        return None

    def _read_data(self, off: int, n: int) -> bytes:
        a = self._area(off, n)
        if a is not None:
            mm, o = a
            return bytes(mm[o:o + n])
        out = bytearray()
        for pos in range(0, n, self.xfer):
            out += self.c.region_read(self.index, off + pos, min(self.xfer, n - pos))
        return bytes(out)

    def _write_data(self, off: int, data: bytes) -> None:
        a = self._area(off, len(data))
        if a is not None:
            mm, o = a
            mm[o:o + len(data)] = data
            return
        for pos in range(0, len(data), self.xfer):
            self.c.region_write(self.index, off + pos, data[pos:pos + self.xfer])

    def save_buffer(self) -> bytes:
        """One buffer step: data_offset (the device prepares a chunk), data_size, data."""
        off = self._rd(REG_DATA_OFFSET, 8)
        size = self._rd(REG_DATA_SIZE, 8)
        return self._read_data(off, size) if size else b""

    # the flows ------------------------------------------------------------------------
    def save_setup(self) -> None:
        self.set_state(V1_MASK, V1_SAVING)           # RUNNING -> RUNNING|SAVING (pre-copy)

    def save_iterate(self) -> list[bytes]:
        """Pre-copy: buffer steps while pending_bytes says there is data."""
        chunks: list[bytes] = []
        while self.pending():
            c = self.save_buffer()
            if not c:
                break
            chunks.append(c)
        return chunks

    def vm_stopped(self) -> None:
        self.set_state(~V1_RUNNING & MASK32, 0)

    def save_complete(self) -> list[bytes]:
        self.set_state(~V1_RUNNING & MASK32, V1_SAVING)
        chunks: list[bytes] = []
        pending = self.pending()
        while pending > 0:
            c = self.save_buffer()
            if not c:
                break
            chunks.append(c)
            pending = self.pending()
        self.set_state(~V1_SAVING & MASK32, 0)
        return chunks

    def cancel(self) -> None:
        self.set_state(~V1_SAVING & MASK32, V1_RUNNING)

    def load_setup(self) -> None:
        self.set_state(~V1_MASK & MASK32, V1_RESUMING)

    def load_buffer(self, chunk: bytes) -> None:
        pos = 0
        while pos < len(chunk):
            off = self._rd(REG_DATA_OFFSET, 8)
            n = min(len(chunk) - pos, self.size - off)
            if n <= 0:
                raise ProtocolError(errno.EINVAL, f"data_offset {off:#x} leaves no room")
            self._write_data(off, chunk[pos:pos + n])
            self._wr(REG_DATA_SIZE, n, 8)             # the commit
            pos += n

    def vm_started(self) -> None:
        self.set_state(~V1_MASK & MASK32, V1_RUNNING)

    # DIRTY_PAGES (14) ---------------------------------------------------------------
    def dirty(self, flags: int) -> None:
        self.c.request(Command.DIRTY_PAGES, DirtyPages(8, flags).encode()).close()

    def unmap_dirty(self, iova: int, size: int, pgsize: int = 4096) -> bytes:
        """DMA_UNMAP with GET_DIRTY_BITMAP: unmap the region, get its dirty bitmap."""
        bms = bitmap_bytes(size, pgsize)
        req = DmaUnmap(DmaUnmap.SIZE + UnmapBitmap.SIZE + bms, DmaUnmapFlag.GET_DIRTY_BITMAP,
                       iova, size).encode() + UnmapBitmap(pgsize, bms).encode()
        frame = self.c.request(Command.DMA_UNMAP, req)
        r = UnmapBitmap.decode(frame.payload)
        frame.close()
        if r.pgsize != pgsize or r.size != bms or len(r.bitmap) != bms:
            raise ProtocolError(errno.EPROTO, "DMA_UNMAP reply bitmap size")
        return r.bitmap

    def dirty_bitmap(self, iova: int, size: int, pgsize: int = 4096) -> bytes:
        bms = bitmap_bytes(size, pgsize)
        req = DirtyPages(8 + 32 + bms, DirtyPagesFlag.GET_BITMAP, iova, size, pgsize, bms)
        frame = self.c.request(Command.DIRTY_PAGES, req.encode())
        r = DirtyPages.decode_reply(frame.payload)
        frame.close()
        if r.bitmap_size != bms or len(r.bitmap) != bms:
            raise ProtocolError(errno.EPROTO, "DIRTY_PAGES reply bitmap size")
        return r.bitmap
