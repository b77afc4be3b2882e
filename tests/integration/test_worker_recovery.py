"""Transparent worker recovery through the real daemon (issue 12).

Verified random I/O on two controllers (two queues each) while workers are SIGKILLed
every ~3 s: the supervisor restarts them, the front-ends re-attach the queues from
the queue table, and the guest sees nothing - no controller-fatal reset, no lost,
doubled or wrong command (tests/stress/harness.py does the checking).
"""
from __future__ import annotations

import pytest

from tests.stress.harness import Stress, StressConfig, table

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("kind", ["ram", "file"])
def test_worker_kills_are_transparent(kind: str) -> None:
    cfg = StressConfig(ns_kind=kind, storm_every=0, reset_every=0, faults={"worker_kill": 3.0},
                       worker_kill_transparent=True, seed=7)
    s = Stress(cfg)
    try:
        s.start()
        s.run(15)
        summ = s.finish()
    finally:
        s.close()
    print(table(summ))
    assert s.problems(summ) == [], (s.problems(summ), summ["client_errors"])
    assert summ["faults"]["worker_kill"] >= 2 and summ["worker_restarts"] >= 2
    c = summ["clients"]
    assert c["cfs_resets"] == 0 and c["completed"] > 1000
