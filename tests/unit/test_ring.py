"""reactor.shm.ring: framing, wrap-around, full/oversized, corruption, sleep flag.

Both ends live in this process (two Ring objects on one real shm segment); a raw
second mapping plays the misbehaving peer for the corruption tests.
"""
import itertools
import mmap
import os
import platform
import select

import posix_ipc
import pytest

from reactor.shm import ring as ring_mod
from reactor.shm.ring import HEADER_SIZE, Ring, RingCorrupt

_seq = itertools.count()


@pytest.fixture
def name():
    n = f"/vnvmed-test-{os.getpid()}-ring-{next(_seq)}"
    yield n
    try:
        posix_ipc.unlink_shared_memory(n)
    except posix_ipc.ExistentialError:
        pass


@pytest.fixture
def pair(name):
    """(producer, consumer) on a 4 KiB ring; creator is the consumer."""
    cons = Ring.create(name, 4096)
    prod = Ring.attach(name, os.dup(cons.eventfd))
    yield prod, cons
    prod.close()
    cons.close()
    cons.unlink()


def _raw(name):
    shm = posix_ipc.SharedMemory(name)
    mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
    shm.close_fd()
    return mm


def test_messages_round_trip_in_order(pair):
    """Mixed msgpack types come out equal and in order; empty ring gives None."""
    prod, cons = pair
    msgs = [1, "two", b"\x00three", [4, {"k": 5}], {7: "int key"}, 2**63, -1, 1.5, True]
    for m in msgs:
        assert prod.put(m)
    assert cons.get_all() == msgs
    assert cons.get() is None
    assert cons.get_all() == []


def test_none_message_survives_get_all(pair):
    """A stored None is a message for get_all (get() cannot tell it from empty)."""
    prod, cons = pair
    prod.put(None); prod.put(1)
    assert cons.get_all() == [None, 1]


def test_wrap_around_many_times(pair):
    """Records of varying size cross the end of the data area thousands of times intact."""
    prod, cons = pair
    sent = got = 0
    for i in range(20000):
        size = (i * 37) % 900
        assert prod.put({"i": i, "p": bytes([i % 251]) * size})
        if i % 3 == 2:  # keep a few messages in flight so positions drift
            for m in cons.get_all():
                assert m["i"] == got and m["p"] == bytes([got % 251]) * ((got * 37) % 900)
                got += 1
        sent += 1
    for m in cons.get_all():
        assert m["i"] == got
        got += 1
    assert got == sent
    st = cons.stats()
    assert st.messages_got == sent and st.used_bytes == 0


def test_full_ring_refuses_then_accepts_after_drain(pair):
    """put() returns False when full, without blocking or losing anything."""
    prod, cons = pair
    n = 0
    while prod.put(n):
        n += 1
    assert 0 < n < 4096
    assert prod.stats().full_events == 1
    assert cons.get() == 0
    assert prod.put(n)  # one slot freed is enough for a small message
    assert cons.get_all(limit=10_000) == list(range(1, n + 1))


def test_put_wait_times_out_when_nobody_drains(pair):
    """put_wait raises TimeoutError on a ring that stays full."""
    prod, _ = pair
    while prod.put(b"x" * 100):
        pass
    with pytest.raises(TimeoutError):
        prod.put_wait(b"x" * 100, timeout=0.05)


def test_largest_message_always_fits_in_an_empty_ring(pair):
    """A max_message payload fits whatever the current position; one byte more is refused."""
    prod, cons = pair
    big = b"z" * (prod.max_message - 5)  # bin header of a 2-byte length: 3 bytes
    for shift in range(0, 64, 8):
        assert prod.put(b"s" * shift)
        assert cons.get() == b"s" * shift
        assert prod.put(big)
        assert cons.get() == big
    with pytest.raises(ValueError, match="exceeds"):
        prod.put(b"z" * prod.max_message)
    assert cons.get() is None  # the refused message left no trace


def test_oversized_message_raises_value_error(pair):
    """Messages over capacity/2 raise ValueError."""
    prod, _ = pair
    with pytest.raises(ValueError):
        prod.put(b"x" * 2049)


def test_corrupt_length_raises_ring_corrupt_and_stays_corrupt(pair, name):
    """A length word beyond the published data is detected, not followed."""
    prod, cons = pair
    prod.put("hello")
    mm = _raw(name)
    try:
        mv = memoryview(mm)[HEADER_SIZE:HEADER_SIZE + 4].cast("I")
        mv[0] = 4000
        mv.release()
    finally:
        mm.close()
    with pytest.raises(RingCorrupt, match="out of range|runs past"):
        cons.get()
    with pytest.raises(RingCorrupt):
        cons.get_all()


def test_corrupt_tail_raises(pair, name):
    """A tail that claims more than capacity bytes is refused."""
    _, cons = pair
    mm = _raw(name)
    try:
        mv = memoryview(mm)[128:136].cast("Q")
        mv[0] = 2**64 - 8
        mv.release()
    finally:
        mm.close()
    with pytest.raises(RingCorrupt, match="tail"):
        cons.get()


def test_corrupt_head_raises_on_put(pair, name):
    """The producer refuses a head that is ahead of its own tail."""
    prod, _ = pair
    mm = _raw(name)
    try:
        mv = memoryview(mm)[64:72].cast("Q")
        mv[0] = 4096
        mv.release()
    finally:
        mm.close()
    with pytest.raises(RingCorrupt, match="head"):
        prod.put(1)


def test_undecodable_payload_raises(pair, name):
    """Garbage msgpack inside a well-framed record is RingCorrupt, not a msgpack error."""
    prod, cons = pair
    prod.put(b"abcdefgh")
    mm = _raw(name)
    try:
        mm[HEADER_SIZE + 4] = 0xC1  # never-used msgpack byte
    finally:
        mm.close()
    with pytest.raises(RingCorrupt, match="undecodable"):
        cons.get()


def test_attach_rejects_bad_header(name):
    """A segment that is not a ring (or lies about its capacity) is refused at attach."""
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=HEADER_SIZE + 4096)
    mm = mmap.mmap(shm.fd, HEADER_SIZE + 4096)
    shm.close_fd()
    efd = os.eventfd(0)
    try:
        with pytest.raises(RingCorrupt, match="magic"):
            Ring.attach(name, efd)
        good = Ring.create(name + "-g", 4096)
        mm[:HEADER_SIZE] = _raw_header(name + "-g")
        good.close(); good.unlink()
        mv = memoryview(mm)[8:16].cast("Q")
        mv[0] = 1 << 20  # capacity larger than the segment
        mv.release()
        with pytest.raises(RingCorrupt, match="capacity"):
            Ring.attach(name, efd)
        os.fstat(efd)  # still open: ownership stays with the caller on failure
    finally:
        mm.close()
        os.close(efd)


def _raw_header(n):
    mm = _raw(n)
    try:
        return bytes(mm[:HEADER_SIZE])
    finally:
        mm.close()


@pytest.mark.parametrize("cap", [0, 63, 100, 3000, 1 << 31])
def test_create_rejects_bad_capacity(name, cap):
    """Capacity must be a power of two within bounds."""
    with pytest.raises(ValueError):
        Ring.create(name, cap)


def test_sleep_flag_makes_put_signal_the_eventfd(pair):
    """Only a put() that finds the consumer sleeping writes the eventfd."""
    prod, cons = pair
    prod.put(1)
    assert not select.select([cons], [], [], 0)[0]   # consumer awake: no syscall, no signal
    assert cons.prepare_sleep() is False             # data present: do not sleep
    assert cons.get() == 1
    assert cons.prepare_sleep() is True
    prod.put(2)
    assert select.select([cons], [], [], 1.0)[0] == [cons]
    cons.woke()
    assert not select.select([cons], [], [], 0)[0]   # woke() drained the counter
    assert cons.get() == 2
    assert prod.stats().wakeups_sent == 1


def test_wait_returns_false_on_timeout_true_when_data(pair):
    """wait() times out on an empty ring and returns at once when data is there."""
    prod, cons = pair
    assert cons.wait(0.01) is False
    prod.put("x")
    assert cons.wait(5) is True
    assert cons.get() == "x"


def test_unlink_is_creator_only_and_removes_segment(name):
    """The attacher may not unlink; the creator's unlink removes /dev/shm entry."""
    ring = Ring.create(name, 4096)
    other = Ring.attach(name, os.dup(ring.eventfd))
    with pytest.raises(PermissionError):
        other.unlink()
    other.close()
    ring.close()
    assert os.path.exists("/dev/shm" + name)
    ring.unlink()
    assert not os.path.exists("/dev/shm" + name)
    with pytest.raises(ValueError, match="closed"):
        ring.put(1)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="fence reasoning is x86-64 specific")
def test_fence_assumption_holds_here():
    """On x86-64 CPython our lock round trip is a full barrier, so wait() may block unbounded."""
    assert ring_mod.FENCE_IS_FULL_BARRIER
    assert ring_mod._SLEEP_CAP_MS is None


def test_attach_makes_a_blocking_eventfd_non_blocking(name):
    """woke() on an attacher given a blocking eventfd returns instead of hanging."""
    ring = Ring.create(name, 4096)
    efd = os.eventfd(0)  # blocking
    other = Ring.attach(name, efd)
    try:
        assert other.prepare_sleep()
        other.woke()  # would block forever in read() on a blocking, empty eventfd
        assert not os.get_blocking(efd)
    finally:
        other.close(); ring.close(); ring.unlink()


def test_select_over_several_rings_wakes_on_the_one_written(name):
    """The documented multi-ring sleep pattern: a put on any ring makes select return it."""
    rings = [Ring.create(f"{name}-{i}", 4096) for i in range(3)]
    prods = [Ring.attach(r.name, os.dup(r.eventfd)) for r in rings]
    try:
        assert all(r.prepare_sleep() for r in rings)
        prods[1].put("only here")
        ready, _, _ = select.select(rings, [], [], 5)
        for r in rings:
            r.woke()
        assert ready == [rings[1]]
        assert [r.get() for r in rings] == [None, "only here", None]
        assert not select.select(rings, [], [], 0)[0]
    finally:
        for p in prods:
            p.close()
        for r in rings:
            r.close(); r.unlink()
