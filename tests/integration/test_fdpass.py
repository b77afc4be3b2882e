"""reactor.shm.fdpass: fds cross a real process boundary and stay usable; none leak."""
import array
import json
import mmap
import multiprocessing as mp
import os
import select
import socket

import pytest

from reactor.shm.fdpass import FdPassError, FdReceiver, fd_socketpair, send_fds

pytestmark = pytest.mark.timeout(20)


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def _child(sock: socket.socket, report: socket.socket) -> None:
    """Take token 2 (memfd + eventfd) first although token 1 was sent first; use them."""
    rx = FdReceiver(sock)
    before = _open_fds()
    memfd, efd = rx.take(2, timeout=10)
    with mmap.mmap(memfd, 4096) as mm:
        assert mm[:5] == b"hello"
        mm[:5] = b"HELLO"
    for _ in range(41):
        os.eventfd_write(efd, 1)
    many = rx.take(3, timeout=10)
    kinds = {os.readlink(f"/proc/self/fd/{fd}") for fd in many}
    stray = rx.pending_tokens()
    held = _open_fds() - before           # received fds still open here
    rx.close()                            # token 1 never taken: must be closed now
    after_close = _open_fds() - before
    for fd in [memfd, efd] + many:
        os.close(fd)
    report.sendall(json.dumps((len(many), sorted(kinds), stray, len(held), len(after_close),
                         len(_open_fds() - before))).encode())


def test_fds_cross_process_and_strays_are_closed():
    """memfd/eventfd received in a spawned child are the same objects; untaken fds close."""
    ctx = mp.get_context("spawn")
    a, b = fd_socketpair()
    ra, rb = socket.socketpair()
    memfd = os.memfd_create("fdpass-test")
    os.ftruncate(memfd, 4096)
    os.pwrite(memfd, b"hello", 0)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pipe_r, pipe_w = os.pipe()
    p = ctx.Process(target=_child, args=(b, rb))
    p.start()
    try:
        send_fds(a, 1, [pipe_r, pipe_w])             # never taken by the child
        send_fds(a, 2, [memfd, efd])
        send_fds(a, 3, [pipe_r] * 300)               # > 253: two batches
        p.join(15)
        assert p.exitcode == 0
        n_many, kinds, stray, held, after_close, leaked = json.loads(ra.recv(4096).decode())
        assert os.pread(memfd, 5, 0) == b"HELLO"    # child wrote through its mapping
        assert select.select([efd], [], [], 5)[0]   # child signalled our eventfd
        assert os.eventfd_read(efd) == 41
        with pytest.raises(BlockingIOError):        # drained: the counter is 0 again
            os.eventfd_read(efd)
        assert not select.select([efd], [], [], 0)[0]
        assert n_many == 300 and len(kinds) == 1 and kinds[0].startswith("pipe:")
        assert stray == [1]
        assert held == 2 + 300 + 2                  # memfd, efd, 300 pipes, token 1's two
        assert after_close == 2 + 300               # close() dropped token 1's fds
        assert leaked == 0
    finally:
        if p.is_alive():
            p.kill(); p.join()
        for fd in (memfd, efd, pipe_r, pipe_w):
            os.close(fd)
        for s in (a, b, ra, rb):
            s.close()


def test_take_times_out_and_peer_close_is_reported():
    """take() for a token that never comes times out, then reports the closed peer."""
    a, b = fd_socketpair()
    with FdReceiver(b) as rx:
        with pytest.raises(TimeoutError):
            rx.take(9, timeout=0.05)
        a.close()
        with pytest.raises(ConnectionError):
            rx.take(9, timeout=1)
    b.close()


def test_zero_fds_token_and_stream_socket():
    """A token with no fds completes; SOCK_STREAM pairs work too."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        with FdReceiver(b) as rx:
            send_fds(a, 5, [])
            send_fds(a, 6, [w])
            send_fds(a, 7, [r, w])
            assert rx.take(7, 1) and rx.take(5, 1) == []
            (got,) = rx.take(6, 1)
            os.write(got, b"x")
            assert os.read(r, 1) == b"x"
            os.close(got)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close(); b.close()


def test_malformed_message_closes_its_fds():
    """A header with a wrong magic raises FdPassError and closes the fds it carried."""
    a, b = fd_socketpair()
    r, w = os.pipe()
    try:
        before = _open_fds()
        a.sendmsg([b"\0" * 24], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
        with FdReceiver(b) as rx:
            with pytest.raises(FdPassError, match="magic"):
                rx.poll()
            assert _open_fds() == before
    finally:
        os.close(r); os.close(w)
        a.close(); b.close()


def test_token_must_be_u64():
    """Tokens outside u64 are refused before anything is sent."""
    a, b = fd_socketpair()
    with pytest.raises(ValueError):
        send_fds(a, -1, [])
    with pytest.raises(ValueError):
        send_fds(a, 1 << 64, [])
    a.close(); b.close()
