"""The stress suite on a CI budget: ~25 s of verified I/O on 2 controllers x 2 queues
under every fault (DMA storms, resets, client kill -9 + reconnect, namespace churn,
worker and front-end SIGKILL), with leak sampling.  Long runs: scripts/stress."""
from __future__ import annotations

import pytest

from tests.stress.harness import Stress, StressConfig, table

pytestmark = [pytest.mark.stress, pytest.mark.timeout(240)]


def test_stress_short() -> None:
    cfg = StressConfig(storm_every=2.0, reset_every=5.0, faults={
        "client_kill": 5.0, "worker_kill": 6.0, "frontend_kill": 8.0, "ns_churn": 4.0})
    s = Stress(cfg)
    try:
        s.start()
        s.run(25)
        summ = s.finish()
    finally:
        s.close()
    print(table(summ))
    assert s.problems(summ) == [], (s.problems(summ), summ["client_errors"])
    c = summ["clients"]
    assert c["completed"] > 1000 and c["bytes_verified"] > 0
    assert sum(summ["faults"].values()) >= 4
