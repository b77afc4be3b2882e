"""Hostile or broken vfio-user clients against the real daemon: the daemon and the other
controllers keep serving, the attacked socket serves the next client."""
from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading

import pytest

from tests.integration.conftest import Host, enabled_nvme
from vfio_user.client import GuestRam, VfioUserClient
from vfio_user.errors import ProtocolError
from vfio_user.wire import Command, Header


def _raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    return s


def _drain(s: socket.socket) -> bytes:
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def test_garbage_on_one_controller_does_not_disturb_another(tmp_path, vnvmed):
    d = vnvmed(tmp_path / "run", "--cores", "0",
               "--controller", f"a={tmp_path}/a.sock", "--namespace", "a=ram:8M",
               "--controller", f"b={tmp_path}/b.sock", "--namespace", "b=ram:8M")
    stop = threading.Event()
    progressed = threading.Event()
    done = [0]
    errors: list[str] = []

    def io_on_b() -> None:
        try:
            with enabled_nvme(f"{tmp_path}/b.sock", qids=[1]) as n:
                buf = n.ram.alloc(4096)
                while not stop.is_set():
                    st = n.rw(1, done[0] % 2 == 0, 1, (done[0] % 32) * 8, 8, buf)
                    if st:
                        errors.append(f"status {st:#x}")
                    done[0] += 1
                    progressed.set()
        except Exception as e:  # reported below
            errors.append(repr(e))

    t = threading.Thread(target=io_on_b)
    t.start()
    try:
        rng = random.Random(7)
        a = f"{tmp_path}/a.sock"
        cases = [
            os.urandom(64),                                           # noise
            Header(1, Command.VERSION, 8).encode()[:16],               # size < header
            Header(2, Command.VERSION, 1 << 30).encode(),              # absurd size
            struct.pack("<HHIII", 3, 200, 16, 0, 0),                   # unknown command
            struct.pack("<HHIII", 4, Command.DMA_MAP, 16 + 8, 0, 0) + bytes(8),   # short DMA_MAP
            bytes([rng.randrange(256) for _ in range(40)]),
        ]
        for raw in cases:
            s = _raw(a)
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                _drain(s)          # an error reply or a clean disconnect, never a hang
            finally:
                s.close()
        # a proper client on the attacked socket still works
        h = Host(a)
        try:
            n = h.nvme
            n.enable()
            n.create_io_queue(1, 16)
            buf = n.ram.alloc(4096)
            assert n.rw(1, True, 1, 0, 8, buf) == 0
        finally:
            h.close()
        # b kept going through the whole attack and after it: 10 more completions now.
        after = done[0]
        while done[0] < after + 10 and t.is_alive():
            progressed.wait(5)
            progressed.clear()
        assert done[0] >= after + 10, f"b stalled at {done[0]} I/Os: {errors}"
    finally:
        stop.set()
        t.join(20)
    assert not errors, errors
    assert d.alive() and "Traceback" not in d.log()
    assert d.stop() == 0 and d.shm_left() == []


def test_dma_map_past_end_of_fd_is_refused_not_fatal(tmp_path, vnvmed):
    """A mapping past the end of the client's file would SIGBUS whoever touches it."""
    d = vnvmed(tmp_path / "run", "--cores", "0", "--controller", f"a={tmp_path}/a.sock",
               "--namespace", "a=ram:8M")
    c = VfioUserClient(f"{tmp_path}/a.sock")
    ram = GuestRam(4096, name="short")
    try:
        c.negotiate()
        with pytest.raises(ProtocolError) as e:
            c.dma_map(0x100000, 1 << 20, ram.fd, 0)
        assert e.value.errno == errno.EINVAL
        # the session is still usable
        c.dma_map(0x100000, 4096, ram.fd, 0)
        c.dma_unmap(0x100000, 4096)
    finally:
        c.close()
        ram.close()
    assert d.stop() == 0 and d.shm_left() == []


def test_unsealed_memfd_refused_and_its_truncation_harms_no_one(tmp_path, vnvmed):
    """A memfd the client can still shrink is refused (EINVAL); the client truncating it
    afterwards does not touch the worker, which keeps serving another controller."""
    d = vnvmed(tmp_path / "run", "--cores", "0",
               "--controller", f"a={tmp_path}/a.sock", "--namespace", "a=ram:8M",
               "--controller", f"b={tmp_path}/b.sock", "--namespace", "b=ram:8M")
    with enabled_nvme(f"{tmp_path}/b.sock", qids=[1]) as b:
        buf = b.ram.alloc(4096)
        assert b.rw(1, True, 1, 0, 8, buf) == 0
        c = VfioUserClient(f"{tmp_path}/a.sock")
        fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
        try:
            c.negotiate()
            os.ftruncate(fd, 1 << 20)
            with pytest.raises(ProtocolError) as e:
                c.dma_map(0, 1 << 20, fd, 0)
            assert e.value.errno == errno.EINVAL
            os.ftruncate(fd, 0)                     # what would have killed the worker
            with GuestRam(1 << 20) as ram:         # a sealed memfd is served
                c.dma_map(0, 1 << 20, ram.fd, 0)
                c.dma_unmap(0, 1 << 20)
        finally:
            c.close()
            os.close(fd)
        for i in range(16):                         # b's worker is the same process, alive
            assert b.rw(1, i % 2 == 0, 1, 8 * i, 8, buf) == 0
    assert "F_SEAL_SHRINK" in d.log() and "died" not in d.log()
    assert d.stop() == 0 and d.shm_left() == []
