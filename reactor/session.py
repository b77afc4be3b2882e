"""One connected vfio-user client: reader, ordered request FIFO, server->client DMA.

Theory of operation
-------------------
Two tasks per connection:

- the **reader** pulls (bytes, fds) off the socket, frames them, and routes every
  message at once: *replies* (to our DMA_READ/DMA_WRITE requests) complete the
  matching pending future immediately, so they are never stuck behind a request
  that awaits a quiesce; *commands* go into a FIFO.  A reply that matches nothing
  pending (late, duplicated, forged) is dropped and logged.
- the **pipeline** task takes commands from the FIFO one by one (`Pipeline.process`),
  which gives the strict arrival-order processing QEMU relies on (posted writes).

`dma_read`/`dma_write` are for the device's own tasks (never for a pipeline handler,
which would stall the client's commands behind the client's own answer: reference
§6.9 deadlock).  They chunk by min(client's max_data_xfer_size, ours), time out with
ETIMEDOUT, and cope with QEMU 10.1's off-spec layout (vfio_user/dmamsg.py): VERSION
does not tell it from QEMU 11.1's spec layout, so it is proven by the first DMA_WRITE
reply or DMA_READ reply that can tell (a 1-byte probe read when one cannot).

Teardown (EOF, stream error or `abort()`): stop reading, drop queued commands
(closing their fds), let the command in progress finish, fail pending DMA requests
with ENOTCONN, then quiesce -> dma_unmapped() for each region -> unmap all -> close
the DMA fds -> resume -> device.client_disconnected().

Handing the connection to another process (reactor/connmove.py): `inject()` puts a
barrier into the FIFO, so it is reached between two commands, after every command
received before it has been answered; `hold_reading()` stops the reader between two
`recvmsg` calls (bytes the client sends meanwhile wait in the socket buffer), and
`resume_reading()` goes on where it stopped.  Frames read but not yet processed are
still in the FIFO (`queued_frames()`), a partial message in the framer.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import TYPE_CHECKING, Protocol

from vfio_user.dmamsg import (DmaLayout, DmaRw, decode_read_reply, probe_address, probe_layout,
                              write_reply_layout)
from vfio_user.errors import ProtocolError, StreamError
from vfio_user.negotiate import SERVER_MAX_XFER, ClientCaps
from vfio_user.wire import HEADER_SIZE, Command, Header, MsgType, command_name

from .guestmem import MappedGuestMemory
from .pipeline import Pipeline
from .transport import Frame, Framer, Transport, close_fds, peer_hung_up, whole_frames

if TYPE_CHECKING:
    from .device import VfioDevice

log = logging.getLogger("vnvmed.vfio")
# Client-triggered lines are rate-limited per key (ops.logsetup.RateLimitFilter): a
# client reconnecting in a loop must not flood the log.
_RL_CONN = {"ratelimit": "vfio-user client negotiated"}
_RL_GONE = {"ratelimit": "vfio-user client closed"}
_RL_SEND = {"ratelimit": "vfio-user reply not sent"}
_RL_STREAM = {"ratelimit": "vfio-user stream unusable"}
_RL_REPLY = {"ratelimit": "vfio-user stray reply"}

# Largest message we accept: a full-size REGION_WRITE / MIG_DATA_WRITE / DMA_READ
# reply plus its fixed fields, with room to spare.
MAX_MESSAGE = SERVER_MAX_XFER + 4096
QUEUE_DEPTH = 4096


class Barrier(Protocol):
    """Something the pipeline runs in order, between two commands (see connmove)."""

    async def reached(self) -> None: ...
    def close(self) -> None: ...


class Session:
    def __init__(self, sock: socket.socket, device: "VfioDevice", *,
                 dma_timeout: float = 5.0, name: str = "vfio-user") -> None:
        self.device = device
        self.name = name
        self.transport = Transport(sock)
        self.framer = Framer(MAX_MESSAGE)
        self.memory = MappedGuestMemory()
        self.client_caps: ClientCaps | None = None
        self.dma_fds: dict[int, int | None] = {}       # iova -> fd we keep until unmap
        self.dma_timeout = dma_timeout
        self.dma_layout: DmaLayout | None = None         # proven by a DMA_READ reply
        self._queue: asyncio.Queue[Frame | Barrier | None] = asyncio.Queue(QUEUE_DEPTH)
        self._pending: dict[int, tuple[int, asyncio.Future[Frame]]] = {}
        self._next_id = 0x8000
        self._pipeline = Pipeline(self)
        self._reader_task: asyncio.Task[None] | None = None
        self._connected = False
        self._closed = False
        self._holding = False                 # hold_reading(): no recvmsg until resumed
        self._reading = asyncio.Event()
        self._reading.set()
        self._in_recv = False                 # the reader waits in recv_chunk (cancellable)

    # ------------------------------------------------------------- state
    @property
    def leaving(self) -> bool:
        """The client is gone or going: teardown runs, or its hang-up is pending."""
        if self._closed or (self._reader_task is not None and self._reader_task.done()):
            return True
        return peer_hung_up(self.transport.sock)

    @property
    def negotiated(self) -> bool:
        return self.client_caps is not None

    def on_negotiated(self, caps: ClientCaps) -> None:
        self.client_caps = caps
        log.info("%s: client negotiated (max_msg_fds=%d, max_xfer=%d, qemu=%s)", self.name,
                 caps.max_msg_fds, caps.max_data_xfer_size, caps.qemu_flavour, extra=_RL_CONN)
        self._connected = True
        self.device.client_connected(self)

    async def send_reply(self, header: Header, payload: bytes = b"",
                         fds: tuple[int, ...] | list[int] = ()) -> None:
        try:
            await self.transport.send(header, payload, fds)
        except OSError as e:
            log.info("%s: msg %d reply not sent: %s", self.name, header.msg_id, e, extra=_RL_SEND)

    # ------------------------------------------------------------- run
    async def run(self) -> None:
        """Serve until the client goes away (or `abort()`); then tear down."""
        self._reader_task = asyncio.create_task(self._reader())
        pipe = asyncio.create_task(self._run_pipeline())
        try:
            try:
                await self._reader_task
            except asyncio.CancelledError:
                if not self._closed:
                    raise
            self._closed = True
            try:
                self.transport.sock.shutdown(socket.SHUT_RDWR)   # wakes blocked sends
            except OSError:
                pass
            self._drop_queued()
            self._queue.put_nowait(None)
            await pipe
        finally:
            self._closed = True
            if not pipe.done():
                pipe.cancel()
            for _, fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ProtocolError(errno.ENOTCONN, "client disconnected"))
            self._pending.clear()
            self._drop_queued()
            self.framer.close()
            await self._teardown()
            self.transport.close()

    def abort(self) -> None:
        """Disconnect the client (used by the server on close)."""
        self._closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()

    def _drop_queued(self) -> None:
        while not self._queue.empty():
            f = self._queue.get_nowait()
            if f is not None:
                f.close()

    def hold_reading(self) -> None:
        """Stop reading between two recvmsg calls; nothing read is lost (see module doc)."""
        self._holding = True
        self._reading.clear()
        if self._in_recv and self._reader_task is not None:
            # Suspended only in the readiness wait, before recvmsg: no byte is in flight.
            self._reader_task.cancel()

    def resume_reading(self) -> None:
        self._holding = False
        self._reading.set()

    def inject(self, barrier: Barrier) -> None:
        """Run `barrier.reached()` in the pipeline after the commands queued before it."""
        self._queue.put_nowait(barrier)

    def queued_frames(self) -> list[Frame]:
        """Frames read but not processed yet, in order (they stay queued)."""
        return [f for f in list(self._queue._queue) if isinstance(f, Frame)]  # type: ignore[attr-defined]

    def requeue(self, frames: list[Frame]) -> None:
        """Queue frames another process read but did not process (before reading more)."""
        for f in frames:
            self._queue.put_nowait(f)

    async def _reader(self) -> None:
        # A device that journals requests outside this process (front-end crash
        # recovery, reactor/rescue.py) gets them *before* they leave the socket: peek,
        # journal, consume, mark consumed.  A request consumed but not yet journaled
        # would die with this process unseen by anyone (the client times out).
        while True:
            if self._holding:
                await self._reading.wait()
                continue
            peek = getattr(self.device, "journaling", False) and not self.framer.pending_bytes
            self._in_recv = True
            try:
                data, fds, trunc = await self.transport.recv_chunk(peek)
            except asyncio.CancelledError:
                if not self._holding or self._closed:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                continue
            finally:
                self._in_recv = False
            if not data:
                close_fds(fds)
                log.info("%s: client closed the connection", self.name, extra=_RL_GONE)
                return
            seqs: list[int] = []
            try:
                if peek:
                    ends = whole_frames(data, MAX_MESSAGE)
                    # Fds ride on the last byte's message: journal them with it only
                    # when that message is whole (the take then ends where it does).
                    if ends and not trunc and (not fds or ends[-1] == len(data)):
                        n = ends[-1]
                        seqs = self.device.requests_peeked(                 # type: ignore[attr-defined]
                            [data[a:b] for a, b in zip([0] + ends, ends)], fds)
                        if self.transport.take(n, len(fds)) != data[:n]:
                            raise StreamError(errno.EPROTO, "bytes taken differ from bytes peeked")
                        self.device.requests_taken()     # type: ignore[attr-defined]
                        data = data[:n]
                    else:
                        # a partial message (or fds on one): an ordinary read, journaled
                        # after it as before
                        close_fds(fds)
                        data, fds, trunc = self.transport.recv_now()
                frames = self.framer.feed(data, fds, trunc)
            except StreamError as e:
                log.warning("%s: dropping connection, stream unusable: %s", self.name, e, extra=_RL_STREAM)
                return
            journal = None if seqs else getattr(self.device, "request_read", None)
            for i, frame in enumerate(frames):
                if frame.header.msg_type == MsgType.REPLY:
                    self._on_reply(frame)
                else:
                    if seqs:
                        frame.seq = seqs[i]
                    elif journal is not None:
                        journal(frame)      # outside this process before it is queued
                    await self._queue.put(frame)

    async def _run_pipeline(self) -> None:
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            if not isinstance(frame, Frame):
                try:
                    await frame.reached()
                except Exception:
                    log.exception("%s: pipeline barrier failed", self.name)
                continue
            try:
                await self._pipeline.process(frame)
            finally:
                frame.close()
                answered = getattr(self.device, "request_answered", None)
                if answered is not None and frame.seq:
                    answered(frame.seq)

    def _on_reply(self, frame: Frame) -> None:
        hdr = frame.header
        if frame.fds:
            log.warning("%s: msg %d reply carried %d fds; closed", self.name, hdr.msg_id,
                        len(frame.fds), extra=_RL_REPLY)
            frame.close()
        entry = self._pending.get(hdr.msg_id)
        if entry is None or entry[0] != hdr.command or entry[1].done():
            log.warning("%s: msg %d %s: reply matches no pending request; dropped",
                        self.name, hdr.msg_id, command_name(hdr.command), extra=_RL_REPLY)
            return
        del self._pending[hdr.msg_id]
        entry[1].set_result(frame)

    async def _teardown(self) -> None:
        if len(self.memory) or self.dma_fds:
            quiesced = False
            try:
                await self.device.quiesce()
                quiesced = True
            except Exception:
                log.exception("%s: quiesce at disconnect failed", self.name)
            try:
                self.unmap_everything()
            except Exception:
                log.exception("%s: unmap at disconnect failed", self.name)
            if quiesced:
                try:
                    await self.device.resume()
                except Exception:
                    log.exception("%s: resume at disconnect failed", self.name)
        if self._connected:
            self._connected = False
            try:
                self.device.client_disconnected()
            except Exception:
                log.exception("%s: client_disconnected failed", self.name)

    def unmap_everything(self) -> None:
        """Tell the device, unmap every region, close the DMA fds (caller quiesced)."""
        for e in list(self.memory.table):
            try:
                self.device.dma_unmapped(e.iova, e.size)
            except Exception:
                log.exception("%s: dma_unmapped(%#x) failed", self.name, e.iova)
        self.memory.unmap_all()
        close_fds([fd for fd in self.dma_fds.values() if fd is not None])
        self.dma_fds.clear()

    # ------------------------------------------------- server -> client DMA
    def _learn(self, proven: DmaLayout | None) -> None:
        if proven is not None and proven is not self.dma_layout:
            log.info("%s: client uses the %s DMA layout", self.name, proven.value)
            self.dma_layout = proven

    def _chunk(self) -> int:
        caps = self.client_caps
        return min(caps.max_data_xfer_size if caps else SERVER_MAX_XFER, SERVER_MAX_XFER)

    def _alloc_id(self) -> int:
        for _ in range(0x10000):
            mid = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if mid not in self._pending:
                return mid
        raise ProtocolError(errno.EBUSY, "no free message id")

    async def _request(self, command: int, payload: bytes) -> Frame:
        if self._closed or not self.negotiated:
            raise ProtocolError(errno.ENOTCONN, "no negotiated client")
        mid = self._alloc_id()
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[mid] = (command, fut)
        try:
            try:
                await self.transport.send(Header(mid, command, HEADER_SIZE + len(payload),
                                                 MsgType.COMMAND), payload)
            except OSError as e:
                raise ProtocolError(errno.ENOTCONN, f"send failed: {e}") from e
            try:
                frame = await asyncio.wait_for(fut, self.dma_timeout)
            except asyncio.TimeoutError:
                raise ProtocolError(errno.ETIMEDOUT,
                                    f"msg {mid} {command_name(command)}: no reply") from None
        finally:
            self._pending.pop(mid, None)
        if frame.header.is_error:
            raise ProtocolError(frame.header.error or errno.EIO,
                                f"client refused {command_name(command)}")
        return frame

    def _check_range(self, addr: int, count: int) -> None:
        if addr < 0 or count < 0 or addr + count > 1 << 64:
            raise ProtocolError(errno.EINVAL, f"DMA range {addr:#x}+{count:#x}")

    async def dma_read(self, addr: int, count: int) -> bytes:
        """Read guest memory through DMA_READ messages (for regions without fd)."""
        self._check_range(addr, count)
        out = bytearray()
        chunk = self._chunk()
        pos = 0
        while pos < count:
            n = min(chunk, count - pos)
            frame = await self._request(Command.DMA_READ,
                                        DmaRw(addr + pos, n).encode(Command.DMA_READ))
            data, proven = decode_read_reply(frame.payload, addr + pos, n, self.dma_layout)
            if data is None:
                # Fits both layouts with different data: one byte that is non-zero in
                # QEMU's reading tells which (vfio_user/dmamsg.py).
                at = probe_address(frame.payload, addr + pos, n)
                probe = await self._request(Command.DMA_READ, DmaRw(at, 1).encode(Command.DMA_READ))
                proven = probe_layout(probe.payload)
                data, _ = decode_read_reply(frame.payload, addr + pos, n, proven)
            self._learn(proven)
            assert data is not None
            out += data
            pos += n
        return bytes(out)

    async def dma_write(self, addr: int, data: bytes) -> None:
        """Write guest memory through DMA_WRITE messages (for regions without fd)."""
        self._check_range(addr, len(data))
        chunk = self._chunk()
        for pos in range(0, len(data), chunk):
            part = bytes(data[pos:pos + chunk])
            sent = self.dma_layout or DmaLayout.SPEC
            msg = DmaRw(addr + pos, len(part), part)
            frame = await self._request(Command.DMA_WRITE, msg.encode(Command.DMA_WRITE, sent))
            proven = write_reply_layout(frame.payload, addr + pos)
            if self.dma_layout is None:
                self._learn(proven)
                if proven is not sent:
                    # It read our bytes shifted, into this same range: write them again.
                    frame = await self._request(Command.DMA_WRITE, msg.encode(Command.DMA_WRITE, proven))
                    write_reply_layout(frame.payload, addr + pos)
