"""Many controllers: children come from the forkserver, idle front-ends without a guest sleep.

Behaviour, not speed (the figures are benchmarks/many.py's): which process forks the
daemon's children, and that a front-end with no guest (or a guest that has not enabled
the controller) has no timer - it is woken by the client, and then serves it at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Iterator

from tests.integration.test_reactor import _host


@contextlib.contextmanager
def _guest(sock: str) -> Iterator[Any]:
    """A connected, enabled host driver (tests.integration.test_reactor._host), closed after."""
    c, ram, h = _host(sock)
    try:
        yield h
    finally:
        h.close()
        c.close()
        ram.close()


def _one_controller(tmp_path: Any, vnvmed: Any) -> tuple[Any, str]:
    sock = f"{tmp_path}/c0.sock"
    return vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={sock}",
                  "--namespace", "c0=null:16M"), sock


def _switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_children_are_forked_by_the_preloaded_forkserver(tmp_path, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"c0={tmp_path}/c0.sock",
               "--controller", f"c1={tmp_path}/c1.sock", "--namespace", "c0=null:16M")
    try:
        (fs,) = d.pids_named("vnvmed: forkserver")
        assert _ppid(fs) == d.pid
        kids = d.pids_named("frontend") + d.pids_named("worker")
        assert len(kids) == 3
        assert {_ppid(p) for p in kids} == {fs}
        # The forkserver imported the front-end's code once: the children did not.
        with open(f"/proc/{fs}/smaps_rollup") as f:
            assert "Pss" in f.read()
    finally:
        assert d.stop() == 0
    assert d.shm_left() == []


def test_front_end_without_guest_does_not_wake_and_serves_the_next_client(tmp_path, vnvmed):
    d, sock = _one_controller(tmp_path, vnvmed)
    try:
        (fe,) = d.pids_named("frontend")
        time.sleep(0.5)
        before = _switches(fe)
        time.sleep(2.0)
        assert _switches(fe) - before <= 1      # no timer: nothing wakes it (was 1/s)
        # A client connects and enables: the admin queue is served at once.
        with _guest(sock) as h:
            ident = h.identify(1)
            assert ident[24:64].strip()          # model number
            time.sleep(2.0)                      # deep idle with the controller enabled ...
            assert h.identify(1) == ident        # ... still answers (the poller has a timer)
            h.disable()
            time.sleep(1.5)
            before = _switches(fe)
            time.sleep(1.5)
            assert _switches(fe) - before <= 1   # disabled again: no timer
            h.enable()                           # the CC write wakes it
            assert h.identify(1) == ident
    finally:
        assert d.stop() == 0


def test_deep_idle_front_end_is_woken_by_its_worker_for_admin_commands(tmp_path, vnvmed, monkeypatch):
    """An enabled controller with nothing to do: after a second its front-end stops
    polling the admin queue and a worker watches the admin doorbells instead.  The
    front-end's own timer is raised to 10 minutes here, so an admin command answered
    within seconds was noticed by the worker and kicked to the front-end."""
    monkeypatch.setenv("VNVMED_ADMIN_WATCH_SAFETY_S", "600")
    d, sock = _one_controller(tmp_path, vnvmed)
    try:
        (fe,) = d.pids_named("frontend")
        with _guest(sock) as h:
            ident = h.identify(1)
            time.sleep(2.5)                           # deep idle: the watch is armed
            before = _switches(fe)
            time.sleep(2.0)
            assert _switches(fe) - before <= 1        # no 250 ms admin polling any more
            for _ in range(3):                        # each command after a quiet spell
                t0 = time.monotonic()
                assert h.identify(1) == ident
                assert time.monotonic() - t0 < 30     # not the 600 s safety timer
                time.sleep(1.5)
    finally:
        assert d.stop() == 0


def test_deep_idle_doorbell_of_an_absent_queue_is_reported_through_the_worker(
        tmp_path, vnvmed, monkeypatch):
    """In deep idle the worker watching the admin doorbells also watches those of the
    queues that do not exist: a mmapped write to one (Write to Invalid Doorbell Register)
    reaches the front-end's scan through the worker's kick, not the (600 s) timer.  A
    queue that exists is left alone: its doorbells are the worker's I/O."""
    monkeypatch.setenv("VNVMED_ADMIN_WATCH_SAFETY_S", "600")
    d, sock = _one_controller(tmp_path, vnvmed)
    try:
        with _guest(sock) as h:
            h.create_io_queue(1, 8)
            for qid, cq in ((9, False), (12, True)):
                aer = h.submit_aer()
                time.sleep(2.5)                       # deep idle: the watch is armed
                h.ring(qid, 1, cq=cq, trapped=False)  # no queue behind it
                e = h.wait_cid(0, aer, timeout=30)    # not the 600 s safety timer
                assert e.dw0 == 0x01 << 16            # Error, Invalid Doorbell Register, log 01h
                st, _ = h.get_log_page(0x01, 64)      # unmasks Error events
                assert st == 0
    finally:
        assert d.stop() == 0


def test_deep_idle_watch_moves_to_a_restarted_worker(tmp_path, vnvmed, monkeypatch):
    """The worker watching an idle front-end's admin doorbells dies: its replacement is
    asked to watch them (the front-end's own timer is 600 s here)."""
    monkeypatch.setenv("VNVMED_ADMIN_WATCH_SAFETY_S", "600")
    d, sock = _one_controller(tmp_path, vnvmed)
    try:
        with _guest(sock) as h:
            ident = h.identify(1)
            time.sleep(2.5)                           # deep idle: the watch is armed
            (old,) = d.pids_named("worker")
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = d.pids_named("worker")
                if now and now != [old]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the worker was not restarted")
            time.sleep(2.5)
            t0 = time.monotonic()
            assert h.identify(1) == ident
            assert time.monotonic() - t0 < 30
    finally:
        d.stop()
