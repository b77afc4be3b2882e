"""A real VfioUserServer in a thread, a demo device, and a connected client.

The demo device (BAR0 16 KiB: scratch registers below 0x1000 that accept only
4/8-byte aligned accesses, a doorbell sparse-mmap area [0x1000, 0x4000) backed by a
memfd; MSI-X table in BAR4 and PBA in BAR5, not mmapped; 4 KiB config space) is
built for these tests only.  A few scratch registers drive server->client DMA:

    0x100 DMA_ADDR (8)  0x108 DMA_LEN (4)  0x10C DMA_CMD (4): 1 = read, 2 = write
    0x110 DMA_STATUS (4): 0 idle, 1 busy, 2 done, 0x100 | errno failed
    0x200 QUIESCE_REG (4): writes need a quiesce
"""
from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
import threading
from typing import Any

import pytest

from reactor.device import DeviceBase, DeviceInfo, IrqInfo, RegionInfo
from reactor.server import VfioUserServer
from vfio_user.client import VfioUserClient
from vfio_user.errors import ProtocolError
from vfio_user.wire import DeviceFlag, Irq, IrqInfoFlag, Region, RegionFlag

BAR0_SIZE = 0x4000
DB_START = 0x1000
MSIX_VECTORS = 16
RW = RegionFlag.READ | RegionFlag.WRITE


class DemoDevice(DeviceBase):
    def __init__(self) -> None:
        self.bar0_fd = os.memfd_create("demo-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.bar0_fd, BAR0_SIZE)
        self.bar0_mm = mmap.mmap(self.bar0_fd, BAR0_SIZE)
        self.regs = bytearray(DB_START)
        self.config = self._make_config()
        self.bar4 = bytearray(0x1000)
        self.bar5 = bytearray(0x1000)
        self.events: list[tuple[Any, ...]] = []
        self.irq_fds: dict[tuple[int, int], int] = {}
        self.session: Any = None
        self.quiesce_delay = 0.0
        self.quiesce_error: int | None = None
        self.dma_result = b""
        self.dma_payload = b""
        self.mig_out = bytearray(b"migration-state-blob" * 10)
        self.mig_in = bytearray()
        self.tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _make_config() -> Any:
        from pci.config import PciConfig
        return PciConfig(bar0_size=BAR0_SIZE, msix_vectors=MSIX_VECTORS)

    def close(self) -> None:
        self.bar0_mm.close()
        os.close(self.bar0_fd)
        for fd in self.irq_fds.values():
            os.close(fd)
        self.irq_fds.clear()

    # --- description --------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(DeviceFlag.RESET | DeviceFlag.PCI, 10, 5)

    def region_info(self, index: int) -> RegionInfo:
        if index == Region.BAR0:
            return RegionInfo(BAR0_SIZE, RW | RegionFlag.MMAP,
                              sparse=((DB_START, BAR0_SIZE - DB_START),), fd=self.bar0_fd)
        if index in (Region.BAR4, Region.BAR5):
            return RegionInfo(0x1000, RW)
        if index == Region.CONFIG:
            return RegionInfo(0x1000, RW)
        return RegionInfo(0, 0)

    def irq_info(self, index: int) -> IrqInfo:
        counts = {Irq.INTX: 1, Irq.MSI: 0, Irq.MSIX: MSIX_VECTORS, Irq.ERR: 1, Irq.REQ: 1}
        flags = IrqInfoFlag.EVENTFD | (IrqInfoFlag.NORESIZE if index == Irq.MSIX else 0)
        return IrqInfo(counts[index], flags)

    # --- quiesce --------------------------------------------------------------
    def needs_quiesce(self, region: int, offset: int, data: bytes) -> bool:
        return region == Region.BAR0 and offset == 0x200

    async def quiesce(self) -> None:
        self.events.append(("quiesce",))
        if self.quiesce_delay:
            await asyncio.sleep(self.quiesce_delay)
        if self.quiesce_error is not None:
            raise ProtocolError(self.quiesce_error, "demo quiesce failure")

    async def resume(self) -> None:
        self.events.append(("resume",))

    # --- regions ----------------------------------------------------------------
    def _bar0_check(self, offset: int, count: int) -> None:
        if offset < DB_START and (count not in (4, 8) or offset % count):
            raise ProtocolError(errno.EINVAL, "registers take aligned 4/8-byte accesses")
        if offset < DB_START < offset + count:
            raise ProtocolError(errno.EINVAL, "access crosses into the doorbells")

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        self.events.append(("read", region, offset, count))
        if region == Region.BAR0:
            self._bar0_check(offset, count)
            if offset >= DB_START:
                return bytes(self.bar0_mm[offset:offset + count])
            return bytes(self.regs[offset:offset + count])
        if region == Region.CONFIG:
            return self.config.read(offset, count)
        if region == Region.BAR4:
            return bytes(self.bar4[offset:offset + count])
        if region == Region.BAR5:
            return bytes(self.bar5[offset:offset + count])
        raise ProtocolError(errno.EINVAL, "no such region")

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.events.append(("write", region, offset, bytes(data)))
        if region == Region.BAR0:
            self._bar0_check(offset, len(data))
            if offset >= DB_START:
                self.bar0_mm[offset:offset + len(data)] = data
                return
            self.regs[offset:offset + len(data)] = data
            if offset == 0x10C:
                self._start_dma(struct.unpack("<I", data[:4])[0])
            return
        if region == Region.CONFIG:
            self.config.write(offset, data)
        elif region == Region.BAR4:
            self.bar4[offset:offset + len(data)] = data
        elif region != Region.BAR5:       # PBA writes are dropped
            raise ProtocolError(errno.EINVAL, "no such region")

    def _status(self, v: int) -> None:
        struct.pack_into("<I", self.regs, 0x110, v)

    def _start_dma(self, cmd: int) -> None:
        addr = struct.unpack_from("<Q", self.regs, 0x100)[0]
        length = struct.unpack_from("<I", self.regs, 0x108)[0]
        self._status(1)

        async def run() -> None:
            try:
                if cmd == 1:
                    self.dma_result = await self.session.dma_read(addr, length)
                else:
                    await self.session.dma_write(addr, self.dma_payload[:length])
                self._status(2)
            except ProtocolError as e:
                self._status(0x100 | e.errno)
        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- DMA / IRQs / lifecycle ---------------------------------------------------
    def dma_mapped(self, iova: int, size: int, offset: int, fd: int | None,
                   readable: bool, writable: bool) -> None:
        self.events.append(("map", iova, size, fd is not None, readable, writable))

    def dma_unmapped(self, iova: int, size: int) -> None:
        self.events.append(("unmap", iova, size))

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: list[int], data: bytes) -> None:
        self.events.append(("irqs", index, flags, start, count, len(fds), data))
        for i in range(count):
            old = self.irq_fds.pop((index, start + i), None)
            if old is not None:
                os.close(old)
        if count == 0:
            for key in [k for k in self.irq_fds if k[0] == index]:
                os.close(self.irq_fds.pop(key))
        for i, fd in enumerate(fds):
            self.irq_fds[(index, start + i)] = fd

    def trigger(self, index: int, vector: int) -> None:
        os.eventfd_write(self.irq_fds[(index, vector)], 1)

    def reset(self) -> None:
        self.events.append(("reset",))
        self.regs[:] = bytes(len(self.regs))
        self.config.reset()

    def client_connected(self, session: Any) -> None:
        self.events.append(("connected",))
        self.session = session

    def client_disconnected(self) -> None:
        self.events.append(("disconnected",))
        self.session = None
        for fd in self.irq_fds.values():
            os.close(fd)
        self.irq_fds.clear()

    def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        if flags & 0xFFFF == 1 and flags & (1 << 16):
            return struct.pack("<Q", 1)
        raise ProtocolError(errno.EINVAL, "feature not supported")

    def mig_data_read(self, size: int) -> bytes:
        out = bytes(self.mig_out[:size])
        del self.mig_out[:size]
        return out

    def mig_data_write(self, data: bytes) -> None:
        self.mig_in += data


class ServerThread:
    """An asyncio loop in a thread running one VfioUserServer."""

    def __init__(self, path: str, device: DemoDevice, dma_timeout: float = 2.0) -> None:
        self.path = path
        self.device = device
        self.loop = asyncio.new_event_loop()
        self.server = VfioUserServer(path, device, dma_timeout=dma_timeout)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._started.set()
                return
            self._started.set()
            await self.server.serve_forever()
        self.loop.run_until_complete(main())

    def start(self) -> "ServerThread":
        self.thread.start()
        self._started.wait(5)
        if self._error:
            raise self._error
        return self

    def call(self, fn: Any, timeout: float = 5.0) -> Any:
        """Run fn() (or await it, if it returns a coroutine) on the server loop."""
        async def wrap() -> Any:
            r = fn()
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no client session is active."""
        async def idle() -> None:
            while self.server.session is not None:
                await asyncio.sleep(0.01)
        self.call(idle, timeout)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(self.server.close)
            self.thread.join(5)
        self.loop.close()


@pytest.fixture
def device():
    d = DemoDevice()
    yield d
    d.close()


@pytest.fixture
def server(tmp_path, device):
    st = ServerThread(str(tmp_path / "ctrl.sock"), device).start()
    yield st
    st.stop()
    assert not os.path.exists(st.path)


@pytest.fixture
def raw_client(server):
    c = VfioUserClient(server.path, timeout=3.0)
    yield c
    c.close()


@pytest.fixture
def client(raw_client):
    raw_client.negotiate()
    return raw_client
