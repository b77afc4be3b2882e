"""Migration v1 on the wire: region 9, `vfio_device_migration_info` + a data area.

Layout (reference §4.1-4.2):

    0x0000  device_state  u32  RW   v1 bits RUNNING 1 | SAVING 2 | RESUMING 4 (error = 6)
    0x0004  reserved      u32  --   (any access: EINVAL)
    0x0008  pending_bytes u64  RO
    0x0010  data_offset   u64  RO   reading it while saving prepares a chunk
    0x0018  data_size     u64  RO while saving; written by the client while resuming
    0x0020..DATA_OFFSET         dead space (EINVAL), never mmapped
    DATA_OFFSET .. +AREA_SIZE   the data area: REGION_READ/WRITE or the sparse mmap area

Each register takes exactly its own size (libvfio-user's rule).  The save iteration
follows libvfio-user @1569a37 and QEMU's v1 client (§4.4):

    INITIAL --read pending_bytes--> STARTED (pending > 0) | FINISHED (pending == 0)
    STARTED --read data_offset--> PREPARED: the next chunk (<= AREA_SIZE bytes of the
        stream) is copied into the data area; data_size says how long it is
    PREPARED --read pending_bytes--> a new iteration (the client has read the chunk)

Resuming: data_offset names the area; the client writes a chunk there and commits it
by writing data_size = its length, which feeds the chunk into the engine's input
stream before the reply (a bad blob fails that write with EINVAL).  Every change of
device_state restarts the iteration.  Writes of device_state go through the one state
table (`MigrationEngine.set_state(v1=True)`); same-state writes are accepted.
"""
from __future__ import annotations

import enum
import errno

from vfio_user.errors import ProtocolError
from vfio_user.migmsg import (MIG_INFO_SIZE, MIG_REGISTERS, REG_DATA_OFFSET, REG_DATA_SIZE,
                              REG_DEVICE_STATE, REG_PENDING_BYTES)

from .engine import MigrationEngine
from .states import V1_BITS, MigState, v1_target

DATA_OFFSET = 0x1000
AREA_SIZE = 0x40000            # 256 KiB per chunk: a controller snapshot is a few KiB
REGION_SIZE = DATA_OFFSET + AREA_SIZE
SAVING = (MigState.PRE_COPY, MigState.STOP_COPY)


class Iter(enum.Enum):
    INITIAL = "initial"
    STARTED = "started"
    PREPARED = "prepared"
    FINISHED = "finished"


def _einval(why: str) -> ProtocolError:
    return ProtocolError(errno.EINVAL, why)


class V1Region:
    def __init__(self, engine: MigrationEngine, area: memoryview) -> None:
        if len(area) < AREA_SIZE:
            raise ValueError(f"v1 data area needs {AREA_SIZE} bytes")
        self.engine = engine
        self.area = area
        self.iter = Iter.INITIAL
        self.pending = 0
        self.chunk = 0

    @staticmethod
    def needs_quiesce(offset: int, data: bytes) -> bool:
        return offset == REG_DEVICE_STATE and len(data) == 4

    # -- dispatch -------------------------------------------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        if offset >= DATA_OFFSET:
            if self.engine.state not in SAVING:
                raise _einval(f"migration data area read in {self.engine.state.name}")
            self._check_area(offset, count)
            a = offset - DATA_OFFSET
            return bytes(self.area[a:a + count])
        reg = self._register(offset, count)
        return self._read_register(reg).to_bytes(count, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset >= DATA_OFFSET:
            if self.engine.state is not MigState.RESUMING:
                raise _einval(f"migration data area write in {self.engine.state.name}")
            self._check_area(offset, len(data))
            a = offset - DATA_OFFSET
            self.area[a:a + len(data)] = data
            return
        reg = self._register(offset, len(data))
        value = int.from_bytes(data, "little")
        if reg == REG_DEVICE_STATE:
            self._write_state(value)
        elif reg == REG_DATA_SIZE and self.engine.state is MigState.RESUMING:
            if value > AREA_SIZE:
                raise _einval(f"data_size {value:#x} exceeds the {AREA_SIZE:#x}-byte data area")
            self.engine.write(self.area[:value])
        else:
            raise _einval(f"migration register {offset:#x} is read-only in "
                          f"{self.engine.state.name}")

    @staticmethod
    def _check_area(offset: int, count: int) -> None:
        if count <= 0 or offset + count > REGION_SIZE:
            raise _einval(f"migration data access {offset:#x}+{count} outside the data area")

    @staticmethod
    def _register(offset: int, count: int) -> int:
        size = MIG_REGISTERS.get(offset)
        if size is None or offset + count > MIG_INFO_SIZE:
            raise _einval(f"no migration register at {offset:#x}")
        if count != size:
            raise _einval(f"migration register {offset:#x} takes {size}-byte accesses, not {count}")
        return offset

    # -- registers ------------------------------------------------------------------------
    def _read_register(self, reg: int) -> int:
        st = self.engine.state
        if reg == REG_DEVICE_STATE:
            return V1_BITS.get(st, V1_BITS[MigState.ERROR])
        if reg == REG_PENDING_BYTES:
            return self._pending() if st in SAVING else 0
        if reg == REG_DATA_OFFSET:
            if st in SAVING:
                if self.iter is Iter.STARTED:
                    self._prepare()
                elif self.iter is not Iter.PREPARED:
                    raise _einval("data_offset read out of sequence (read pending_bytes first)")
                return DATA_OFFSET
            if st is MigState.RESUMING:
                return DATA_OFFSET
            raise _einval(f"data_offset has no meaning in {st.name}")
        # REG_DATA_SIZE
        if st in SAVING:
            if self.iter not in (Iter.STARTED, Iter.PREPARED):
                raise _einval("data_size read out of sequence (read pending_bytes first)")
            return self.chunk if self.iter is Iter.PREPARED else 0
        if st is MigState.RESUMING:
            return 0
        raise _einval(f"data_size has no meaning in {st.name}")

    def _pending(self) -> int:
        """A read of pending_bytes starts an iteration; repeated reads are idempotent."""
        if self.iter is Iter.FINISHED:
            return 0
        if self.iter is Iter.STARTED:
            return self.pending
        self.pending = self.engine.pending()
        self.chunk = 0
        self.iter = Iter.STARTED if self.pending else Iter.FINISHED
        return self.pending

    def _prepare(self) -> None:
        data = self.engine.read(min(AREA_SIZE, self.pending))
        self.area[:len(data)] = data
        self.chunk = len(data)
        self.iter = Iter.PREPARED

    def _write_state(self, value: int) -> None:
        target = v1_target(value)
        if target is None:
            raise _einval(f"device_state {value:#x} is not a valid v1 state")
        if target is MigState.ERROR:
            raise _einval("device_state: the error state cannot be requested")
        before = self.engine.state
        try:
            self.engine.set_state(int(target), v1=True)
        finally:
            if self.engine.state is not before:
                self.iter = Iter.INITIAL
                self.pending = self.chunk = 0

    def reset(self) -> None:
        self.iter = Iter.INITIAL
        self.pending = self.chunk = 0
