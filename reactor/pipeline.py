"""The vfio-user request pipeline: one table row per command, one handler each.

    frame -> known command? (ENOSYS) -> fd count check -> gate on session state
          -> decode payload -> quiesce (if the row / the device says so)
          -> handle_<command> -> reply (<= what the client allowed; none if
             NO_REPLY; errors header-only with ERROR + errno) -> resume

Frames are processed strictly one at a time in arrival order (the session feeds
them from a FIFO); while one awaits `device.quiesce()` the rest wait behind it.

Reply-size rule (reference §6.7): QEMU receives most replies into a buffer the size
of its request (VERSION, DMA_MAP/UNMAP, SET_IRQS, RESET, REGION_WRITE), GET_INFO /
GET_IRQ_INFO into 32 bytes, REGION_INFO into 16 + argsz, REGION_READ into 32 +
count.  `_reply_limit` encodes that; a handler that would exceed it is our bug and
is answered with an error instead of an oversized reply.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from vfio_user.errors import ProtocolError
from vfio_user.irqs import validate_set_irqs
from vfio_user.migmsg import DirtyPages
from vfio_user.messages import (DeviceFeature, DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfoMsg,
                                MigData, RegionAccess, RegionInfoReply, RegionInfoRequest,
                                RegionWriteMulti, SetIrqs, UnmapBitmap)
from vfio_user.negotiate import (SERVER_MAX_MSG_FDS, SERVER_MAX_XFER, build_server_version,
                                 parse_client_version)
from vfio_user.wire import (HEADER_SIZE, Command, DmaMapFlag, DmaUnmapFlag, FeatureFlag, Header,
                            RegionFlag, command_name)

from .transport import Frame, close_fds

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("vnvmed.vfio")
# Client-triggered lines are rate-limited per key (ops.logsetup.RateLimitFilter).
_RL_FAIL = {"ratelimit": "vfio-user request refused"}
_RL_FDS = {"ratelimit": "vfio-user stray fds"}


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's answer: payload bytes and fds to send with it (not given away)."""

    payload: bytes = b""
    fds: tuple[int, ...] = ()


Decoder = Callable[[bytes], Any]
Handler = Callable[["Pipeline", Any, Frame], Reply]
Predicate = Callable[["Pipeline", Any], bool]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    decode: Decoder
    handle: Handler
    needs_version: bool = True        # refused before VERSION succeeded
    quiesce: Predicate | None = None  # None: never
    max_fds: int = 0                  # fds this command may carry
    strict_fds: bool = False          # more than max_fds -> EINVAL (else closed, ignored)


def _always(_p: "Pipeline", _m: Any) -> bool:
    return True


# ---------------------------------------------------------------- handlers

def handle_version(p: "Pipeline", payload: bytes, frame: Frame) -> Reply:
    caps = parse_client_version(payload)
    reply = build_server_version(caps, frame.header.size)
    p.session.on_negotiated(caps)
    return Reply(reply.encode())


def handle_dma_map(p: "Pipeline", m: DmaMap, frame: Frame) -> Reply:
    # int(): on 3.11 `~` of an IntFlag keeps only its members (always 0 here).
    if m.flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE):
        raise ProtocolError(errno.EINVAL, f"DMA_MAP flags {m.flags:#x}")
    r, w = bool(m.flags & DmaMapFlag.READ), bool(m.flags & DmaMapFlag.WRITE)
    fds = frame.take_fds()
    fd = fds[0] if fds else None
    mem = p.session.memory
    try:
        mem.map(m.address, m.size, m.offset, fd, r, w)
    except BaseException:
        close_fds(fds)
        raise
    try:
        p.device.dma_mapped(m.address, m.size, m.offset, fd, r, w)
    except BaseException:
        mem.unmap(m.address, m.size)
        close_fds(fds)
        raise
    p.session.dma_fds[m.address] = fd
    return Reply()


def handle_dma_unmap(p: "Pipeline", m: DmaUnmap, frame: Frame) -> Reply:
    if m.flags & ~int(DmaUnmapFlag.ALL | DmaUnmapFlag.GET_DIRTY_BITMAP) or \
            m.flags == DmaUnmapFlag.ALL | DmaUnmapFlag.GET_DIRTY_BITMAP:
        raise ProtocolError(errno.EINVAL, f"DMA_UNMAP flags {m.flags:#x}")
    s = p.session
    tail = b""
    if m.flags & DmaUnmapFlag.ALL:
        if m.address or m.size:
            raise ProtocolError(errno.EINVAL, "DMA_UNMAP ALL needs address 0 and size 0")
        s.unmap_everything()
    else:
        s.memory.table.lookup_exact(m.address, m.size)   # ENOENT/EINVAL before telling the device
        if m.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            # v1 era: the region's marks go back with the reply; taken before the unmap
            # drops its map (quiesced: every mark of the workers is in place).
            want = UnmapBitmap.decode(frame.payload)
            if m.argsz < DmaUnmap.SIZE + UnmapBitmap.SIZE + want.size:
                raise ProtocolError(errno.EINVAL, f"DMA_UNMAP argsz {m.argsz} has no room for "
                                    f"a {want.size}-byte bitmap")
            bm = p.device.unmap_dirty_bitmap(m.address, m.size, want.pgsize, want.size)
            tail = UnmapBitmap(want.pgsize, want.size, bm).encode()
        p.device.dma_unmapped(m.address, m.size)
        s.memory.unmap(m.address, m.size)
        fd = s.dma_fds.pop(m.address, None)
        if fd is not None:
            close_fds([fd])
    return Reply(DmaUnmap(m.argsz, m.flags, m.address, m.size).encode() + tail)


def handle_device_info(p: "Pipeline", m: DeviceInfoMsg, frame: Frame) -> Reply:
    info = p.device.device_info()
    return Reply(DeviceInfoMsg(DeviceInfoMsg.SIZE, info.flags, info.num_regions,
                               info.num_irqs).encode())


def handle_region_info(p: "Pipeline", m: RegionInfoRequest, frame: Frame) -> Reply:
    p.check_region_index(m.index)
    ri = p.device.region_info(m.index)
    flags = ri.flags & (RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP)
    reply = RegionInfoReply(0, flags, m.index, ri.size, ri.offset, ri.sparse, ri.cap_type)
    payload = reply.encode(limit=m.argsz)
    # Like libvfio-user: the fd goes only with a reply that carries its sparse areas;
    # a truncated reply makes QEMU retry with a bigger argsz (and close any fd).
    complete = len(payload) == reply.full_size()
    fds = (ri.fd,) if ri.fd is not None and flags & RegionFlag.MMAP and complete else ()
    return Reply(payload, fds)


def handle_irq_info(p: "Pipeline", m: IrqInfoMsg, frame: Frame) -> Reply:
    p.check_irq_index(m.index)
    ii = p.device.irq_info(m.index)
    return Reply(IrqInfoMsg(IrqInfoMsg.SIZE, ii.flags, m.index, ii.count).encode())


def handle_set_irqs(p: "Pipeline", m: SetIrqs, frame: Frame) -> Reply:
    p.check_irq_index(m.index)
    validate_set_irqs(m, len(frame.fds), p.device.irq_info(m.index).count)
    fds = frame.take_fds()
    try:
        p.device.set_irqs(m.index, m.flags, m.start, m.count, fds, m.data)
    except BaseException:
        close_fds(fds)
        raise
    return Reply()


def handle_region_read(p: "Pipeline", m: RegionAccess, frame: Frame) -> Reply:
    p.check_access(m.region, m.offset, m.count, RegionFlag.READ)
    data = p.device.region_read(m.region, m.offset, m.count)
    if len(data) != m.count:
        raise RuntimeError(f"device returned {len(data)} bytes for a {m.count}-byte read")
    return Reply(RegionAccess(m.offset, m.region, m.count, bytes(data)).encode())


def handle_region_write(p: "Pipeline", m: RegionAccess, frame: Frame) -> Reply:
    p.check_access(m.region, m.offset, m.count, RegionFlag.WRITE)
    p.device.region_write(m.region, m.offset, m.data)
    return Reply(RegionAccess(m.offset, m.region, m.count).encode())


def handle_write_multi(p: "Pipeline", m: RegionWriteMulti, frame: Frame) -> Reply:
    for e in m.entries:
        p.check_access(e.region, e.offset, e.count, RegionFlag.WRITE)
    for e in m.entries:
        p.device.region_write(e.region, e.offset, e.data)
    return Reply(RegionWriteMulti.encode_reply(len(m.entries)))


def handle_reset(p: "Pipeline", m: bytes, frame: Frame) -> Reply:
    p.device.reset()
    return Reply()


def handle_feature(p: "Pipeline", m: DeviceFeature, frame: Frame) -> Reply:
    data = p.device.device_feature(m.flags, m.data, m.argsz)
    # SET and PROBE replies echo the request, argsz included; a GET reply's argsz is its
    # own size (reference §3.12, libvfio-user handle_device_feature).
    echo = m.flags & (FeatureFlag.SET | FeatureFlag.PROBE)
    argsz = m.argsz if echo else DeviceFeature.SIZE + len(data)
    return Reply(DeviceFeature(argsz, m.flags, data).encode())


def handle_mig_read(p: "Pipeline", m: MigData, frame: Frame) -> Reply:
    data = p.device.mig_data_read(m.size)
    if len(data) > m.size:
        raise RuntimeError(f"device returned {len(data)} > {m.size} migration bytes")
    return Reply(MigData(MigData.SIZE + len(data), len(data), bytes(data)).encode())


def handle_mig_write(p: "Pipeline", m: MigData, frame: Frame) -> Reply:
    p.device.mig_data_write(m.data)
    return Reply()


def handle_dirty_pages(p: "Pipeline", m: DirtyPages, frame: Frame) -> Reply:
    return Reply(p.device.dirty_pages(m, p.session.client_caps))


def _raw(payload: bytes) -> bytes:
    return payload


def _region_write_quiesce(p: "Pipeline", m: RegionAccess) -> bool:
    return bool(p.device.needs_quiesce(m.region, m.offset, m.data))


def _multi_quiesce(p: "Pipeline", m: RegionWriteMulti) -> bool:
    return any(p.device.needs_quiesce(e.region, e.offset, e.data) for e in m.entries)


def _feature_quiesce(p: "Pipeline", m: DeviceFeature) -> bool:
    hook = getattr(p.device, "feature_needs_quiesce", None)
    return bool(hook(m.flags, m.data)) if hook else False


TABLE: dict[int, CommandSpec] = {
    Command.VERSION: CommandSpec(_raw, handle_version, needs_version=False),
    Command.DMA_MAP: CommandSpec(DmaMap.decode, handle_dma_map, quiesce=_always,
                                 max_fds=1, strict_fds=True),
    Command.DMA_UNMAP: CommandSpec(DmaUnmap.decode, handle_dma_unmap, quiesce=_always),
    Command.DEVICE_GET_INFO: CommandSpec(DeviceInfoMsg.decode, handle_device_info),
    Command.DEVICE_GET_REGION_INFO: CommandSpec(RegionInfoRequest.decode, handle_region_info),
    Command.DEVICE_GET_IRQ_INFO: CommandSpec(IrqInfoMsg.decode, handle_irq_info),
    Command.DEVICE_SET_IRQS: CommandSpec(SetIrqs.decode, handle_set_irqs,
                                         max_fds=SERVER_MAX_MSG_FDS, strict_fds=True),
    Command.REGION_READ: CommandSpec(
        lambda b: RegionAccess.decode(b, with_data=False, max_xfer=SERVER_MAX_XFER),
        handle_region_read),
    Command.REGION_WRITE: CommandSpec(
        lambda b: RegionAccess.decode(b, with_data=True, max_xfer=SERVER_MAX_XFER),
        handle_region_write, quiesce=_region_write_quiesce),
    Command.REGION_WRITE_MULTI: CommandSpec(RegionWriteMulti.decode, handle_write_multi,
                                            quiesce=_multi_quiesce),
    Command.DEVICE_RESET: CommandSpec(_raw, handle_reset, quiesce=_always),
    Command.DEVICE_FEATURE: CommandSpec(DeviceFeature.decode, handle_feature,
                                        quiesce=_feature_quiesce),
    Command.MIG_DATA_READ: CommandSpec(
        lambda b: MigData.decode_read(b, SERVER_MAX_XFER), handle_mig_read),
    Command.MIG_DATA_WRITE: CommandSpec(
        lambda b: MigData.decode_write(b, SERVER_MAX_XFER), handle_mig_write),
    Command.DIRTY_PAGES: CommandSpec(DirtyPages.decode, handle_dirty_pages),
    # Not served: GET_REGION_IO_FDS (optional, QEMU never sends it), DMA_READ/DMA_WRITE
    # (server->client only) -> ENOSYS.
}


def _reply_limit(hdr: Header, msg: Any) -> int:
    """Largest whole reply the client can receive for this request (§6.7)."""
    cmd = hdr.command
    if cmd in (Command.DEVICE_GET_INFO, Command.DEVICE_GET_IRQ_INFO):
        return max(32, hdr.size)
    if cmd == Command.DEVICE_GET_REGION_INFO:
        return HEADER_SIZE + msg.argsz
    if cmd == Command.REGION_READ:
        return HEADER_SIZE + RegionAccess.SIZE + msg.count
    if cmd in (Command.DEVICE_FEATURE, Command.MIG_DATA_READ, Command.DIRTY_PAGES, Command.DMA_UNMAP):
        return max(hdr.size, HEADER_SIZE + msg.argsz)
    return hdr.size


class Pipeline:
    """Processes one request frame at a time for a `Session`."""

    def __init__(self, session: "Session") -> None:
        self.session = session
        self.device = session.device
        # Optional device hook, called after a request is handled and before its reply
        # goes out (front-end crash recovery records state there: reactor/rescue.py).
        self._done = getattr(self.device, "request_done", None)

    # --- validation helpers used by handlers --------------------------------
    def check_region_index(self, index: int) -> None:
        if index >= self.device.device_info().num_regions:
            raise ProtocolError(errno.EINVAL, f"region index {index} out of range")

    def check_irq_index(self, index: int) -> None:
        if index >= self.device.device_info().num_irqs:
            raise ProtocolError(errno.EINVAL, f"irq index {index} out of range")

    def check_access(self, region: int, offset: int, count: int, need: int) -> None:
        self.check_region_index(region)
        ri = self.device.region_info(region)
        if not ri.flags & need:
            raise ProtocolError(errno.EINVAL, f"region {region} does not allow this access")
        if offset + count > ri.size:     # Python ints: no wrap
            raise ProtocolError(errno.EINVAL,
                                f"region {region} access {offset:#x}+{count} beyond {ri.size:#x}")

    # --- the pipeline -------------------------------------------------------
    async def process(self, frame: Frame) -> None:
        hdr = frame.header
        name = command_name(hdr.command)
        try:
            spec = TABLE.get(hdr.command)
            if spec is None:
                raise ProtocolError(errno.ENOSYS, "command not served")
            if frame.fds_truncated or len(frame.fds) > SERVER_MAX_MSG_FDS:
                raise ProtocolError(errno.EINVAL, f"more fds than the negotiated {SERVER_MAX_MSG_FDS}")
            if len(frame.fds) > spec.max_fds:
                if spec.strict_fds:
                    raise ProtocolError(errno.EINVAL, f"{len(frame.fds)} fds, at most {spec.max_fds}")
                log.info("msg %d %s: closing %d unexpected fds", hdr.msg_id, name, len(frame.fds),
                         extra=_RL_FDS)
                frame.close()
            if spec.needs_version != self.session.negotiated:
                raise ProtocolError(errno.EINVAL, "VERSION must come first, and once")
            msg = spec.decode(frame.payload)
        except ProtocolError as e:
            await self._fail(frame, name, e.errno, str(e))
            return
        quiesced = False
        try:
            try:
                if spec.quiesce is not None and spec.quiesce(self, msg):
                    await self.device.quiesce()
                    quiesced = True
                reply = spec.handle(self, msg, frame)
            except ProtocolError as e:
                await self._fail(frame, name, e.errno, str(e))
                return
            except Exception:
                log.exception("msg %d %s: internal error", hdr.msg_id, name)
                await self._fail(frame, name, errno.EIO, "internal error")
                return
            limit = _reply_limit(hdr, msg)
            if HEADER_SIZE + len(reply.payload) > limit:
                log.error("msg %d %s: reply of %d bytes exceeds the client's %d",
                          hdr.msg_id, name, HEADER_SIZE + len(reply.payload), limit)
                await self._fail(frame, name, errno.E2BIG, "reply too large")
                return
            # fds the handler did not take are closed before the client can see the
            # reply, so "reply received" implies "stray fds released".
            frame.close()
            if self._done is not None:
                try:
                    self._done(frame.seq, hdr.command, msg,
                               None if hdr.no_reply else hdr.reply(len(reply.payload)).encode() + reply.payload)
                except Exception:
                    log.exception("msg %d %s: recording state failed", hdr.msg_id, name)
            if not hdr.no_reply:
                await self.session.send_reply(hdr.reply(len(reply.payload)), reply.payload,
                                              reply.fds)
        finally:
            if quiesced:
                try:
                    await self.device.resume()
                except Exception:
                    log.exception("msg %d %s: device resume failed", hdr.msg_id, name)

    async def _fail(self, frame: Frame, name: str, err: int, why: str) -> None:
        hdr = frame.header
        frame.close()
        log.warning("msg %d %s: %s", hdr.msg_id, name, why, extra=_RL_FAIL)
        if not hdr.no_reply:
            await self.session.send_reply(hdr.error_reply(err))
