"""(11) Live upgrade under a real Linux guest: vnvmed is replaced 10 times while fio verifies.

A 4-vCPU guest (so Linux creates 4 I/O queues per controller) runs fio with crc32c
verify (verify_backlog: every block is read back and checked while the run goes on) on
two vnvmed controllers, one job per vCPU on each.  Meanwhile the host runs
`vnvmectl upgrade` 10 times: each time a new vnvmed process (this checkout) takes over
both controllers, their QEMU connections, guest memory, interrupt eventfds and doorbell
pages, and the old one exits.  Two more upgrades must roll back (a new daemon that dies
while both controllers are frozen, one that refuses the snapshot format).  Then the host adds a namespace, which the guest sees
through an asynchronous event handled by the 10th daemon; that ends fio.

Pass: every upgrade succeeded, fio reports no error and read back what it wrote, the
guest kernel logged no nvme timeout, abort or reset, and every I/O queue of both
controllers kept completing I/O.  Printed: the blackout per handover (median/max) and
fio's longest completion latency, which is what the guest felt of it.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import pytest

from tests.daemon import other_build
from tests.qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(900)]
UPGRADES = 10
GAP = 1.0            # s of undisturbed I/O between two upgrades
# before these upgrades, one that must roll back: the new daemon crashes while both
# controllers are frozen; a new build refuses the snapshot format before anything stops
ROLLBACKS = {3: {"VNVMED_TEST_TAKEOVER_CRASH": "restoring"}, 6: {"VNVMED_SNAPSHOT_FORMAT": "0.1"}}


def test_fio_verify_survives_ten_live_upgrades(tmp_path: Path) -> None:
    rd = harness.short_tmpdir()
    socks = [rd / "c0.sock", rd / "c1.sock"]
    args = ["--cores", "0-1"]
    for name, sock in zip(("c0", "c1"), socks):
        args += ["--controller", f"{name}={sock}", "--namespace", f"{name}=ram:64M"]
    daemon = harness.start_vnvmed(args, run_dir=rd / "run", log_path=rd / "vnvmed.log")
    results: list[dict] = []
    rollbacks: list[str] = []
    try:
        guest = harness.start_guest(devices=socks, workload="upgrade", smp=4, mem="1G",
                                    args={"mb": 8, "rt": 600, "nctrl": 2, "nns": 2},
                                    workdir=tmp_path, daemon=daemon)
        with guest:
            guest.wait_for("FIO-RUNNING", 300)
            time.sleep(3)
            for i in range(UPGRADES):
                if i in ROLLBACKS:        # a handover that fails: the guest must not notice
                    old = daemon.pid
                    r = daemon.upgrade("--exec", other_build(rd, **ROLLBACKS[i]), timeout=120)
                    if r.returncode != 1 or daemon.pid != old:
                        guest.kill()
                        guest.result().fail(f"rollback {ROLLBACKS[i]}: rc {r.returncode} {r.stderr}")
                    rollbacks.append(r.stderr.strip())
                    time.sleep(GAP)
                r = daemon.upgrade(timeout=120)
                if r.returncode != 0:
                    guest.kill()
                    guest.result().fail(f"upgrade {i + 1}: {r.stderr}")
                results.append(json.loads(r.stdout))
                time.sleep(GAP)
            running = "VNV-FIO-END" not in guest.console()
            r = daemon.vnvmectl("namespace", "add", "c0", "ram:1M")
            assert r.returncode == 0, r.stderr
            res = guest.wait(300)
        res.attached["vnvmed log"] = daemon.log()
    finally:
        rc = daemon.stop()
        shutil.rmtree(rd, ignore_errors=True)
    res.assert_ok()
    res.expect(running, "fio ended before the 10th upgrade was done")
    res.expect(res.tagged("NS-ADDED"), "the guest never saw the namespace added after the upgrades")
    (doc,) = res.json("fio")
    job = doc["jobs"][0]
    res.expect(job["error"] == 0, f"fio error {job['error']}")
    res.expect(job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0,
               "fio wrote nothing or verified nothing")
    bad = [ln.rest for ln in res.tagged("DMESG")
           if any(w in ln.rest.lower() for w in ("timeout", "reset", "abort"))]
    res.expect(not bad, f"the guest kernel logged nvme trouble: {bad}")
    delta = res.irq_delta()
    for c in ("nvme0", "nvme1"):
        qs = {q: n for q, n in delta.items() if q.startswith(c + "q") and q != c + "q0"}
        res.expect(len(qs) >= 4 and all(n > 0 for n in qs.values()),
                   f"{c}: every I/O queue should complete I/O: {qs}")
    assert rc == 0, daemon.log()[-3000:]
    assert len(rollbacks) == len(ROLLBACKS) and "exited" in rollbacks[0] and "refused" in rollbacks[1], rollbacks
    blackouts = [c["blackout_ms"] for r in results for c in r["controllers"].values()]
    phases = {k: statistics.median(c[k] for r in results for c in r["controllers"].values())
              for k in ("freeze_ms", "quiesce_ms", "transfer_ms", "restore_ms", "commit_ms", "resume_ms")}
    durations = [r["duration_ms"] for r in results]
    assert len(blackouts) == 2 * UPGRADES
    clat_max_ms = max(job["write"]["clat_ns"]["max"], job["read"]["clat_ns"]["max"]) / 1e6
    print(f"\nlive upgrade x{UPGRADES}, 2 controllers x 4 I/O queues, fio 4k write+crc32c verify "
          f"QD16 x 8 jobs, TCG 4 vCPUs, vnvmed --cores 0-1:\n"
          f"  blackout per handover: median {statistics.median(blackouts):.1f} ms, "
          f"max {max(blackouts):.1f} ms (n={len(blackouts)})\n"
          f"  its phases (median ms): {', '.join(f'{k[:-3]} {v:.1f}' for k, v in phases.items())}\n"
          f"  rollbacks (guest unaffected): {len(rollbacks)}\n"
          f"  upgrade (start new daemon .. old exits): median {statistics.median(durations):.0f} ms, "
          f"max {max(durations):.0f} ms\n"
          f"  fio: {job['write']['total_ios']} writes, {job['read']['total_ios']} verified reads, "
          f"0 errors, longest completion latency {clat_max_ms:.1f} ms")
