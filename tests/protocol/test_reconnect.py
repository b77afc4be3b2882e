"""Disconnect/reconnect, one client at a time, socket path handling."""
import asyncio
import os
import socket
import stat

import pytest

from reactor.server import ServerError, VfioUserServer
from vfio_user.client import GuestRam, VfioUserClient, eventfd
from vfio_user.wire import Irq, IrqSetFlag as F, Region


def test_disconnect_tears_down_and_next_client_is_served(server, device):
    before = set(os.listdir("/proc/self/fd"))
    c = VfioUserClient(server.path, timeout=3.0)
    c.negotiate()
    ram = GuestRam(1 << 16)
    c.dma_map(0, 1 << 16, ram.fd)
    c.dma_map(0xC0000, 0x40000, None)
    efd = eventfd()
    c.set_irqs(Irq.MSIX, F.DATA_EVENTFD | F.ACTION_TRIGGER, 0, 1, [efd])
    c.region_write(Region.BAR0, 0x40, b"keep")
    c.close()
    ram.close()
    os.close(efd)
    server.wait_idle()
    tail = device.events[-5:]
    assert tail[0] == ("quiesce",) and tail[-2:] == [("resume",), ("disconnected",)]
    assert sorted(e[1] for e in tail if e[0] == "unmap") == [0, 0xC0000]
    assert set(os.listdir("/proc/self/fd")) == before     # DMA fds and eventfds closed

    c2 = VfioUserClient(server.path, timeout=3.0)
    c2.negotiate()
    assert c2.region_read(Region.BAR0, 0x40, 4) == b"keep"   # device state survives
    with GuestRam(1 << 16) as ram2:
        c2.dma_map(0, 1 << 16, ram2.fd)                       # old map is gone
    c2.close()


def test_client_reconnecting_at_once_is_queued_not_refused(server, device):
    """DESIGN §4: a client may reconnect the instant it disconnected (no wait for the
    server to notice); the new connection waits for the old session's teardown."""
    device.quiesce_delay = 0.2          # a teardown that takes a while
    for _ in range(3):
        c = VfioUserClient(server.path, timeout=3.0)
        c.negotiate()
        with GuestRam(1 << 16) as ram:
            c.dma_map(0, 1 << 16, ram.fd)
        c.close()                       # and straight back in
    c = VfioUserClient(server.path, timeout=3.0)
    c.negotiate()
    assert c.get_device_info().num_regions == 10
    c.close()
    server.wait_idle()
    assert device.events.count(("disconnected",)) >= 3


def test_second_client_refused_while_first_active(server):
    a = VfioUserClient(server.path, timeout=3.0)
    a.negotiate()
    b = VfioUserClient(server.path, timeout=3.0)
    assert b.expect_eof()
    assert a.get_device_info().num_regions == 10
    b.close()
    a.close()


def test_socket_mode(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


def _start(path, device):
    async def go():
        s = VfioUserServer(path, device)
        await s.start()
        await s.close()
    asyncio.run(go())


def test_live_listener_path_refused(server, device):
    with pytest.raises(ServerError, match="live listener"):
        _start(server.path, device)


def test_stale_socket_removed(tmp_path, device):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                       # the file stays, nobody listens
    _start(path, device)
    assert not os.path.exists(path)


def test_non_socket_path_refused(tmp_path, device):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ServerError):
        _start(str(path), device)
    assert path.read_text() == "x"


def test_close_with_active_client(tmp_path, device):
    from tests.protocol.conftest import ServerThread
    st = ServerThread(str(tmp_path / "c.sock"), device).start()
    c = VfioUserClient(st.path, timeout=3.0)
    c.negotiate()
    with GuestRam(4096) as ram:
        c.dma_map(0, 4096, ram.fd)
        st.stop()
    assert c.expect_eof()
    assert device.events[-1] == ("disconnected",) and ("unmap", 0, 4096) in device.events
    assert not os.path.exists(st.path)
    c.close()
