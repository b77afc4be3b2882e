"""workers.main.Worker's idle sleep: one epoll set, rebuilt when slots/channels change.

Real rings (reactor.channel.Channel over posix_ipc), a real SOCK_SEQPACKET control
socket and real pending channel sockets.  Each test sleeps with a long timeout
(5 s) after making exactly one fd readable: a sleep that did not watch that fd
returns False after the timeout instead of True/at once (bounded by pytest-timeout).
"""
from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from reactor import ipc
from reactor.channel import Channel
from workers.main import Worker
from workers.slot import Slot

pytestmark = pytest.mark.timeout(20)
LONG = 5.0


@pytest.fixture
def worker() -> Iterator[tuple[Worker, socket.socket]]:
    sup, ctl = ipc.pair()
    ctl.setblocking(False)
    w = Worker(0, ctl, {})
    try:
        yield w, sup
    finally:
        for s in w.slots:
            s.close()
        for _, sock in w.pending:
            sock.close()
        if w._ep is not None:
            w._ep.close()
        sup.close()
        ctl.close()


def _channel(w: Worker) -> Channel:
    """A front-end channel attached as a slot of w; returns the front-end side."""
    a, b = ipc.pair()
    fe = Channel.create(a, f"/vnvt-wsl-{os.getpid()}-{id(a):x}")
    wk = Channel.try_attach(b)
    assert wk is not None
    w.slots.append(Slot("t", wk))
    w._ep_dirty = True
    return fe


def test_idle_sleep_times_out_without_reading_anything(worker) -> None:
    w, _ = worker
    assert w._sleep(0.01) is False
    assert w.sleeps == 1


def test_control_socket_wakes_the_sleep_and_is_then_read(worker) -> None:
    w, sup = worker
    w._sleep(0.001)                      # the epoll set exists before the message
    ipc.send(sup, {"op": "stop"})
    assert w._sleep(LONG) is True
    w._control()
    assert w.stop


def test_ring_event_wakes_the_sleep_but_is_left_to_the_ring_reader(worker) -> None:
    w, _ = worker
    fe = _channel(w)
    try:
        w._sleep(0.001)
        # The ring's eventfd written with the ring still empty (a producer that saw
        # the sleeping flag, or a kick): the poll reports the ring fd, and _sleep says
        # there is nothing on the control socket.
        os.eventfd_write(w.slots[0].chan.rx.fileno(), 1)
        assert w._sleep(LONG) is False
        assert w.sleeps == 2
        # woke() drained the eventfd: the next sleep really sleeps (and times out).
        assert w._sleep(0.01) is False
        fe.send({"op": "load"})
        assert [m["op"] for m in w.slots[0].chan.recv_all()] == ["load"]
    finally:
        fe.close(unlink=True)


def test_sleep_returns_at_once_while_a_ring_holds_a_message(worker) -> None:
    w, _ = worker
    fe = _channel(w)
    try:
        fe.send({"op": "load"})
        assert w._sleep(LONG) is False
        assert w.sleeps == 0, "prepare_sleep saw the message: no sleep at all"
    finally:
        fe.close(unlink=True)


def test_pending_channel_replaced_on_the_same_fd_number_is_watched(worker) -> None:
    w, sup = worker
    a1, b1 = ipc.pair()
    ipc.send(sup, {"op": "channel", "name": "c1"}, [b1.fileno()])
    b1.close()
    w._control()
    assert len(w.pending) == 1
    w._sleep(0.001)                      # epoll set built with that pending socket
    num = w.pending[0][1].fileno()
    # The channel goes away and a new one lands on the same fd number.
    a2, b2 = ipc.pair()                  # made first: neither end can take `num`
    w.pending[0][1].close()
    w.pending.clear()
    w._ep_dirty = True
    try:
        os.dup2(b2.fileno(), num)
        b2.close()
        w.pending.append(("c2", socket.socket(fileno=num)))
        w._ep_dirty = True
        a2.send(b"x")
        assert w._sleep(LONG) is True
    finally:
        a1.close()
        a2.close()


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


def test_idle_sleeps_leave_the_flag_and_waking_clears_it(worker) -> None:
    """After a quiet sleep the ring still says "sleeping" (no woke() syscall); a put
    then writes the eventfd and ends the next sleep at once.  Once the worker wakes
    its rings (it found work), puts make no eventfd writes."""
    w, _ = worker
    fe = _channel(w)
    try:
        rx = w.slots[0].chan.rx
        assert w._sleep(0.001) is False and w._flagged
        fe.send({"op": "load"})
        assert _readable(rx.fileno()), "the producer saw the flag: eventfd written"
        assert [m["op"] for m in w.slots[0].chan.recv_all()] == ["load"]
        assert w._sleep(LONG) is False           # returns at once: the eventfd fired
        assert not _readable(rx.fileno()), "drained by woke() of the ring that fired"
        w._wake_rings()
        assert not w._flagged
        fe.send({"op": "load"})
        assert not _readable(rx.fileno()), "an awake consumer costs the producer no syscall"
        # A slot closed before the set is rebuilt: waking its ring is harmless.
        w.slots[0].close()
        w._flagged = True
        w._wake_rings()
        assert not w._flagged
    finally:
        fe.close(unlink=True)


def test_a_map_the_worker_cannot_make_is_a_fault_not_a_silent_ack(worker) -> None:
    """The front-end maps first, so a worker-side map failure is ours: the worker reports a
    fault (the controller goes fatal) and acks with the error, instead of serving on
    without the region (every command touching it would fail quietly)."""
    w, _ = worker
    fe = _channel(w)
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)   # refused by MappedGuestMemory
    os.ftruncate(fd, 1 << 16)
    try:
        fe.send({"op": "map", "seq": 7, "iova": 0, "size": 1 << 16, "off": 0, "r": True, "w": True},
                [fd])
        w._messages()
        got = fe.recv_all()
        fault = [m for m in got if m.get("op") == "fault"]
        ack = [m for m in got if m.get("op") == "ack" and m.get("seq") == 7]
        assert fault and "cannot map guest memory" in fault[0]["reason"], got
        assert ack and "error" in ack[0], got
    finally:
        os.close(fd)
        fe.close(unlink=True)


def test_backend_completions_wake_the_sleep_and_polled_ones_do_not(worker, tmp_path) -> None:
    """A slot's backend completion fd is in the sleep set (a completion ends the sleep);
    completions the loop already took by polling do not end the next sleep at once, and
    one that lands before the sleep makes _sleep poll instead (nothing is slept on)."""
    import time

    from backends.aio import Req
    from backends.file import FileBackend
    w, _ = worker
    fe = _channel(w)
    p = tmp_path / "disk"
    p.write_bytes(bytes(1 << 16))
    be = FileBackend(str(p))
    slot = w.slots[0]
    aio = slot.aio
    assert aio is not None and aio.attach(1, be, 4)
    try:
        q = aio.queues[1]
        buf = bytearray(4096)
        for _ in range(2):
            q.submit(Req(0, 0, 4096, [memoryview(buf)]))
        aio.outstanding += 2
        aio.push()
        # Finished while the worker was busy: _sleep must not sleep on it.
        deadline = time.monotonic() + LONG
        while not q.engine.settle():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        t0 = time.monotonic()
        assert w._sleep(LONG) is False and slot.aio_woke
        assert time.monotonic() - t0 < LONG / 2
        got: list[Req] = []
        while len(got) < 2:               # the loop takes them by polling (no wake-up)
            q.reap(False, got)
        aio.outstanding -= 2
        t0 = time.monotonic()
        w._sleep(0.3)                     # a real sleep, not ended by the stale count
        assert time.monotonic() - t0 >= 0.25
    finally:
        fe.close(unlink=True)
        be.close()
