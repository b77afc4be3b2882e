"""DMA_READ (11) / DMA_WRITE (12), server -> client, for memory mapped without fd.

The device starts the DMA from a register write (its own task, never the pipeline),
and the client serves the request while it is itself waiting for a reply (polling
the status register), in QEMU's layout and the spec's.
"""
import errno
import struct
import time

import pytest

from vfio_user.client import QEMU_VERSION_JSON, SPEC_VERSION_JSON, VfioUserClient
from vfio_user.dmamsg import DmaLayout
from vfio_user.wire import Command, Region

IOVA = 0xC0000


def _start(client, addr, length, cmd):
    client.region_write(Region.BAR0, 0x100, struct.pack("<Q", addr))
    client.region_write(Region.BAR0, 0x108, struct.pack("<I", length))
    client.region_write(Region.BAR0, 0x10C, struct.pack("<I", cmd))


def _wait_status(client, timeout=5.0):
    """Poll the status register: each poll waits for a reply while DMA requests arrive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = struct.unpack("<I", client.region_read(Region.BAR0, 0x110, 4))[0]
        if st not in (0, 1):
            return st
    raise AssertionError("DMA did not finish")


def _client(server, layout, json):
    c = VfioUserClient(server.path, timeout=3.0, dma_layout=layout)
    c.negotiate(json)
    return c


@pytest.mark.parametrize("layout,json", [(DmaLayout.QEMU, QEMU_VERSION_JSON),
                                         (DmaLayout.SPEC, SPEC_VERSION_JSON)])
def test_dma_read_and_write_without_fd(server, device, layout, json):
    c = _client(server, layout, json)
    try:
        rom = bytearray(b"\xAA\xBB\xCC\xDD" + bytes(range(256)) * 16)
        c.add_dma_buffer(IOVA, rom, writable=True)
        c.dma_map(IOVA, 0x40000, None)
        _start(c, IOVA + 0, 1000, 1)
        assert _wait_status(c) == 2
        assert device.dma_result == bytes(rom[:1000])
        assert (Command.DMA_READ, IOVA, 1000) in c.dma_served

        device.dma_payload = b"written-by-device" * 10
        _start(c, IOVA + 0x100, len(device.dma_payload), 2)
        assert _wait_status(c) == 2
        assert bytes(rom[0x100:0x100 + len(device.dma_payload)]) == device.dma_payload
    finally:
        c.close()


def test_layout_learned_from_unambiguous_reply(server, device):
    # Client speaks QEMU's layout but its JSON does not look like QEMU: the first
    # reply with non-zero data in bytes 12..16 proves the layout, later writes use it.
    c = _client(server, DmaLayout.QEMU, SPEC_VERSION_JSON)
    try:
        mem = bytearray(b"\x01\x02\x03\x04" * 64)
        c.add_dma_buffer(IOVA, mem)
        _start(c, IOVA, 16, 1)
        assert _wait_status(c) == 2 and device.dma_result == bytes(mem[:16])
        assert server.call(lambda: device.session.dma_layout) is DmaLayout.QEMU
        device.dma_payload = b"zyxw"
        _start(c, IOVA + 8, 4, 2)
        assert _wait_status(c) == 2 and mem[8:12] == b"zyxw"
    finally:
        c.close()


def test_dma_large_read_is_chunked(server, device):
    c = VfioUserClient(server.path, timeout=3.0, dma_layout=DmaLayout.SPEC)
    try:
        c.negotiate('{"capabilities": {"max_data_xfer_size": 4096}}')
        mem = bytearray(range(256)) * 64          # 16 KiB
        c.add_dma_buffer(IOVA, mem)
        _start(c, IOVA, len(mem), 1)
        assert _wait_status(c) == 2 and device.dma_result == bytes(mem)
        # (bytes 0,1,2,3 first: the first reply fits both layouts, one 1-byte probe tells)
        assert [x[2] for x in c.dma_served if x[2] != 1] == [4096] * 4
        assert len(c.dma_served) <= 5
    finally:
        c.close()


def test_client_error_reply_reaches_device(server, device, client):
    _start(client, 0xDEAD000, 16, 1)          # the client has no such memory: EFAULT
    assert _wait_status(client) == 0x100 | errno.EFAULT


def test_dma_timeout(server, device, client):
    server.call(lambda: setattr(device.session, "dma_timeout", 0.2))
    _start(client, IOVA, 16, 1)
    # Do not serve the request: just wait, then look at the status.
    f = client.recv_message()
    assert f.header.command == Command.DMA_READ
    time.sleep(0.4)
    assert _wait_status(client) == 0x100 | errno.ETIMEDOUT


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_first_dma_is_a_write_in_either_layout(server, device, layout):
    # QEMU's VERSION JSON, either layout (10.1's u32 count, or 11.1's spec layout): the
    # first DMA_WRITE goes out in the spec layout; a header-only reply proves 10.1's,
    # and the same bytes are written again in it.
    c = _client(server, layout, QEMU_VERSION_JSON)
    try:
        mem = bytearray(64)
        c.add_dma_buffer(IOVA, mem)
        device.dma_payload = b"\x11\x22\x33\x44written-first"
        _start(c, IOVA + 8, len(device.dma_payload), 2)
        assert _wait_status(c) == 2
        assert bytes(mem[8:8 + len(device.dma_payload)]) == device.dma_payload
        assert bytes(mem[:8]) == bytes(8) and not any(mem[8 + len(device.dma_payload):])
        assert server.call(lambda: device.session.dma_layout) is layout
        writes = [x for x in c.dma_served if x[0] == Command.DMA_WRITE]
        assert len(writes) == (2 if layout is DmaLayout.QEMU else 1)
    finally:
        c.close()


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_ambiguous_read_is_probed(server, device, layout):
    c = _client(server, layout, QEMU_VERSION_JSON)
    try:
        mem = bytearray(b"\0\0\0\0\0\x07data" + bytes(54))
        c.add_dma_buffer(IOVA, mem)
        _start(c, IOVA, 16, 1)
        assert _wait_status(c) == 2 and device.dma_result == bytes(mem[:16])
        assert server.call(lambda: device.session.dma_layout) is layout
        assert [n for cmd, _, n in c.dma_served] == [16, 1]    # the read and one probe
    finally:
        c.close()
