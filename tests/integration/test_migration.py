"""Live migration between two separate vnvmed daemons under verified I/O (issue 10).

Each test: two daemons ("hosts") serving nvme0 on one shared image file, a guest with
4 I/O queues at QD 32 of verified random 4 KiB I/O (tests/verifyload.py), migrated
by the project's client acting as QEMU would (tests/migrig.py, vfio_user/migdriver.py).
Invariants: every command completes exactly once, data verifies, an AER submitted
before the migration completes on the destination, registers and Identify data are
equal, and the guest keeps using the same queues (never re-created).
"""
from __future__ import annotations

import pytest

from tests.migrig import Guest, migrate, start_hosts, stop_hosts

AER_OPC = 0x0C


@pytest.fixture
def hosts():
    daemons, img = start_hosts(2)
    try:
        yield daemons
    finally:
        rcs = stop_hosts(daemons, img)
        assert rcs == [0, 0], [d.log()[-2000:] for d in daemons]


@pytest.fixture
def trapped_hosts():
    daemons, img = start_hosts(2, extra=("--doorbells", "nvme0=trapped"))
    try:
        yield daemons
    finally:
        rcs = stop_hosts(daemons, img)
        assert rcs == [0, 0], [d.log()[-2000:] for d in daemons]


def _identify(nvme):
    return nvme.identify(1), nvme.identify(0, 1)


@pytest.mark.parametrize("scheme,precopy", [("v2", True), ("v2", False), ("v1", True), ("v1", False)])
def test_migrate_under_verified_io(hosts, scheme, precopy):
    a, b = hosts
    g = Guest.boot(a)
    try:
        ident = _identify(g.nvme)
        aer = g.nvme.submit_aer()
        load = g.load
        load.start()
        load.wait_completions(2000)
        fig = migrate(g, b, scheme, precopy=precopy)
        assert g.daemon is b
        load.wait_completions(2000)          # the same queues keep working on the destination
        # The AER parked on the source completes on the destination: a doorbell write to
        # a queue that does not exist is an Error event (Invalid Doorbell Register).
        g.nvme.db[(0x1000 + 8 * 40) >> 2] = 1
        e = g.nvme.wait_cid(0, aer, timeout=5)
        assert e.status == 0 and e.dw0 & 7 == 0 and (e.dw0 >> 16) & 0xFF == 1
        load.stop()
        assert not load.errors, load.errors[:10]
        assert load.completed == load.submitted > 4000
        assert _identify(g.nvme) == ident
        assert fig.stream_bytes > 0 and (fig.precopy_bytes > 0) == precopy
    finally:
        g.close()


@pytest.mark.parametrize("scheme", ["v2", "v1"])
def test_migrate_with_trapped_doorbells(trapped_hosts, scheme):
    """Doorbells as REGION_WRITE messages (no doorbell mmap): the doorbell state travels
    in the snapshot, and doorbells the guest writes in the blackout - to the destination,
    stopped - are not lost (the load resumes before the destination runs)."""
    a, b = trapped_hosts
    g = Guest.boot(a, trapped=True)
    try:
        assert g.nvme.trapped
        aer = g.nvme.submit_aer()
        load = g.load
        load.start()
        load.wait_completions(1000)
        migrate(g, b, scheme)
        assert g.daemon is b and g.nvme.trapped
        load.wait_completions(1000)
        # the destination's client carried the doorbells: a message per SQE and per reap
        assert g.client._next_id > 1000
        g.nvme.ring(40, 1)                         # Invalid Doorbell Register: the AER fires
        e = g.nvme.wait_cid(0, aer, timeout=5)
        assert e.status == 0 and e.dw0 & 7 == 0 and (e.dw0 >> 16) & 0xFF == 1
        load.stop()
        assert not load.errors, load.errors[:10]
        assert load.completed == load.submitted > 2000
    finally:
        g.close()


def test_migrate_back_and_forth(hosts):
    a, b = hosts
    g = Guest.boot(a)
    try:
        g.load.start()
        for i in range(4):
            g.load.wait_completions(500)
            migrate(g, b if i % 2 == 0 else a, "v2" if i < 2 else "v1")
        g.load.wait_completions(500)
        g.load.stop()
        assert not g.load.errors, g.load.errors[:10]
    finally:
        g.close()


@pytest.mark.parametrize("scheme", ["v2", "v1"])
def test_cancelled_migration_returns_source_to_running(hosts, scheme):
    """Stop-and-copy started, data half read, then cancelled: the source runs on, nothing lost."""
    from vfio_user.migdriver import V1Driver, V2Driver
    a, _ = hosts
    g = Guest.boot(a)
    try:
        g.load.start()
        g.load.wait_completions(1000)
        if scheme == "v2":
            d = V2Driver(g.client, chunk=64)
            d.precopy()
            g.load.pause()
            d.set_state(3)                 # STOP_COPY
            assert len(g.client.mig_data_read(64)) == 64
            d.set_state(2)                 # cancel -> RUNNING
            assert d.get_state() == 2
        else:
            d1 = V1Driver(g.client)
            d1.save_setup()
            d1.save_iterate()
            g.load.pause()
            d1.vm_stopped()
            assert d1.pending() > 0
            d1.save_buffer()
            d1.cancel()
            assert d1.state() == 1
            d1.close()
        g.load.resume()
        g.load.wait_completions(1000)
        g.load.stop()
        assert not g.load.errors, g.load.errors[:10]
    finally:
        g.close()
