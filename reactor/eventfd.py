"""Tiny eventfd helpers: create, signal, drain, wait.

An eventfd is a kernel 64-bit counter behind a file descriptor. We use it as a
level-triggered doorbell between processes: IRQ kicks to QEMU (MSI-X eventfds it
hands us) and ring wake-ups (reactor.shm.ring). Writing adds to the counter and
makes the fd readable; reading returns the counter and resets it to zero.

All helpers tolerate a non-blocking fd (the ones we create are EFD_NONBLOCK):
a signal on a counter that is already saturated is a no-op (the reader is awake
anyway), and draining an empty counter returns 0 instead of blocking.
"""
from __future__ import annotations

import os
import select

__all__ = ["create", "signal", "drain", "wait_readable"]


def create(nonblocking: bool = True, cloexec: bool = True) -> int:
    """Create an eventfd with counter 0. The caller owns (and closes) the fd."""
    flags = 0
    if nonblocking:
        flags |= os.EFD_NONBLOCK
    if cloexec:
        flags |= os.EFD_CLOEXEC
    return os.eventfd(0, flags)


def signal(fd: int) -> None:
    """Add 1 to the counter (one 8-byte write).

    EAGAIN only happens when the counter is at its maximum, i.e. a wake-up is
    already pending: nothing is lost by ignoring it.
    """
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def drain(fd: int) -> int:
    """Read and reset the counter; 0 if nothing was pending (fd must be non-blocking)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Block until the fd is readable (True) or the timeout expires (False).

    Does not consume the counter; call drain() afterwards.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    try:
        return bool(poller.poll(ms))
    except InterruptedError:  # pragma: no cover - PEP 475 retries for us
        return False
