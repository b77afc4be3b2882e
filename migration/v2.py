"""Migration v2 on the wire: DEVICE_FEATURE (16) and MIG_DATA_READ/WRITE (17/18).

A thin adapter over `MigrationEngine` (state and data) and a `DirtyOps` (DMA logging),
following reference §3.12-3.13 and §5 and libvfio-user's handle_device_feature:

- operations: GET, SET, PROBE (bits 16-18) against a per-feature table of what is
  supported; an unsupported bit, no operation, or GET|SET without PROBE -> EINVAL;
- GET replies carry the data and argsz = the whole reply; a request argsz too small
  for it -> EINVAL (the client retries with more);
- SET and PROBE replies echo the request; argsz below the request's size -> EINVAL;
- MIG_DEVICE_STATE SET walks the state table (multi-arc) before replying; only it
  needs the quiesce barrier (`needs_quiesce`);
- MIG_DATA_READ/WRITE: size <= the transfer size both sides allow, argsz >= 8 + size,
  READ only in PRE_COPY/STOP_COPY, WRITE only in RESUMING (EINVAL otherwise).
"""
from __future__ import annotations

import errno
from typing import Callable, Protocol

from vfio_user.errors import ProtocolError
from vfio_user.migmsg import (DmaLoggingReport, DmaLoggingStart, Feature, MigDeviceState,
                              MigrationFlag, encode_migration_flags)
from vfio_user.wire import FeatureFlag

from .dirty import bitmap_size, check_pgsize
from .engine import MigrationEngine

GET, SET, PROBE = int(FeatureFlag.GET), int(FeatureFlag.SET), int(FeatureFlag.PROBE)
HDR = 8                                        # argsz + flags

SUPPORTED: dict[int, int] = {
    Feature.MIGRATION: GET | PROBE,
    Feature.MIG_DEVICE_STATE: GET | SET | PROBE,
    Feature.DMA_LOGGING_START: SET | PROBE,
    Feature.DMA_LOGGING_STOP: SET | PROBE,
    Feature.DMA_LOGGING_REPORT: GET | PROBE,
}
MIGRATION_FLAGS = MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY


class DirtyOps(Protocol):
    def start(self, pgsize: int) -> None: ...
    def stop(self) -> None: ...
    def report(self, iova: int, length: int, pgsize: int) -> bytes: ...


def _einval(why: str) -> ProtocolError:
    return ProtocolError(errno.EINVAL, why)


class V2Adapter:
    def __init__(self, engine: MigrationEngine, dirty: DirtyOps,
                 max_xfer: Callable[[], int]) -> None:
        self.engine = engine
        self.dirty = dirty
        self.max_xfer = max_xfer              # min(client's max_data_xfer_size, ours)

    @staticmethod
    def needs_quiesce(flags: int, data: bytes) -> bool:
        return (flags & 0xFFFF == Feature.MIG_DEVICE_STATE and bool(flags & SET)
                and not flags & PROBE)

    def feature(self, argsz: int, flags: int, data: bytes) -> bytes:
        """Reply data (after argsz/flags) for one DEVICE_FEATURE request."""
        feature, ops = flags & 0xFFFF, flags & ~0xFFFF
        supported = SUPPORTED.get(feature, 0)
        if not supported or not ops or ops & ~supported:
            raise _einval(f"DEVICE_FEATURE {feature}: operations {ops >> 16:#x} not supported")
        if ops == GET:
            return self._get(feature, argsz, data)
        if ops == SET:
            if argsz < HDR + len(data):
                raise _einval(f"DEVICE_FEATURE SET: argsz {argsz} < {HDR + len(data)}")
            return self._set(feature, data)
        if not ops & PROBE:
            raise _einval("DEVICE_FEATURE: GET and SET together need PROBE")
        if argsz < HDR + len(data):
            raise _einval(f"DEVICE_FEATURE PROBE: argsz {argsz} < {HDR + len(data)}")
        return data

    def _get(self, feature: int, argsz: int, data: bytes) -> bytes:
        if feature == Feature.MIGRATION:
            out = encode_migration_flags(MIGRATION_FLAGS)
        elif feature == Feature.MIG_DEVICE_STATE:
            out = MigDeviceState(int(self.engine.state), 0).encode()
        else:   # DMA_LOGGING_REPORT
            req = DmaLoggingReport.decode(data)
            check_pgsize(req.page_size)
            if req.length < req.page_size:
                raise _einval(f"DMA_LOGGING_REPORT length {req.length:#x} below one page")
            need = HDR + DmaLoggingReport.SIZE + bitmap_size(req.length, req.page_size)
            if argsz < need:
                raise _einval(f"DMA_LOGGING_REPORT: argsz {argsz} < {need}")
            bm = self.dirty.report(req.iova, req.length, req.page_size)
            out = DmaLoggingReport(req.iova, req.length, req.page_size, bm).encode()
        if argsz < HDR + len(out):
            raise _einval(f"DEVICE_FEATURE GET: argsz {argsz} < {HDR + len(out)}")
        return out

    def _set(self, feature: int, data: bytes) -> bytes:
        if feature == Feature.MIG_DEVICE_STATE:
            self.engine.set_state(MigDeviceState.decode(data).device_state)
        elif feature == Feature.DMA_LOGGING_START:
            req = DmaLoggingStart.decode(data)
            check_pgsize(req.page_size)
            self.dirty.start(req.page_size)
        else:   # DMA_LOGGING_STOP
            self.dirty.stop()
        return data

    # -- MIG_DATA_READ / MIG_DATA_WRITE ---------------------------------------------------
    def _check_size(self, size: int, what: str) -> None:
        limit = self.max_xfer()
        if size > limit:
            raise _einval(f"{what} size {size} > {limit}")

    def data_read(self, size: int) -> bytes:
        self._check_size(size, "MIG_DATA_READ")
        return self.engine.read(size)

    def data_write(self, data: bytes) -> None:
        self._check_size(len(data), "MIG_DATA_WRITE")
        self.engine.write(data)
