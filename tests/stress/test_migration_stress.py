"""100 live migrations back and forth between two vnvmed daemons under verified I/O.

The issue-10 stress case (tests/migrig.py, tests/verifyload.py): a guest with 4 I/O
queues at QD 32 of verified random 4 KiB I/O on a shared file namespace, migrated
A -> B -> A ... 100 times, alternating the v2 scheme (with pre-copy and DMA logging)
and the v1 region-9 scheme (QEMU's sequence), with I/O completing between every two
migrations.  Invariants as in tests/integration/test_migration.py, checked at the end
over all 100: every command completes exactly once, data verifies, the queues are
never re-created, both daemons exit cleanly.  The blackout figures are printed (the
benchmark that reports them is benchmarks/migration.py); no timing is asserted.
"""
from __future__ import annotations

import os

import pytest

from tests.migrig import Guest, migrate, percentile, start_hosts, stop_hosts

pytestmark = [pytest.mark.stress, pytest.mark.timeout(900)]

ROUNDS = int(os.environ.get("VNVMED_MIGRATION_ROUNDS", "100"))


def test_migrate_back_and_forth_100_times():
    daemons, img = start_hosts(2)
    a, b = daemons
    g = None
    blackouts: list[float] = []
    try:
        g = Guest.boot(a)
        g.load.start()
        g.load.wait_completions(500)
        for i in range(ROUNDS):
            scheme = ("v2", "v1")[i % 2]
            fig = migrate(g, b if g.daemon is a else a, scheme, precopy=i % 4 < 2,
                          check_regs=i % 10 == 0)
            blackouts.append(fig.blackout_ms)
            g.load.wait_completions(200)      # the guest's queues work on every destination
        g.load.stop()
        assert not g.load.errors, g.load.errors[:10]
        s = g.load.summary()
        assert s["completed"] == s["submitted"] > 200 * ROUNDS
        print(f"\n{ROUNDS} migrations, {s['completed']} commands verified; blackout ms: "
              f"median {percentile(blackouts, 50):.2f}  p99 {percentile(blackouts, 99):.2f}  "
              f"max {max(blackouts):.2f}")
    finally:
        if g is not None:
            g.close()
        rcs = stop_hosts(daemons, img)
    assert rcs == [0, 0]
