"""Guest memory mapped without an fd: commands run on the front-end's slow path.

A worker that meets such memory (a PRP list in firmware ROM, a buffer in fd-less RAM)
parks the command; the front-end performs it with vfio-user DMA_READ/DMA_WRITE
messages to the client — in QEMU 11.1's layout or the spec's — and the worker posts the
completion.  The client answers DMA requests only while it polls its socket, like
QEMU's main loop.
"""
from __future__ import annotations

import os
import select
import struct
import time

import pytest

from benchmarks.hostnvme import GuestRam, HostNvme
from tests.integration.conftest import close_guest
from vfio_user.client import VfioUserClient
from vfio_user.dmamsg import DmaLayout
from vfio_user.wire import Command, DmaMapFlag

MB = 1 << 20
ROM = 0xC0000000      # an fd-less region, served by DMA messages
PAGE = 4096


@pytest.fixture(params=[DmaLayout.QEMU, DmaLayout.SPEC], ids=["qemu-layout", "spec-layout"])
def setup(tmp_path, request, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=ram:8M")
    # the QEMU flavour is recognised from QEMU's VERSION JSON; the spec one from a plain JSON
    c = VfioUserClient(f"{tmp_path}/c0.sock", dma_layout=request.param)
    if request.param is DmaLayout.QEMU:
        c.negotiate()
    else:
        c.negotiate('{"capabilities": {"max_msg_fds": 8}}')
    ram = GuestRam(16 * MB)
    c.dma_map(0, 16 * MB, ram.fd, 0)
    h = HostNvme(c, ram)
    h.enable()
    h.create_io_queue(1, 16)
    yield d, c, ram, h
    close_guest(c, ram, h)
    assert d.stop() == 0


def _run(c: VfioUserClient, h: HostNvme, entry: bytes, timeout: float = 10.0) -> int:
    h.submit(1, entry)
    q = h.queues[1]
    deadline = time.monotonic() + timeout
    while True:
        c.poll(0.002)          # answer the server's DMA_READ/DMA_WRITE
        dw3 = struct.unpack_from("<I", h.ram.view(q.cq + q.head * 16 + 12, 4))[0]
        if (dw3 >> 16) & 1 == q.phase:
            break
        assert time.monotonic() < deadline, "no completion"
    (cid, st, _, _), = h.reap(1)
    return st


def test_prp_list_in_fdless_readonly_memory(setup):
    d, c, ram, h = setup
    rom = bytearray(PAGE)
    c.dma_map(ROM, PAGE, None, 0, flags=DmaMapFlag.READ)     # read-only, no fd (like SeaBIOS's)
    c.add_dma_buffer(ROM, rom, writable=False)
    data = os.urandom(4 * PAGE)
    buf = ram.alloc(4 * PAGE)
    ram.view(buf, 4 * PAGE)[:] = data
    struct.pack_into("<3Q", rom, 0, buf + PAGE, buf + 2 * PAGE, buf + 3 * PAGE)
    st = _run(c, h, h.sqe(0x01, h.next_cid(), 1, buf, ROM, (0, 0, 31)))   # write 16 KiB
    assert st == 0
    assert any(cmd == Command.DMA_READ and addr == ROM for cmd, addr, _ in c.dma_served)
    ram.view(buf, 4 * PAGE)[:] = bytes(4 * PAGE)
    st = _run(c, h, h.sqe(0x02, h.next_cid(), 1, buf, ROM, (0, 0, 31)))   # read it back
    assert st == 0 and bytes(ram.view(buf, 4 * PAGE)) == data


def test_data_buffer_in_fdless_memory_both_directions(setup):
    d, c, ram, h = setup
    fdless = bytearray(2 * PAGE)
    c.dma_map(ROM, 2 * PAGE, None, 0)
    c.add_dma_buffer(ROM, fdless, writable=True)
    fdless[:] = os.urandom(2 * PAGE)
    want = bytes(fdless)
    assert _run(c, h, h.sqe(0x01, h.next_cid(), 1, ROM, ROM + PAGE, (64, 0, 15))) == 0
    fdless[:] = bytes(2 * PAGE)
    assert _run(c, h, h.sqe(0x02, h.next_cid(), 1, ROM, ROM + PAGE, (64, 0, 15))) == 0
    assert bytes(fdless) == want
    assert any(cmd == Command.DMA_WRITE for cmd, _, _ in c.dma_served)


def test_fdless_buffer_outside_client_memory_fails_cleanly(setup):
    d, c, ram, h = setup
    c.dma_map(ROM, PAGE, None, 0)            # mapped, but the client cannot serve it
    st = _run(c, h, h.sqe(0x02, h.next_cid(), 1, ROM, 0, (0, 0, 7)))
    assert st & 0x7FF == 0x004               # Data Transfer Error (DNR set)
    buf = ram.alloc(PAGE)                    # the queue still works
    assert h.rw(1, True, 1, 0, 8, buf) == 0


def test_delete_sq_while_a_slow_path_command_is_parked(setup):
    """Delete I/O SQ while a command of that SQ waits on the slow path (the client has
    not answered its DMA_WRITE yet).  The worker used to wait for a slow_done that sat
    behind the delete on the same ring: the front-end stalled 2 s and the controller
    went fatal.  Now the delete waits for the front-end's own slow-path work on that SQ,
    then both complete and the controller carries on."""
    d, c, ram, h = setup
    fdless = bytearray(PAGE)
    c.dma_map(ROM, PAGE, None, 0)
    c.add_dma_buffer(ROM, fdless, writable=True)
    read = h.next_cid()
    h.submit(1, h.sqe(0x02, read, 1, ROM, 0, (0, 0, 7)))     # 4 KiB read into fd-less memory
    # The worker parks it and the front-end asks us for a DMA_WRITE: our socket turns
    # readable; we do not answer yet.
    assert select.select([c.sock], [], [], 10)[0], "the slow path never sent its DMA request"
    delete = h.next_cid()
    h.submit(0, h.sqe(0x00, delete, 0, 0, 0, (1,)))          # Delete I/O SQ 1
    time.sleep(0.5)               # the admin poller (<= 250 ms between polls) takes the delete
    deadline = time.monotonic() + 10
    done: dict[int, int] = {}
    while len(done) < 2 and time.monotonic() < deadline:
        c.poll(0.002)             # now answer the DMA request, as QEMU's main loop would
        for qid in (0, 1):
            e = h.poll_cqe(qid)
            if e is not None:
                done[e.cid] = e.status
    assert done.get(read) == 0 and done.get(delete) == 0, done
    assert bytes(fdless) == bytes(PAGE)                        # the ram namespace reads zeroes
    assert h.reg_read(0x1C) & 2 == 0                          # CSTS.CFS clear
    assert h.admin(0x04, 0, 0, 0, (1,))[0] == 0              # Delete I/O CQ 1
    del h.queues[1]
    h.create_io_queue(1, 16)                                  # and the controller carries on
    buf = ram.alloc(PAGE)
    assert h.rw(1, True, 1, 0, 8, buf) == 0


# --- message-write windows: read data bound for low memory goes by DMA_WRITE ------------
LOW = 0x7000                 # below 1 MiB, inside the default window [0, 1 MiB)


def _writes_into(c: VfioUserClient, since: int, lo: int, hi: int) -> int:
    return sum(n for cmd, addr, n in c.dma_served[since:]
               if cmd == Command.DMA_WRITE and lo <= addr < hi)


def _low_read(c: VfioUserClient, h: HostNvme, ram: GuestRam) -> tuple[bytes, int]:
    """Write 8 KiB from a buffer above 1 MiB, read it back into LOW; (data, DMA_WRITE bytes)."""
    # The client reaches its own RAM through DMA messages too (QEMU's memory API).
    c.add_dma_buffer(0, memoryview(ram.mm)[:MB], writable=True)
    data = os.urandom(2 * PAGE)
    hi = ram.alloc(2 * PAGE)
    assert hi >= MB
    ram.view(hi, 2 * PAGE)[:] = data
    n0 = len(c.dma_served)
    assert _run(c, h, h.sqe(0x01, h.next_cid(), 1, hi, hi + PAGE, (8, 0, 15))) == 0
    assert not c.dma_served[n0:], "a write payload is read through the mapping"
    ram.view(LOW, 2 * PAGE)[:] = bytes(2 * PAGE)
    n1 = len(c.dma_served)
    assert _run(c, h, h.sqe(0x02, h.next_cid(), 1, LOW, LOW + PAGE, (8, 0, 15))) == 0
    got = bytes(ram.view(LOW, 2 * PAGE))
    assert got == data
    # a read above 1 MiB never goes by message
    n2 = len(c.dma_served)
    assert _run(c, h, h.sqe(0x02, h.next_cid(), 1, hi, hi + PAGE, (8, 0, 15))) == 0
    assert not c.dma_served[n2:]
    return got, _writes_into(c, n1, LOW, LOW + 2 * PAGE)


def test_read_into_low_memory_goes_by_dma_write(setup):
    d, c, ram, h = setup
    _, nbytes = _low_read(c, h, ram)
    # (a client in QEMU 10.1's layout gets the first DMA_WRITE twice: see vfio_user/dmamsg.py)
    assert nbytes >= 2 * PAGE, "the read payload below 1 MiB did not travel as DMA_WRITE"


def test_read_straddling_the_window_goes_whole_by_dma_write(setup):
    d, c, ram, h = setup
    c.add_dma_buffer(0, memoryview(ram.mm)[:2 * MB], writable=True)
    data = os.urandom(2 * PAGE)
    src = ram.alloc(2 * PAGE)
    ram.view(src, 2 * PAGE)[:] = data
    assert _run(c, h, h.sqe(0x01, h.next_cid(), 1, src, src + PAGE, (16, 0, 15))) == 0
    at = MB - PAGE
    ram.view(at, 2 * PAGE)[:] = bytes(2 * PAGE)
    n0 = len(c.dma_served)
    assert _run(c, h, h.sqe(0x02, h.next_cid(), 1, at, at + PAGE, (16, 0, 15))) == 0
    assert bytes(ram.view(at, 2 * PAGE)) == data
    assert _writes_into(c, n0, at, at + 2 * PAGE) >= 2 * PAGE


def test_windows_off_reads_land_through_the_mapping(tmp_path, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--namespace", "c0=ram:8M", "--message-write-windows", "c0=none")
    c = VfioUserClient(f"{tmp_path}/c0.sock")
    c.negotiate()
    ram = GuestRam(16 * MB)
    c.dma_map(0, 16 * MB, ram.fd, 0)
    h = HostNvme(c, ram)
    try:
        h.enable()
        h.create_io_queue(1, 16)
        _, nbytes = _low_read(c, h, ram)
        assert nbytes == 0
    finally:
        close_guest(c, ram, h)
    assert d.stop() == 0


def test_dma_write_pages_are_in_the_dirty_log(setup):
    """Read data that travels by DMA_WRITE (a message-write window) is written by the
    device too: with logging on, its pages are reported like any other read's."""
    from vfio_user.migdriver import V2Driver
    d, c, ram, h = setup
    drv = V2Driver(c)
    drv.log_start(PAGE)
    drv.log_report(0, 16 * MB)                       # clear what the set-up wrote
    _, nbytes = _low_read(c, h, ram)
    assert nbytes >= 2 * PAGE
    bm = int.from_bytes(drv.log_report(0, MB), "little")
    got = {i for i in range(MB // PAGE) if bm >> i & 1}
    assert {LOW // PAGE, LOW // PAGE + 1} <= got, sorted(got)
    drv.log_stop()
