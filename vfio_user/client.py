"""A blocking vfio-user test client over a real UNIX socket.

It plays QEMU's part for the protocol tests: negotiate, query regions/IRQs, map
guest memory (memfd `GuestRam` or fd-less buffers), drive region accesses, reset.
Server->client DMA_READ/DMA_WRITE requests are served *inline* from `dma_buffers`
(iova -> buffer) whenever the client is waiting for something (a reply, `poll()`),
in QEMU's layout or the spec's (`dma_layout`), like QEMU which answers them from its
main loop even while a vCPU waits for a reply.

Replies arriving for another outstanding request are stashed, so tests can pipeline
several requests and collect the replies in any order.  `send_raw` / `recv_message`
give bad-input tests full control of the bytes.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import scm
from .dmamsg import DmaLayout, DmaRw, encode_read_reply, encode_write_reply
from .errors import ProtocolError
from .framing import Frame, Framer, close_fds
from .messages import (DeviceFeature, DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfoMsg, MigData,
                       RegionAccess, RegionInfoReply, RegionInfoRequest, SetIrqs, Version)
from .negotiate import parse_server_version
from .wire import (HEADER_SIZE, Command, DmaMapFlag, Header, HeaderFlag, IrqSetFlag, MsgType)

QEMU_VERSION_JSON = (
    '{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    '"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    '"pgsize": 4096}, "write_multiple": true}}')
SPEC_VERSION_JSON = '{"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1048576}}'

_DEFAULT = object()
PAGE = 4096


LOW_MEMORY_END = 1 << 20


class GuestRam:
    """The guest RAM of every client we drive (tests, benchmarks, host drivers).

    A memfd of `size` bytes sealed against shrinking and growing, as QEMU's
    memory-backend-memfd does by default (vnvmed refuses an unsealed memfd: a client
    could truncate it under a worker, SIGBUS), mapped here too.  Guest addresses
    (iova) start at `base`; `alloc()` hands out aligned chunks (page 0 stays unused:
    address 0 is a classic bug magnet), `view()` is a memoryview at an iova.
    """

    def __init__(self, size: int, base: int = 0, name: str = "guest-ram", seal: bool = True) -> None:
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
        self.fd = os.memfd_create(name, flags)
        self.size = size
        self.base = base
        self._next = PAGE
        if base < LOW_MEMORY_END and size >= 4 * LOW_MEMORY_END:
            # Like Linux on x86 (which reserves the first MiB), keep rings and buffers
            # above 1 MiB: vnvmed sends read data bound for low memory by DMA_WRITE
            # (firmware code under TCG, nvme/msgwindow.py), which a client serves only
            # for buffers registered with add_dma_buffer.
            self._next = LOW_MEMORY_END - base
        os.ftruncate(self.fd, size)
        if seal:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def alloc(self, n: int, align: int = PAGE) -> int:
        """iova of `n` fresh bytes aligned to `align` (MemoryError when exhausted)."""
        off = (self._next + align - 1) // align * align
        if off + n > self.size:
            raise MemoryError(f"guest RAM of {self.size} bytes exhausted")
        self._next = off + n
        return self.base + off

    def view(self, addr: int, n: int) -> memoryview:
        off = addr - self.base
        return memoryview(self.mm)[off:off + n]

    def close(self) -> None:
        """Unmap and close.  BufferError while a view is still held: drop it, call again."""
        if not self.mm.closed:
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "GuestRam":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(slots=True)
class DmaBuffer:
    iova: int
    buf: Any            # bytearray / mmap / memoryview
    writable: bool = True


class VfioUserClient:
    def __init__(self, path: str | None = None, *, timeout: float = 5.0,
                 dma_layout: DmaLayout = DmaLayout.SPEC, max_xfer: int = 1 << 20) -> None:
        self.sock: socket.socket | None = None
        self.timeout = timeout
        self.dma_layout = dma_layout
        self.max_xfer = max_xfer
        self.dma_buffers: list[DmaBuffer] = []
        self.dma_served: list[tuple[int, int, int]] = []     # (command, addr, count)
        self.server_caps: dict[str, Any] = {}
        self.server_max_fds = 1
        self._framer = Framer(64 << 20)
        self._ready: list[Frame] = []
        self._stash: dict[int, Frame] = {}
        self._next_id = 1
        self._request_lock = threading.RLock()
        self.eof = False
        if path is not None:
            self.connect(path)

    # ------------------------------------------------------------ plumbing
    def connect(self, path: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        s.connect(os.fspath(path))
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._framer.close()
        for f in self._ready + list(self._stash.values()):
            f.close()
        self._ready.clear()
        self._stash.clear()

    def __enter__(self) -> "VfioUserClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _alloc_id(self) -> int:
        mid = self._next_id
        self._next_id = (self._next_id + 1) & 0x7FFF
        return mid

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        assert self.sock is not None
        pending = list(fds)
        view = memoryview(data)
        while view:
            n = scm.send(self.sock, view, pending)
            pending = []          # the fds went with the first byte
            view = view[n:]

    def send(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = 0, msg_id: int | None = None) -> int:
        mid = self._alloc_id() if msg_id is None else msg_id
        self.send_raw(Header(mid, command, HEADER_SIZE + len(payload), flags).encode() + payload,
                      fds)
        return mid

    def _fill(self, deadline: float) -> None:
        """Receive one chunk (blocking until deadline); EOF sets self.eof."""
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no message from the server")
        self.sock.settimeout(left)
        try:
            got = scm.recv(self.sock, 1 << 20, 64)
            data, fds = got.data, got.fds
        except socket.timeout:
            raise TimeoutError("no message from the server") from None
        except ConnectionResetError:
            data, fds = b"", []
        if not data:
            close_fds(fds)
            self.eof = True
            raise ConnectionError("server closed the connection")
        self._ready.extend(self._framer.feed(data, fds))

    def recv_message(self, timeout: float | None = None) -> Frame:
        """The next message from the server, whatever it is (no DMA serving)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._ready:
            self._fill(deadline)
        return self._ready.pop(0)

    def expect_eof(self, timeout: float = 2.0) -> bool:
        """True if the server closes the connection (serving DMA meanwhile)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._dispatch(self.recv_message(max(0.0, deadline - time.monotonic())))
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def _dispatch(self, frame: Frame) -> None:
        if frame.header.msg_type == MsgType.COMMAND:
            self._serve(frame)
        else:
            self._stash[frame.header.msg_id] = frame

    def recv_reply(self, msg_id: int, timeout: float | None = None) -> Frame:
        """Wait for the reply to `msg_id`, serving server DMA requests meanwhile."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while msg_id not in self._stash:
            self._dispatch(self.recv_message(max(0.0, deadline - time.monotonic())))
        return self._stash.pop(msg_id)

    def poll(self, duration: float) -> None:
        """Serve server requests for `duration` seconds."""
        deadline = time.monotonic() + duration
        while True:
            try:
                self._dispatch(self.recv_message(max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                return

    def request(self, command: int, payload: bytes = b"",
                fds: list[int] | tuple[int, ...] = ()) -> Frame:
        """Send, wait for the reply; an error reply raises ProtocolError(errno).  One
        request at a time per client: a guest's vCPU thread (trapped doorbells) and the
        migration driver may share it, as QEMU's vCPUs and migration thread share one."""
        with self._request_lock:
            frame = self.recv_reply(self.send(command, payload, fds))
        h = frame.header
        if h.command != command:
            frame.close()
            raise ProtocolError(errno.EPROTO, f"reply for command {h.command}, sent {command}")
        if h.is_error:
            frame.close()
            raise ProtocolError(h.error, f"server error reply to {Command(command).name}")
        return frame

    # -------------------------------------------------- server -> client DMA
    def add_dma_buffer(self, iova: int, buf: Any, writable: bool = True) -> None:
        self.dma_buffers.append(DmaBuffer(iova, buf, writable))

    def _find_buf(self, addr: int, count: int, write: bool) -> tuple[Any, int]:
        for b in self.dma_buffers:
            if b.iova <= addr and addr + count <= b.iova + len(b.buf):
                if write and not b.writable:
                    raise ProtocolError(errno.EPERM, "read-only")
                return b.buf, addr - b.iova
        raise ProtocolError(errno.EFAULT, "not guest memory")

    def _serve(self, frame: Frame) -> None:
        h = frame.header
        try:
            if frame.fds:
                raise ProtocolError(errno.EINVAL, "fds on a DMA request")
            if h.command not in (Command.DMA_READ, Command.DMA_WRITE):
                raise ProtocolError(errno.ENOSYS, "not a server request")
            req = DmaRw.decode(frame.payload, h.command, self.dma_layout, self.max_xfer)
            self.dma_served.append((h.command, req.address, req.count))
            buf, off = self._find_buf(req.address, req.count, h.command == Command.DMA_WRITE)
            if h.command == Command.DMA_READ:
                payload = encode_read_reply(req.address, bytes(buf[off:off + req.count]),
                                            self.dma_layout)
            else:
                buf[off:off + req.count] = req.data
                payload = encode_write_reply(req.address, req.count, self.dma_layout)
            if not h.no_reply:
                self.send_raw(h.reply(len(payload)).encode() + payload)
        except ProtocolError as e:
            if not h.no_reply:
                self.send_raw(h.error_reply(e.errno).encode())
        finally:
            frame.close()

    # ------------------------------------------------------------ commands
    def negotiate(self, json: Any = _DEFAULT, major: int = 0, minor: int = 0) -> dict[str, Any]:
        text = QEMU_VERSION_JSON if json is _DEFAULT else json
        frame = self.request(Command.VERSION, Version(major, minor, text).encode())
        _, caps = parse_server_version(frame.payload)
        self.server_caps = caps
        self.server_max_fds = int(caps.get("max_msg_fds", 1))
        return caps

    def get_device_info(self) -> DeviceInfoMsg:
        return DeviceInfoMsg.decode(
            self.request(Command.DEVICE_GET_INFO, DeviceInfoMsg(16).encode()).payload)

    def get_region_info(self, index: int, argsz: int = 32) -> tuple[RegionInfoReply, int | None]:
        """Like QEMU: ask with argsz 32, retry with the argsz the server needs."""
        while True:
            frame = self.request(Command.DEVICE_GET_REGION_INFO,
                                 RegionInfoRequest(argsz, index).encode())
            info = RegionInfoReply.decode(frame.payload)
            fds = frame.take_fds()
            if info.argsz > argsz:
                close_fds(fds)
                argsz = info.argsz
                continue
            for extra in fds[1:]:
                os.close(extra)
            return info, (fds[0] if fds else None)

    def get_irq_info(self, index: int) -> IrqInfoMsg:
        return IrqInfoMsg.decode(self.request(Command.DEVICE_GET_IRQ_INFO,
                                              IrqInfoMsg(16, 0, index).encode()).payload)

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: list[int] | tuple[int, ...] = (), data: bytes = b"") -> None:
        """SET_IRQS; eventfds are chunked by the server's max_msg_fds like QEMU."""
        if not fds:
            self.request(Command.DEVICE_SET_IRQS,
                         SetIrqs(20 + len(data), flags, index, start, count, data).encode())
            return
        step = max(1, self.server_max_fds)
        for pos in range(0, len(fds), step):
            chunk = list(fds[pos:pos + step])
            self.request(Command.DEVICE_SET_IRQS,
                         SetIrqs(20, flags, index, start + pos, len(chunk)).encode(), chunk)

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE) -> None:
        self.request(Command.DMA_MAP, DmaMap(32, flags, offset, iova, size).encode(),
                     [fd] if fd is not None else [])

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> DmaUnmap:
        return DmaUnmap.decode(self.request(Command.DMA_UNMAP,
                                            DmaUnmap(24, flags, iova, size).encode()).payload)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        frame = self.request(Command.REGION_READ, RegionAccess(offset, region, count).encode())
        r = RegionAccess.decode(frame.payload, with_data=True, max_xfer=1 << 26)
        if r.count != count or r.offset != offset or r.region != region:
            raise ProtocolError(errno.EPROTO, "REGION_READ reply does not match")
        return r.data

    def region_write(self, region: int, offset: int, data: bytes) -> RegionAccess:
        frame = self.request(Command.REGION_WRITE,
                             RegionAccess(offset, region, len(data), bytes(data)).encode())
        return RegionAccess.decode(frame.payload, with_data=False, max_xfer=1 << 26)

    def region_write_noreply(self, region: int, offset: int, data: bytes) -> int:
        return self.send(Command.REGION_WRITE,
                         RegionAccess(offset, region, len(data), bytes(data)).encode(),
                         flags=HeaderFlag.NO_REPLY)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    def device_feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> DeviceFeature:
        a = argsz if argsz is not None else 8 + len(data)
        return DeviceFeature.decode(self.request(Command.DEVICE_FEATURE,
                                                 DeviceFeature(a, flags, data).encode()).payload)

    def mig_data_read(self, size: int) -> bytes:
        frame = self.request(Command.MIG_DATA_READ, MigData(8 + size, size).encode())
        return MigData.decode_reply(frame.payload).data

    def mig_data_write(self, data: bytes) -> None:
        self.request(Command.MIG_DATA_WRITE, MigData(8 + len(data), len(data), data).encode())


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


__all__ = ["GuestRam", "VfioUserClient", "QEMU_VERSION_JSON", "SPEC_VERSION_JSON",
           "DmaLayout", "IrqSetFlag", "eventfd"]
