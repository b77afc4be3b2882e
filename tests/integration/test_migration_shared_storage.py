"""Live migration between two daemons that share network storage: an NBD export and a
Ceph RBD image, instead of a local file (issue 15 with issue 10's rig).

Both "hosts" open the same export/image (each worker its own connection); the guest
runs verified random I/O at QD 32 on 4 queues through the migration, and the same
invariants as tests/integration/test_migration.py hold: every command completes once,
data verifies, the queues keep working on the destination.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest

from tests.cephcluster import CephCluster
from tests.cephcluster import missing as ceph_missing
from tests.migrig import IMG_SIZE, Guest, migrate, start_hosts, stop_hosts
from tests.nbdserver import NbdServer
from tests.nbdserver import missing as nbd_missing

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
_NO_RBD = ceph_missing() or (None if importlib.util.find_spec("rbd") else
                             "Ceph Python bindings not importable (run under scripts/setup's .venv)")


def _migrate_twice(namespace: str) -> None:
    daemons, img = start_hosts(2, namespace=namespace)
    try:
        a, b = daemons
        g = Guest.boot(a)
        try:
            g.load.start()
            g.load.wait_completions(1000)
            migrate(g, b, "v2", precopy=True)
            assert g.daemon is b
            g.load.wait_completions(1000)
            migrate(g, a, "v1", precopy=False)
            g.load.wait_completions(1000)
            g.load.stop()
            assert not g.load.errors, g.load.errors[:10]
            assert g.load.completed == g.load.submitted > 3000
        finally:
            g.close()
    finally:
        rcs = stop_hosts(daemons, img)
        assert rcs == [0, 0], [d.log()[-2000:] for d in daemons]


@pytest.mark.skipif(nbd_missing() is not None, reason=str(nbd_missing()))
def test_migrate_on_a_shared_nbd_export() -> None:
    d = tempfile.mkdtemp(prefix="vmignbd-", dir="/tmp")
    try:
        with NbdServer.nbdkit_memory(str(IMG_SIZE), sock=os.path.join(d, "nbd.sock")) as srv:
            _migrate_twice(f"nbd:{srv.uri}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(_NO_RBD is not None, reason=str(_NO_RBD))
def test_migrate_on_a_shared_rbd_image() -> None:
    with CephCluster() as c:
        c.create_image("vm", IMG_SIZE)
        _migrate_twice(f"rbd:{c.target('vm')}")
