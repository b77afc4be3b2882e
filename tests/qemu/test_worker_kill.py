"""A Linux guest runs fio with verify while vnvmed's worker - or its front-end - is
SIGKILLed 5 times (issue 12).

Worker: the supervisor restarts it, the front-end re-attaches its queues from the queue
table (reactor/recovery.py).  Front-end: a new one takes over QEMU's vfio-user
connection, guest memory, interrupts and queues (reactor/rescue.py, reactor/revive.py).
Either way the guest must see nothing: fio reports 0 errors and verifies every block,
the nvme driver never resets the controller, no CFS.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(600)]
KILLS = 5


def _replaced(daemon: Daemon, role: str, dead: int) -> bool:
    if role == "worker":
        now = daemon.pids_named("worker")
        return bool(now) and now[0] != dead
    return daemon.log().count("recovered on the same connection") >= dead


@pytest.mark.parametrize("role", ["worker", "frontend"])
@pytest.mark.parametrize("ns", ["ram:64M", "file"])
def test_fio_verify_survives_sigkills(tmp_path: Path, ns: str, role: str) -> None:
    if ns == "file":
        img = tmp_path / "ns.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        ns = f"file:{img}"
    with harness.vnvmed_controller([ns]) as (daemon, sock):
        guest = harness.start_guest(devices=[sock], workload="fio",
                                    # 100 IOPS per job: 8 MiB of writes take ~20 s, so all
                                    # five kills land in the write phase, then fio verifies
                                    args={"mb": 8, "rt": 90, "frate": 100, "nns": 1},
                                    workdir=tmp_path, daemon=daemon)
        killed = []
        with guest:
            guest.wait_for("WL", timeout=240)
            time.sleep(2)                        # fio's writes are in flight
            for i in range(KILLS):
                (w,) = daemon.pids_named(role)
                os.kill(w, signal.SIGKILL)
                killed.append(w)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:   # its replacement is up
                    if _replaced(daemon, role, w if role == "worker" else i + 1):
                        break
                    time.sleep(0.1)
                time.sleep(2)
            res = guest.wait(timeout=300)
        log = daemon.log()
    iops = harness.expect_fio_verify_two_queues(res)
    res.expect(log.count("died with exit code -9") == KILLS, f"expected {KILLS} {role} deaths:\n{log[-3000:]}")
    done = "worker 0 replaced" if role == "worker" else "recovered on the same connection"
    res.expect(log.count(done) == KILLS, f"recovery did not run {KILLS} times:\n{log[-3000:]}")
    res.expect("controller fatal" not in log, f"the controller went fatal:\n{log[-3000:]}")
    res.expect(not re.search(r"nvme.*(reset|timeout|abort|I/O error|Cancell)", res.console, re.I),
               f"the guest's nvme driver saw the {role} deaths")
    retried = sum(int(m) for m in re.findall(r"(\d+) command\(s\) to retry", log))
    print(f"{KILLS} {role} SIGKILLs under fio verify ({ns.split(':')[0]} namespace): "
          f"0 fio errors, {retried} retryable completions, {iops} write IOPS")
