"""Guest- and client-triggered log lines are rate-limited in the real daemon (issue 12).

A client that sends 500 malformed requests, or a guest that toggles CC.EN 60 times,
must not write 500 (or 120) lines: a few per minute and key, then one
"suppressed N messages" line.  Our own events stay unlimited.
"""
from __future__ import annotations

import errno

import pytest

from tests.daemon import Daemon
from tests.integration.conftest import Host
from vfio_user.errors import ProtocolError

pytestmark = pytest.mark.timeout(90)
ARGS = ["--cores", "0", "--controller", "nvme0={run}/nvme0.sock", "--namespace", "nvme0=ram:4M"]


@pytest.mark.daemon_args(ARGS)
def test_malformed_request_flood_is_rate_limited(daemon: Daemon) -> None:
    h = Host(daemon.socket)
    try:
        for _ in range(500):
            with pytest.raises(ProtocolError) as e:
                h.client.region_read(8, 0, 4)           # VGA: not readable here
            assert e.value.errno == errno.EINVAL
        assert h.client.get_device_info().num_regions > 0
    finally:
        h.close()
    log = daemon.log()
    refused = [ln for ln in log.splitlines() if "REGION_READ" in ln and "msg " in ln]
    assert 1 <= len(refused) <= 6, f"{len(refused)} lines for 500 bad requests"


@pytest.mark.daemon_args(ARGS)
def test_cc_toggling_guest_is_rate_limited(daemon: Daemon) -> None:
    h = Host(daemon.socket)
    try:
        n = h.nvme
        assert n is not None
        for _ in range(60):
            n.enable()
            n.disable()
        n.enable()
        n.identify(1)                                    # still serving
    finally:
        h.close()
    log = daemon.log()
    assert 1 <= log.count("controller enabled") <= 6, log.count("controller enabled")
    assert 1 <= log.count("controller disabled") <= 6
    assert "rate limit: more messages for controller enabled suppressed" in log
