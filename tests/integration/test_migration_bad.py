"""Bad migration input against a real daemon: every case gets the protocol's error
answer (EINVAL unless said otherwise, as libvfio-user), the migration state does not
move, and the controller keeps serving I/O (issue 10).

v2: invalid arcs, wrong argsz/sizes, data in the wrong state, truncated / corrupt /
newer-format / foreign streams.  v1: register sizes and offsets, invalid device_state
values, out-of-sequence reads, writes to read-only registers, a bad chunk commit.
DIRTY_PAGES: without the migration capability, bad flags, bad bitmap sizes.
"""
from __future__ import annotations

import errno
import struct

import pytest

from benchmarks.hostnvme import HostNvme
from migration import snapshot
from tests.migrig import connect, controller_info
from vfio_user.client import GuestRam, VfioUserClient
from vfio_user.errors import ProtocolError
from vfio_user.messages import MigData
from vfio_user.migdriver import (PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY, V1Driver,
                                 V2Driver)
from vfio_user.migmsg import DirtyPages, Feature
from vfio_user.wire import Command, FeatureFlag

RAM = 16 << 20
GET, SET = FeatureFlag.GET, FeatureFlag.SET


class Dev:
    def __init__(self, sock: str) -> None:
        self.ram = GuestRam(RAM)
        self.c = connect(sock, self.ram)
        self.nvme = HostNvme(self.c, self.ram)
        self.nvme.enable()
        self.nvme.create_io_queue(1, 32)
        self.buf = self.ram.alloc(4096)
        self.v2 = V2Driver(self.c)

    def serves(self) -> None:
        """Reads and writes still work (the controller kept serving)."""
        self.ram.view(self.buf, 4096)[:] = b"\x5a" * 4096
        assert self.nvme.rw(1, True, 2, 16, 8, self.buf) == 0
        self.ram.view(self.buf, 4096)[:] = bytes(4096)
        assert self.nvme.rw(1, False, 2, 16, 8, self.buf) == 0
        assert bytes(self.ram.view(self.buf, 4096)) == b"\x5a" * 4096

    def close(self) -> None:
        self.nvme.close()
        self.c.close()
        self.ram.close()


@pytest.fixture
def dev(mdaemon):
    d = Dev(mdaemon.socket)
    try:
        yield d
        # Whatever the test did, the controller ends where a guest expects it.
        if d.v2.get_state() != RUNNING:
            d.c.reset()
    finally:
        d.close()


def refused(fn, err=errno.EINVAL):
    with pytest.raises(ProtocolError) as e:
        fn()
    assert e.value.errno == err, e.value
    return e.value


# ------------------------------------------------------------------------- v2 arcs

@pytest.mark.parametrize("target", [0, 5, 7, 8, 0xFFFFFFFF])
def test_v2_unrequestable_states(dev, target):
    refused(lambda: dev.v2.set_state(target))
    assert dev.v2.get_state() == RUNNING
    dev.serves()


def test_v2_stop_copy_to_pre_copy_refused(dev):
    dev.v2.set_state(STOP_COPY)
    refused(lambda: dev.v2.set_state(PRE_COPY))
    assert dev.v2.get_state() == STOP_COPY
    dev.v2.set_state(RUNNING)                    # cancel: back to running, nothing lost
    dev.serves()


def test_v2_feature_sizes_and_operations(dev):
    c = dev.c
    refused(lambda: c.device_feature(GET | Feature.MIGRATION, argsz=8))          # reply won't fit
    refused(lambda: c.device_feature(GET | Feature.MIG_DEVICE_STATE, argsz=15))
    refused(lambda: c.device_feature(SET | Feature.MIG_DEVICE_STATE, b"\2\0\0"))  # short data
    refused(lambda: c.device_feature(SET | Feature.MIG_DEVICE_STATE, struct.pack("<Ii", 1, -1), argsz=8))
    refused(lambda: c.device_feature(SET | Feature.MIGRATION, b"\0" * 8))         # not settable
    refused(lambda: c.device_feature(GET | SET | Feature.MIG_DEVICE_STATE, argsz=16))
    refused(lambda: c.device_feature(GET | 3, argsz=16))
    refused(lambda: c.device_feature(GET | Feature.DMA_LOGGING_REPORT,
                                     struct.pack("<QQQ", 0, RAM, 4096), argsz=4096))  # not logging
    refused(lambda: c.device_feature(SET | Feature.DMA_LOGGING_START, struct.pack("<QII", 3000, 0, 0)))
    refused(lambda: c.device_feature(SET | Feature.DMA_LOGGING_START, struct.pack("<QII", 4096, 2, 0)))
    assert dev.v2.get_state() == RUNNING
    assert dev.v2.migration_flags() == 1 | 4
    dev.serves()


def test_v2_set_and_probe_replies_echo_the_request(dev):
    c = dev.c
    data = struct.pack("<Ii", RUNNING, -1)
    r = c.device_feature(SET | Feature.MIG_DEVICE_STATE, data, argsz=64)
    assert (r.argsz, r.flags, r.data) == (64, SET | Feature.MIG_DEVICE_STATE, data)
    r = c.device_feature(FeatureFlag.PROBE | SET | Feature.MIG_DEVICE_STATE, argsz=8)
    assert (r.argsz, r.data) == (8, b"")
    r = c.device_feature(GET | Feature.MIG_DEVICE_STATE, argsz=64)
    assert r.argsz == 16 and len(r.data) == 8          # GET: the reply's own size


# ------------------------------------------------------------------------- v2 data

def test_v2_data_in_the_wrong_state(dev):
    refused(lambda: dev.c.mig_data_read(64))
    refused(lambda: dev.c.mig_data_write(b"x" * 64))
    dev.v2.set_state(STOP_COPY)
    refused(lambda: dev.c.mig_data_write(b"x" * 64))
    dev.v2.set_state(STOP)
    refused(lambda: dev.c.mig_data_read(64))
    dev.v2.set_state(RESUMING)
    refused(lambda: dev.c.mig_data_read(64))
    refused(lambda: dev.v2.set_state(RUNNING))   # nothing received: the load arc fails
    assert dev.v2.get_state() == RESUMING
    dev.c.reset()                                # a reset leaves a migration
    assert dev.v2.get_state() == RUNNING


def test_v2_data_sizes(dev):
    dev.v2.set_state(STOP_COPY)
    c = dev.c
    refused(lambda: c.request(Command.MIG_DATA_READ, MigData(8, 64).encode()))         # argsz < 8+size
    refused(lambda: c.request(Command.MIG_DATA_READ, MigData(8 + (2 << 20), 2 << 20).encode()))
    refused(lambda: c.request(Command.MIG_DATA_WRITE, MigData(20, 12, b"abc").encode()))
    refused(lambda: c.request(Command.MIG_DATA_READ, b"\0\0"))
    assert dev.v2.get_state() == STOP_COPY
    assert dev.v2.read_until_zero()              # the stream is intact after the bad requests
    dev.v2.set_state(RUNNING)
    dev.serves()


def _stream(dev) -> bytes:
    """A real snapshot of this controller (then back to running)."""
    data = dev.v2.stop_copy()
    dev.v2.set_state(RUNNING)
    return data


@pytest.mark.parametrize("bad", ["truncated", "corrupt", "newer", "foreign", "garbage", "precopy-only"])
def test_v2_bad_streams_refused(dev, mdaemon, bad):
    good = _stream(dev)
    snap = snapshot.decode(good)
    ident = dict(snap.section("identity"))
    ident["cfg"] = dict(ident["cfg"], serial="SOMEBODY-ELSE")
    stream = {
        "truncated": good[:-10],
        "corrupt": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
        "newer": snapshot.encode({"identity": ident}, major=snapshot.FORMAT_MAJOR + 1),
        "foreign": snapshot.encode({n: (ident if n == "identity" else snap.section(n))
                                    for n in snap.order}, required=snap.order),
        "garbage": b"\0" * 512,
        "precopy-only": snapshot.encode({"identity": snap.section("identity")}),
    }[bad]
    # The same controller plays the destination (one client per controller).
    dev.v2.set_state(RESUMING)
    if bad in ("truncated", "precopy-only"):
        dev.v2.write(stream)                      # accepted so far ...
        e = refused(lambda: dev.v2.set_state(STOP))   # ... but incomplete at STOP
    else:
        e = refused(lambda: dev.v2.write(stream))
    assert dev.v2.get_state() == RESUMING
    # The reason reaches the operator (vnvmectl controller list --json: migration.current).
    why = controller_info(mdaemon)["migration"]["current"]["result"]
    assert why.startswith("failed: "), why
    if bad == "newer":
        assert f"{snapshot.FORMAT_MAJOR + 1}.0 is newer" in why
    if bad == "foreign":
        assert "SOMEBODY-ELSE" in why
    # The good stream still loads after the bad one, and the controller runs on.
    dev.v2.write(good)
    dev.v2.set_state(RUNNING)
    dev.serves()
    assert e.errno == errno.EINVAL


def test_v2_ring_memory_not_mapped_refused(dev):
    good = _stream(dev)
    snap = snapshot.decode(good)
    ctrl = dict(snap.section("controller"))
    q = dict(ctrl["queues"])
    q["cqs"] = [dict(c, base=1 << 40) for c in q["cqs"]]
    ctrl["queues"] = q
    bad = snapshot.encode({n: (ctrl if n == "controller" else snap.section(n)) for n in snap.order},
                          required=snap.order)
    dev.v2.set_state(RESUMING)
    refused(lambda: dev.v2.write(bad))
    dev.v2.write(good)
    dev.v2.set_state(RUNNING)
    dev.serves()


# ------------------------------------------------------------------------- v1

@pytest.fixture
def v1(dev):
    drv = V1Driver(dev.c)
    yield drv
    drv.close()


@pytest.mark.parametrize("off,n", [(0, 8), (0, 2), (4, 4), (8, 4), (16, 4), (24, 4), (28, 4), (32, 8),
                                   (0x800, 4)])
def test_v1_register_accesses(dev, v1, off, n):
    refused(lambda: dev.c.region_read(v1.index, off, n))
    refused(lambda: dev.c.region_write(v1.index, off, bytes(n)))
    assert v1.state() == 1
    dev.serves()


@pytest.mark.parametrize("value", [5, 6, 7, 8, 0x101])
def test_v1_invalid_device_state(dev, v1, value):
    refused(lambda: dev.c.region_write(v1.index, 0, struct.pack("<I", value)))
    assert v1.state() == 1
    dev.serves()


def test_v1_sequence_errors_and_read_only_registers(dev, v1):
    c, i = dev.c, v1.index
    refused(lambda: c.region_write(i, 8, bytes(8)))               # pending_bytes is read-only
    refused(lambda: c.region_read(i, 16, 8))                      # data_offset means nothing running
    v1.set_state(~1 & 0xFFFFFFFF, 2)                              # stop-and-copy
    refused(lambda: c.region_read(i, 16, 8))                      # data_offset before pending_bytes
    refused(lambda: c.region_write(i, 24, bytes(8)))              # data_size is read-only when saving
    refused(lambda: c.region_write(i, 0x1000, b"x" * 8))          # data area: written only resuming
    refused(lambda: c.region_write(i, 0, struct.pack("<I", 3)))  # stop&copy -> pre-copy
    assert v1.state() == 2
    v1.cancel()                                                   # back to running
    assert v1.state() == 1
    dev.serves()


def test_v1_bad_chunk_commit(dev, v1):
    v1.load_setup()
    off = v1._rd(16, 8)
    v1._write_data(off, b"NOT A SNAPSHOT" * 10)
    refused(lambda: v1._wr(24, 140, 8))                           # commit: not a snapshot
    refused(lambda: v1._wr(24, 1 << 30, 8))                       # larger than the data area
    with pytest.raises(ProtocolError):
        v1.vm_started()                                           # nothing loaded
    assert v1.state() == 4
    dev.c.reset()
    assert v1.state() == 1


# ------------------------------------------------------------------------- DIRTY_PAGES

def test_dirty_pages_needs_the_migration_capability(mdaemon):
    ram = GuestRam(RAM)
    c = VfioUserClient(mdaemon.socket)
    try:
        c.negotiate('{"capabilities": {"max_msg_fds": 8}}')
        c.dma_map(0, RAM, ram.fd)
        refused(lambda: c.request(Command.DIRTY_PAGES, DirtyPages(8, 1).encode()), errno.ENOTSUP)
    finally:
        c.close()
        ram.close()


def test_dirty_pages_bad_requests(dev, v1):
    c = dev.c
    refused(lambda: c.request(Command.DIRTY_PAGES, DirtyPages(8, 3).encode()))       # START|STOP
    refused(lambda: c.request(Command.DIRTY_PAGES, DirtyPages(4, 1).encode()))       # argsz < 8
    v1.dirty(1)
    req = DirtyPages(8 + 32 + 100, 4, 0, RAM, 4096, 100)                              # wrong size
    refused(lambda: c.request(Command.DIRTY_PAGES, req.encode()))
    req = DirtyPages(8 + 32 + 512, 4, 0, RAM, 3000, 512)                              # odd page
    refused(lambda: c.request(Command.DIRTY_PAGES, req.encode()))
    # argsz too small for the bitmap: header only, carrying the argsz it needs (libvfio-user)
    req = DirtyPages(8, 4, 0, RAM, 4096, 512)
    f = c.request(Command.DIRTY_PAGES, req.encode())
    r = DirtyPages.decode_reply(f.payload)
    assert len(f.payload) == 8 and r.argsz == 8 + 32 + 512
    f.close()
    assert len(v1.dirty_bitmap(0, RAM)) == 512
    v1.dirty(2)
    dev.serves()


def test_a_disabled_controller_migrates_too(mdaemon):
    """No admin queue, no I/O queues: the snapshot still round-trips (CC.EN=0 stays 0)."""
    ram = GuestRam(RAM)
    c = connect(mdaemon.socket, ram)
    try:
        drv = V2Driver(c)
        data = drv.stop_copy()
        drv.set_state(RUNNING)
        drv.resume_begin()
        drv.write(data)
        drv.resume_end()
        assert drv.get_state() == RUNNING
        nvme = HostNvme(c, ram)
        assert nvme.reg_read(0x14) & 1 == 0
        nvme.enable()                                 # and it still enables normally
        nvme.create_io_queue(1, 8)
        buf = ram.alloc(4096)
        assert nvme.rw(1, False, 2, 0, 8, buf) == 0
        nvme.close()
    finally:
        c.close()
        ram.close()
