"""The migration engine: one state table, one data stream, a device behind `DeviceOps`.

Theory of operation
-------------------
Both wire schemes are thin adapters over this engine (migration/v1region.py and
migration/v2.py): they translate their registers or features into `set_state`,
`read` and `write`.  The engine walks the state table (migration/states.py) one
arc at a time and gives every arc its meaning by calling the device:

    arc                         device call                      data stream
    RUNNING/PRE_COPY -> stopped stop()   (controller drained)
    RUNNING -> PRE_COPY                                           out = precopy()
    * -> STOP_COPY              (after stop)                      out += save()
    leaving PRE_COPY/STOP_COPY                                    out dropped
    STOP -> RESUMING                                              new input stream
    RESUMING -> STOP            (load done?)                      input consumed
    stopped -> RUNNING          start()

A walk stops at the first arc that fails: the engine stays in the last state
reached and the failure becomes the reply's errno (bad data: EINVAL; a refused
target: EINVAL).  An arc that fails after its stop() already ran calls start()
again, so the device is never left stopped while the table says running.  A failed
load discards what was received, so the client may send a good stream and retry.

The output stream is the pre-copy blob (identity only, lets the destination refuse
a mismatch while the source still runs) followed by the full snapshot blob; the
destination splits it with snapshot.StreamSplitter and checks each blob on arrival
(`check`), so a corrupt or foreign stream is refused at the MIG_DATA_WRITE (or v1
data_size commit) that completes it; a blob holding the full device state is loaded
(`load`) by that same write.  RESUMING -> STOP then only requires the stream to be
complete and loaded.  Pure: no I/O, the device does the work.
"""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from vfio_user.errors import ProtocolError

from .snapshot import Snapshot, SnapshotError, StreamSplitter
from .states import MigrationFsm, MigState, TransitionRefused

RUNNING_STATES = frozenset({MigState.RUNNING, MigState.PRE_COPY})


class DeviceOps(Protocol):
    def stop(self) -> None: ...
    def start(self) -> None: ...
    def precopy(self) -> bytes: ...
    def save(self) -> bytes: ...
    def check(self, blob: Snapshot) -> None: ...
    def is_full(self, blob: Snapshot) -> bool: ...
    def load(self, blobs: list[Snapshot]) -> None: ...


@dataclass(slots=True)
class MigrationStats:
    """Figures of the current / last migration, for vnvmectl (times in ms)."""

    role: str = ""                 # "source" | "destination" | ""
    scheme: str = ""               # "v1" | "v2"
    result: str = ""               # "" while running, "done", "cancelled", "failed: ..."
    bytes_out: int = 0
    bytes_in: int = 0
    snapshot_bytes: int = 0
    stopped_ms: float = 0.0        # source: stop arc -> saved; destination: load + start
    save_ms: float = 0.0
    load_ms: float = 0.0
    migrations: int = 0
    _t_stop: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if not k.startswith("_")}


class MigrationEngine:
    def __init__(self, ops: DeviceOps, clock: Callable[[], float] = time.monotonic) -> None:
        self.ops = ops
        self.fsm = MigrationFsm()
        self.clock = clock
        self._out = bytearray()
        self._in: StreamSplitter | None = None
        self._blobs: list[Snapshot] = []
        self._loaded = False
        self.stats = MigrationStats()
        self.last: dict[str, Any] | None = None
        self.scheme = ""

    # -- state ------------------------------------------------------------------------
    @property
    def state(self) -> MigState:
        return self.fsm.state

    @property
    def running(self) -> bool:
        """The device serves I/O (RUNNING or PRE_COPY)."""
        return self.fsm.state in RUNNING_STATES

    def set_state(self, target: int, *, v1: bool = False) -> None:
        """Walk to `target`; ProtocolError(EINVAL) if refused or if an arc fails on bad data."""
        try:
            steps = self.fsm.apply(target, v1=v1)
        except TransitionRefused as e:
            raise ProtocolError(errno.EINVAL, str(e)) from None
        self.scheme = "v1" if v1 else "v2"
        for dst in steps:
            self._arc(self.fsm.state, dst)
            self.fsm.step(dst)

    def _arc(self, src: MigState, dst: MigState) -> None:
        was_running, will_run = src in RUNNING_STATES, dst in RUNNING_STATES
        stopped_here = False
        if was_running and not will_run:
            self.stats._t_stop = self.clock()
            self.ops.stop()
            stopped_here = True
        try:
            if dst is MigState.PRE_COPY:
                self._begin("source")
                self._out[:] = self.ops.precopy()
            elif dst is MigState.STOP_COPY:
                if src is not MigState.PRE_COPY:
                    self._begin("source")
                t0 = self.clock()
                blob = self.ops.save()
                self.stats.save_ms = (self.clock() - t0) * 1000
                self.stats.snapshot_bytes = len(blob)
                self._out += blob
            elif dst is MigState.RESUMING:
                self._begin("destination")
                self._in = StreamSplitter()
                self._blobs = []
                self._loaded = False
            elif src is MigState.RESUMING:
                self._load()
        except BaseException:
            if stopped_here:
                self.ops.start()
            raise
        if src in (MigState.PRE_COPY, MigState.STOP_COPY) and dst not in (MigState.PRE_COPY,
                                                                           MigState.STOP_COPY):
            self._finish_saving(dst)
        if not was_running and will_run:
            self.ops.start()
            if self.stats.role == "destination" and self.stats.result == "loaded":
                self.stats.stopped_ms = self.stats.load_ms
                self._done("done")

    def _begin(self, role: str) -> None:
        t_stop = self.stats._t_stop             # a stop arc may just have run (RUNNING -> STOP)
        self.stats = MigrationStats(role=role, scheme=self.scheme,
                                    migrations=self.stats.migrations + 1)
        self.stats._t_stop = t_stop

    def _finish_saving(self, dst: MigState) -> None:
        st = self.stats
        unread = len(self._out)
        self._out.clear()
        if dst is MigState.STOP and st.snapshot_bytes and unread == 0:
            st.stopped_ms = (self.clock() - st._t_stop) * 1000
            self._done("done")
        else:
            self._done("cancelled")

    def _load(self) -> None:
        """RESUMING -> STOP: the stream must be complete and its device state loaded."""
        assert self._in is not None
        try:
            if self._in.pending:
                raise SnapshotError(f"migration stream ends inside a snapshot "
                                    f"({self._in.pending} bytes of it received)")
            if not self._loaded:
                if not self._blobs:
                    raise SnapshotError("no migration data received")
                self._apply()
        except SnapshotError as e:
            self._refuse(e)

    def _apply(self) -> None:
        t0 = self.clock()
        self.ops.load(self._blobs)
        self.stats.load_ms = (self.clock() - t0) * 1000
        self.stats.result = "loaded"
        self._loaded = True

    def _refuse(self, e: SnapshotError) -> None:
        """The stream is unusable: start over (a new stream may follow) and say why."""
        self._in = StreamSplitter()
        self._blobs = []
        self._loaded = False
        self.stats.result = f"failed: {e}"
        raise ProtocolError(errno.EINVAL, f"migration data refused: {e}") from None

    def _done(self, result: str) -> None:
        self.stats.result = result
        self.last = self.stats.to_dict()

    # -- data ---------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._out) if self.fsm.state in (MigState.PRE_COPY, MigState.STOP_COPY) else 0

    def read(self, size: int) -> bytes:
        if self.fsm.state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            raise ProtocolError(errno.EINVAL, f"no migration data to read in {self.fsm.state.name}")
        out = bytes(self._out[:size])
        del self._out[:size]
        self.stats.bytes_out += len(out)
        return out

    def write(self, data: bytes | memoryview) -> None:
        if self.fsm.state is not MigState.RESUMING or self._in is None:
            raise ProtocolError(errno.EINVAL, f"migration data not accepted in {self.fsm.state.name}")
        self.stats.bytes_in += len(data)
        try:
            blobs = self._in.feed(data)
            for b in blobs:
                self.ops.check(b)
            self._blobs += blobs
            # A complete device state is loaded at once, by the write that completes it
            # (the v1 data_size commit "consumes" the data before its reply), so a
            # doorbell the guest writes afterwards is never overwritten by the load.
            if any(self.ops.is_full(b) for b in blobs):
                self._apply()
        except SnapshotError as e:
            self._refuse(e)

    def reset(self) -> None:
        """Device reset / client gone: back to RUNNING, session data dropped (no device calls)."""
        if self.fsm.state is not MigState.RUNNING and self.stats.role and not self.stats.result:
            self._done("cancelled")
        self.fsm.reset()
        self._out.clear()
        self._in = None
        self._blobs = []
        self._loaded = False
