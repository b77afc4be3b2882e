"""The migration engine and both wire adapters over a small in-process device.

The device here is a plain object with a counter as its "state": what matters is
that the adapters drive the engine's table and stream exactly per reference §4/§5.
"""
import errno
import struct

import pytest

from migration import snapshot
from migration.engine import MigrationEngine
from migration.dirty import DirtyLog, map_size
from migration.states import MigState
from migration.v1region import AREA_SIZE, DATA_OFFSET, V1Region
from migration.v2 import GET, PROBE, SET, V2Adapter
from vfio_user.errors import ProtocolError
from vfio_user.migmsg import (DmaLoggingReport, DmaLoggingStart, Feature, MigDeviceState,
                              REG_DATA_OFFSET, REG_DATA_SIZE, REG_DEVICE_STATE, REG_PENDING_BYTES)


class Dev:
    def __init__(self, value=0, pad=0):
        self.value = value
        self.pad = pad
        self.running = True
        self.calls = []

    def stop(self):
        self.calls.append("stop")
        self.running = False

    def start(self):
        self.calls.append("start")
        self.running = True

    def precopy(self):
        return snapshot.encode({"identity": "dev"})

    def save(self):
        self.calls.append("save")
        return snapshot.encode({"identity": "dev", "value": self.value, "pad": b"p" * self.pad})

    def check(self, blob):
        if blob.section("identity") != "dev":
            raise snapshot.SnapshotError("foreign device")

    def is_full(self, blob):
        return "value" in blob

    def load(self, blobs):
        final = [b for b in blobs if "value" in b]
        if not final:
            raise snapshot.SnapshotError("no device state in the stream")
        self.value = final[-1].section("value")
        self.calls.append("load")


class Dirty:
    def __init__(self):
        self.log = DirtyLog()
        self.on = False
        self.buf = bytearray(map_size(0, 1 << 20))
        self.log.add(0, 1 << 20, memoryview(self.buf))

    def start(self, pgsize):
        self.on = True

    def stop(self):
        self.on = False

    def report(self, iova, length, pgsize):
        if not self.on:
            raise ProtocolError(errno.EINVAL, "not logging")
        return self.log.report(iova, length, pgsize)


def v2(dev=None):
    eng = MigrationEngine(dev or Dev())
    return V2Adapter(eng, Dirty(), lambda: 1 << 20)


def set_state(a, st):
    data = MigDeviceState(int(st)).encode()
    return a.feature(8 + len(data), SET | Feature.MIG_DEVICE_STATE, data)


def get_state(a):
    return MigDeviceState.decode(a.feature(16, GET | Feature.MIG_DEVICE_STATE, b"")).device_state


def read_all(a, chunk=64):
    out = b""
    while True:
        d = a.data_read(chunk)
        out += d
        if len(d) < chunk:
            return out


def test_v2_source_and_destination_with_precopy():
    src, dst = v2(Dev(value=42, pad=500)), v2(Dev())
    set_state(src, MigState.PRE_COPY)
    assert src.engine.ops.running
    pre = read_all(src)
    set_state(dst, MigState.RESUMING)           # RUNNING -> STOP -> RESUMING
    assert dst.engine.ops.calls == ["stop"]
    dst.data_write(pre)
    set_state(src, MigState.STOP_COPY)
    assert not src.engine.ops.running
    stream = b""
    while True:
        d = src.data_read(100)
        if not d:
            break
        stream += d
    set_state(src, MigState.STOP)
    for i in range(0, len(stream), 77):
        dst.data_write(stream[i:i + 77])
    set_state(dst, MigState.RUNNING)            # RESUMING -> STOP (load) -> RUNNING
    assert dst.engine.ops.value == 42 and dst.engine.ops.running
    assert dst.engine.ops.calls == ["stop", "load", "start"]
    assert src.engine.last["result"] == "done" and dst.engine.last["result"] == "done"
    assert src.engine.last["snapshot_bytes"] > 500


def test_v2_cancel_returns_source_to_running():
    a = v2()
    set_state(a, MigState.STOP_COPY)
    assert a.data_read(10)
    set_state(a, MigState.RUNNING)
    assert a.engine.ops.running and a.engine.state is MigState.RUNNING
    assert a.engine.last["result"] == "cancelled"
    assert a.engine.pending() == 0


@pytest.mark.parametrize("src,dst", [(MigState.STOP_COPY, MigState.PRE_COPY), (MigState.RUNNING, 0),
                                     (MigState.RUNNING, 5), (MigState.RUNNING, 7), (MigState.RUNNING, 9)])
def test_v2_invalid_arcs_leave_state(src, dst):
    a = v2()
    set_state(a, src)
    with pytest.raises(ProtocolError) as e:
        set_state(a, dst)
    assert e.value.errno == errno.EINVAL and get_state(a) == src


def test_v2_feature_rules():
    a = v2()
    flags = struct.unpack("<Q", a.feature(16, GET | Feature.MIGRATION, b""))[0]
    assert flags == 1 | 4
    assert a.feature(8, PROBE | GET | Feature.MIGRATION, b"") == b""
    assert a.feature(8, PROBE | GET | SET | Feature.MIG_DEVICE_STATE, b"") == b""
    bad = [(8, GET | Feature.MIGRATION, b""),              # argsz too small for the reply
           (16, SET | Feature.MIGRATION, b"\0" * 8),       # MIGRATION cannot be SET
           (16, GET | SET | Feature.MIG_DEVICE_STATE, b""),  # GET|SET without PROBE
           (16, Feature.MIG_DEVICE_STATE, b""),            # no operation
           (16, GET | 3, b""), (16, GET | 9, b""),         # kernel-only / unknown features
           (8, SET | Feature.MIG_DEVICE_STATE, MigDeviceState(1).encode()),  # argsz < request
           (16, SET | Feature.MIG_DEVICE_STATE, b"\1\0"),  # short data
           (16, GET | (1 << 19) | Feature.MIGRATION, b"")]  # unknown operation bit
    for argsz, flags, data in bad:
        with pytest.raises(ProtocolError) as e:
            a.feature(argsz, flags, data)
        assert e.value.errno == errno.EINVAL, (argsz, hex(flags))
    assert get_state(a) == MigState.RUNNING
    assert V2Adapter.needs_quiesce(SET | Feature.MIG_DEVICE_STATE, b"")
    assert not V2Adapter.needs_quiesce(PROBE | SET | Feature.MIG_DEVICE_STATE, b"")
    assert not V2Adapter.needs_quiesce(GET | Feature.MIG_DEVICE_STATE, b"")


def test_v2_data_in_wrong_state_and_sizes():
    a = v2()
    for fn in (lambda: a.data_read(8), lambda: a.data_write(b"x")):
        with pytest.raises(ProtocolError) as e:
            fn()
        assert e.value.errno == errno.EINVAL
    set_state(a, MigState.RESUMING)
    with pytest.raises(ProtocolError):
        a.data_read(8)
    with pytest.raises(ProtocolError):
        a.data_write(b"x" * ((1 << 20) + 1))


@pytest.mark.parametrize("mutate", ["truncate", "corrupt", "newer", "foreign", "garbage"])
def test_v2_bad_stream_refused_and_retry_works(mutate):
    src, dst = v2(Dev(value=7)), v2(Dev())
    set_state(src, MigState.STOP_COPY)
    good = read_all(src, 1 << 16)
    set_state(dst, MigState.RESUMING)
    if mutate == "truncate":
        dst.data_write(good[:-5])
        with pytest.raises(ProtocolError) as e:
            set_state(dst, MigState.RUNNING)
    else:
        bad = {"corrupt": good[:-3] + b"xyz",
               "newer": snapshot.encode({"identity": "dev"}, major=snapshot.FORMAT_MAJOR + 1),
               "foreign": snapshot.encode({"identity": "other", "value": 1}),
               "garbage": b"\0" * 64}[mutate]
        with pytest.raises(ProtocolError) as e:
            dst.data_write(bad)
    assert e.value.errno == errno.EINVAL
    assert dst.engine.state is MigState.RESUMING and dst.engine.ops.value == 0
    dst.data_write(good)                      # a good stream after the bad one still loads
    set_state(dst, MigState.RUNNING)
    assert dst.engine.ops.value == 7


def test_v2_stop_without_data_is_refused():
    a = v2()
    set_state(a, MigState.RESUMING)
    with pytest.raises(ProtocolError):
        set_state(a, MigState.STOP)
    assert a.engine.state is MigState.RESUMING


def test_v2_dma_logging():
    a = v2()
    a.feature(24, SET | Feature.DMA_LOGGING_START, DmaLoggingStart(4096).encode())
    a.dirty.log.mark(0x3000, 100)
    req = DmaLoggingReport(0, 1 << 20, 4096).encode()
    need = 8 + 24 + 32
    with pytest.raises(ProtocolError):
        a.feature(need - 1, GET | Feature.DMA_LOGGING_REPORT, req)
    rep = DmaLoggingReport.decode(a.feature(need, GET | Feature.DMA_LOGGING_REPORT, req))
    assert int.from_bytes(rep.bitmap, "little") == 1 << 3
    with pytest.raises(ProtocolError):      # a zero/odd page size
        a.feature(need, GET | Feature.DMA_LOGGING_REPORT, DmaLoggingReport(0, 1 << 20, 3).encode())
    a.feature(8, SET | Feature.DMA_LOGGING_STOP, b"")
    with pytest.raises(ProtocolError):
        a.feature(need, GET | Feature.DMA_LOGGING_REPORT, req)


# ----------------------------------------------------------------------------- v1

def v1(dev=None):
    eng = MigrationEngine(dev or Dev())
    area = memoryview(bytearray(AREA_SIZE))
    return V1Region(eng, area)


def rd(r, off, n):
    return int.from_bytes(r.read(off, n), "little")


def wr(r, off, v, n):
    r.write(off, v.to_bytes(n, "little"))


def set_state_v1(r, mask, value):
    """QEMU's vfio_migration_set_state: read, (old & mask) | value, write."""
    old = rd(r, REG_DEVICE_STATE, 4)
    wr(r, REG_DEVICE_STATE, (old & mask) | value, 4)


def v1_save(r, via_mmap=True):
    """QEMU's buffer loop: pending -> data_offset -> data_size -> data, until pending is 0."""
    chunks = []
    while rd(r, REG_PENDING_BYTES, 8):
        off = rd(r, REG_DATA_OFFSET, 8)
        size = rd(r, REG_DATA_SIZE, 8)
        if not size:
            break
        if via_mmap:
            chunks.append(bytes(r.area[off - DATA_OFFSET:off - DATA_OFFSET + size]))
        else:
            chunks.append(r.read(off, size))
    return chunks


def v1_load(r, chunks):
    for c in chunks:
        off = rd(r, REG_DATA_OFFSET, 8)
        r.write(off, c)
        wr(r, REG_DATA_SIZE, len(c), 8)


def test_v1_qemu_sequence_source_to_destination():
    src, dst = v1(Dev(value=99, pad=AREA_SIZE + 1000)), v1(Dev())
    set_state_v1(src, 7, 2)                   # save_setup: mask = all valid bits, SAVING -> pre-copy 3
    assert rd(src, REG_DEVICE_STATE, 4) == 3
    pre = v1_save(src)
    assert rd(src, REG_PENDING_BYTES, 8) == 0  # finished: idempotent zero
    set_state_v1(src, ~1 & 0xFFFFFFFF, 0)      # VM stops: clear RUNNING -> 2
    set_state_v1(src, ~1 & 0xFFFFFFFF, 2)      # complete_precopy: make sure it is 2
    final = v1_save(src, via_mmap=False)
    assert len(final) == 2                     # bigger than one data area: two chunks
    set_state_v1(src, ~2 & 0xFFFFFFFF, 0)      # -> stopped
    assert rd(src, REG_DEVICE_STATE, 4) == 0 and src.engine.last["result"] == "done"
    set_state_v1(dst, ~7 & 0xFFFFFFFF, 4)    # load_setup: RESUMING
    v1_load(dst, pre + final)
    set_state_v1(dst, ~7 & 0xFFFFFFFF, 1)    # VM starts
    assert dst.engine.ops.value == 99 and rd(dst, REG_DEVICE_STATE, 4) == 1


def test_v1_cancel_from_precopy():
    r = v1()
    set_state_v1(r, 7, 2)
    v1_save(r)
    set_state_v1(r, ~2 & 0xFFFFFFFF, 1)        # cancel: RUNNING set, SAVING cleared
    assert rd(r, REG_DEVICE_STATE, 4) == 1 and r.engine.ops.running


@pytest.mark.parametrize("off,n", [(0, 8), (0, 2), (4, 4), (8, 4), (16, 4), (24, 2), (32, 8), (0x800, 8)])
def test_v1_register_sizes(off, n):
    r = v1()
    with pytest.raises(ProtocolError) as e:
        r.read(off, n)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("value", [5, 6, 7, 8, 0x11])
def test_v1_invalid_states(value):
    r = v1()
    with pytest.raises(ProtocolError):
        wr(r, REG_DEVICE_STATE, value, 4)
    assert rd(r, REG_DEVICE_STATE, 4) == 1


def test_v1_refused_edge_and_sequence_errors():
    r = v1()
    wr(r, REG_DEVICE_STATE, 2, 4)              # stop-and-copy
    with pytest.raises(ProtocolError):
        wr(r, REG_DEVICE_STATE, 3, 4)          # stop&copy -> pre-copy
    with pytest.raises(ProtocolError):
        rd(r, REG_DATA_OFFSET, 8)              # before pending_bytes
    with pytest.raises(ProtocolError):
        wr(r, REG_PENDING_BYTES, 1, 8)         # read-only
    with pytest.raises(ProtocolError):
        wr(r, REG_DATA_SIZE, 1, 8)             # read-only while saving
    with pytest.raises(ProtocolError):
        r.write(DATA_OFFSET, b"x")             # data writes only while resuming
    wr(r, REG_DEVICE_STATE, 0, 4)
    with pytest.raises(ProtocolError):
        r.read(DATA_OFFSET, 8)                 # no data to read when stopped
    assert rd(r, REG_DEVICE_STATE, 4) == 0


def test_v1_bad_chunk_fails_commit():
    r = v1()
    wr(r, REG_DEVICE_STATE, 4, 4)
    r.write(DATA_OFFSET, b"NOTASNAPSHOT....")
    with pytest.raises(ProtocolError):
        wr(r, REG_DATA_SIZE, 16, 8)
    with pytest.raises(ProtocolError):
        wr(r, REG_DATA_SIZE, AREA_SIZE + 1, 8)
    with pytest.raises(ProtocolError):
        wr(r, REG_DEVICE_STATE, 1, 4)          # nothing loaded: RESUMING -> RUNNING fails
    assert rd(r, REG_DEVICE_STATE, 4) == 4
