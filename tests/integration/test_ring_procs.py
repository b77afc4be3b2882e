"""reactor.shm.ring between two real processes (multiprocessing 'spawn').

The eventfd travels with reactor.shm.fdpass, as in the daemon.
"""
import json
import multiprocessing as mp
import os
import socket
import time

import pytest

from reactor.shm import names
from reactor.shm.fdpass import FdReceiver, fd_socketpair, send_fds
from reactor.shm.ring import Ring

pytestmark = pytest.mark.timeout(60)

N_MESSAGES = 200_000


def _spawn(target, *args):
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _finish(p, timeout=30):
    p.join(timeout)
    if p.is_alive():
        p.kill(); p.join()
        pytest.fail("child did not finish")
    assert p.exitcode == 0


def _attach_from(sock, name):
    with FdReceiver(sock) as rx:
        (efd,) = rx.take(1, timeout=10)
    return Ring.attach(name, efd)


def _producer(sock, report, name, n):
    """Send 0..n-1; pause now and then so the consumer falls asleep."""
    ring = _attach_from(sock, name)
    i = 0
    while i < n:
        burst = min(n - i, 1 + (i * 7919) % 3000)
        for _ in range(burst):
            ring.put_wait({"seq": i, "pad": b"p" * (i % 61)}, timeout=10)
            i += 1
        if (i // 3000) % 4 == 0:
            time.sleep(0.002)  # let the consumer drain and go to sleep
    st = ring.stats()
    ring.close()
    report.sendall(json.dumps({"puts": st.messages_put, "full": st.full_events,
                               "wakes": st.wakeups_sent}).encode())


def test_200k_messages_in_order_with_sleeping_consumer(tmp_path):
    """Every message arrives once, in order; the consumer sleeps and is always woken."""
    name = names.ring_name(names.instance_prefix(str(tmp_path)), 0)
    ring = Ring.create(name, capacity=1 << 16)   # small: forces full rings and wraps
    a, b = fd_socketpair()
    ra, rb = socket.socketpair()
    p = _spawn(_producer, b, rb, name, N_MESSAGES)
    try:
        send_fds(a, 1, [ring.eventfd])
        expect, sleeps, lost = 0, 0, 0
        while expect < N_MESSAGES:
            batch = ring.get_all(4096)
            if not batch:
                sleeps += 1
                # 5 s is far beyond any pause of the producer: a False here
                # means a wake-up was lost.
                if not ring.wait(5.0):
                    lost += 1
                    break
                continue
            for m in batch:
                assert m["seq"] == expect, f"got {m['seq']} expected {expect}"
                assert m["pad"] == b"p" * (expect % 61)
                expect += 1
        _finish(p)
        rep = json.loads(ra.recv(4096))
        assert lost == 0
        assert expect == N_MESSAGES and ring.get() is None
        assert rep["puts"] == N_MESSAGES
        assert sleeps > 0 and rep["wakes"] > 0      # the sleep/wake path really ran
    finally:
        if p.is_alive():
            p.kill(); p.join()
        ring.close(); ring.unlink()
        for s in (a, b, ra, rb):
            s.close()


def _sleeper(sock, report, name):
    ring = _attach_from(sock, name)
    woke = ring.wait(15.0)
    msg = ring.get()
    ring.close()
    report.sendall(json.dumps({"woke": woke, "msg": msg}).encode())


def test_sleeping_consumer_wakes_on_put(tmp_path):
    """A consumer blocked in wait() (flag set, in poll) returns with the message after one put."""
    name = names.ring_name(names.instance_prefix(str(tmp_path)), 1)
    ring = Ring.create(name, capacity=4096)
    a, b = fd_socketpair()
    ra, rb = socket.socketpair()
    p = _spawn(_sleeper, b, rb, name)
    try:
        send_fds(a, 1, [ring.eventfd])
        # Wait until the child announced it sleeps (its flag is in our mapping too).
        deadline = time.monotonic() + 15
        while not ring._sleep_w[0]:
            assert time.monotonic() < deadline, "consumer never went to sleep"
            time.sleep(0.001)
        assert ring.put("wake up")
        ra.settimeout(14)
        rep = json.loads(ra.recv(4096))
        assert rep == {"woke": True, "msg": "wake up"}
        _finish(p)
    finally:
        if p.is_alive():
            p.kill(); p.join()
        ring.close(); ring.unlink()
        for s in (a, b, ra, rb):
            s.close()


def _creator(report, name):
    """Create a ring, let the parent attach, then close and unlink it."""
    ring = Ring.create(name, capacity=4096)
    ring.put("from the creator")
    report.sendall(b"created")
    assert report.recv(16) == b"attached"
    ring.close()
    ring.unlink()
    report.sendall(b"unlinked")


def test_creator_unlink_leaves_no_segment(tmp_path):
    """After the creator unlinks, /dev/shm has nothing left; the attacher never unlinks."""
    prefix = names.instance_prefix(str(tmp_path))
    name = names.ring_name(prefix, 2)
    ra, rb = socket.socketpair()
    ra.settimeout(15)
    p = _spawn(_creator, rb, name)
    try:
        assert ra.recv(16) == b"created"
        ring = Ring.attach(name, os.eventfd(0))   # eventfd not needed for this test
        ra.sendall(b"attached")
        assert ra.recv(16) == b"unlinked"
        _finish(p)
        assert not os.path.exists("/dev/shm" + name)
        assert ring.get() == "from the creator"    # our mapping outlives the name
        ring.close()
        assert [e for e in os.listdir("/dev/shm") if e.startswith(prefix)] == []
    finally:
        if p.is_alive():
            p.kill(); p.join()
        ra.close(); rb.close()
