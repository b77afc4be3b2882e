"""Doorbells written while CC.EN=0 or after DEVICE_RESET read as 0 at the next enable.

Found from outside (issue 12): an admin SQ tail written while the controller was
disabled made the enabled controller fetch a lap of zero-filled SQEs the host never
submitted; an admin CQ head written while disabled meant no admin command ever
completed.  Checked through the real daemon with mmapped doorbells (guest MMIO into the
shared page) and trapped ones (every write a REGION_WRITE).
"""
from __future__ import annotations

import time

import pytest

from benchmarks.hostnvme import HostNvme
from tests.daemon import Daemon
from tests.integration.conftest import Host, finish_daemon, start_daemon

pytestmark = pytest.mark.timeout(60)

ARGS = ["--cores", "0", "--controller", "nvme0={run}/nvme0.sock", "--namespace", "nvme0=ram:16M"]


@pytest.fixture(scope="module", params=["mmap", "trapped"])
def mode_daemon(request: pytest.FixtureRequest) -> tuple[str, Daemon]:
    args = ARGS + (["--doorbells", "nvme0=trapped"] if request.param == "trapped" else [])
    d = start_daemon(args)
    try:
        yield request.param, d
    finally:
        finish_daemon(d)


def _stale(n: HostNvme, qid: int = 0) -> None:
    n.ring(0, 5)                 # admin SQ tail: 5 entries the host never wrote
    n.ring(0, 3, cq=True)        # admin CQ head: 3 entries the host never consumed
    n.ring(1, 9)                 # an I/O queue's doorbells too (it does not exist yet)
    n.ring(1, 4, cq=True)


@pytest.mark.parametrize("how", ["disable", "device_reset", "never_enabled"])
def test_stale_doorbells_do_not_reach_the_enabled_controller(mode_daemon: tuple[str, Daemon],
                                                             how: str) -> None:
    mode, d = mode_daemon
    h = Host(d.socket)
    try:
        n = h.nvme
        assert n is not None
        n.trapped = mode == "trapped"
        if how != "never_enabled":
            n.enable()
            n.identify(1)
            if how == "disable":
                n.disable()
            else:
                h.client.reset()
                n.queues.clear()
                assert n.reg_read(0x1C) & 1 == 0
        _stale(n)
        time.sleep(0.05)
        n.enable()
        q = n.queues[0]
        time.sleep(0.3)         # the admin poller runs several times meanwhile
        assert n.read(q.cq, 16 * q.cq_entries) == bytes(16 * q.cq_entries), \
            "the controller completed commands the host never submitted"
        idc = n.identify(1)      # the admin queue works from entry 0
        assert idc[:2] != b"\0\0"
        n.create_io_queue(1, 16)
        buf = n.ram.alloc(4096)
        n.fill(buf, b"\x5a" * 4096)
        assert n.rw(1, True, 1, 0, 8, buf) == 0
        n.fill(buf, bytes(4096))
        assert n.rw(1, False, 1, 0, 8, buf) == 0
        assert n.read(buf, 4096) == b"\x5a" * 4096
        st = n.reg_read(0x1C)
        assert st & 3 == 1, f"CSTS {st:#x}"
    finally:
        h.close()
