"""The real daemon serves a client that reconnects the instant the previous one left.

Issue 12 (found from outside): a reconnect within ~20 ms of the previous client leaving
was refused ("refusing a second client while one is served") because teardown (quiesce,
queue deletion on the workers, unmap) was still running.  Each round here leaves an
enabled controller with I/O queues and data in flight behind, so teardown has real work,
and reconnects without any delay or retry.
"""
from __future__ import annotations

import socket
import time

import pytest

from tests.daemon import Daemon
from tests.integration.conftest import Host

pytestmark = pytest.mark.timeout(90)


@pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                          "--namespace", "nvme0=ram:16M"])
def test_immediate_reconnects_are_served(daemon: Daemon) -> None:
    for i in range(8):
        h = Host(daemon.socket)          # no retry inside: a refusal fails here
        try:
            n = h.nvme
            assert n is not None
            n.enable()
            n.create_io_queue(1, 32)
            n.create_io_queue(2, 32)
            buf = n.ram.alloc(4096)
            n.fill(buf, bytes([i]) * 4096)
            assert n.rw(1, True, 1, i * 8, 8, buf) == 0
            for k in range(16):          # left in flight (never reaped) on queue 2
                n.submit(2, n.sqe(0x02, n.next_cid(), 1, buf, 0, (k * 8, 0, 7)))
        finally:
            h.close()
    log = daemon.log()
    assert "refusing" not in log, log[-2000:]


@pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                          "--namespace", "nvme0=ram:16M"])
def test_extra_clients_refused_with_bounded_log(daemon: Daemon) -> None:
    h = Host(daemon.socket)
    try:
        socks = []
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket)
            socks.append(s)
        for s in socks:
            s.settimeout(5)
            assert s.recv(1) == b""
            s.close()
        assert h.client.get_device_info().num_regions > 0
        time.sleep(0.2)
        n = daemon.log().count("refusing")
        assert 1 <= n <= 6, f"{n} log lines for 100 refused clients"
    finally:
        h.close()
