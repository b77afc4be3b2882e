"""sd_notify without libsystemd: readiness, status and watchdog datagrams to $NOTIFY_SOCKET.

Theory of operation
-------------------
systemd (Type=notify) passes ``NOTIFY_SOCKET``: a filesystem path (``/run/...``)
or an abstract socket (``@name``, which is ``\\0name`` on the wire).  Each
notification is one AF_UNIX datagram of ``KEY=VALUE`` lines.  Notifications
are advisory: a failure to send is logged at debug level and reported as
False, never raised, and every call is a no-op when not under systemd.

The watchdog: ``WATCHDOG_USEC`` is the interval after which systemd kills us
without a ``WATCHDOG=1``; ``WATCHDOG_PID``, when set, says which process it is
meant for (a child that inherited the environment must not ping).  Ping at
half the interval from the supervisor's loop, so a wedged loop - the thing the
watchdog is for - stops the pings.

The daemon's worker processes should not talk to systemd (with
NotifyAccess=main their datagrams are dropped anyway): ``Notifier(...,
unset_environment=True)`` takes the variables out of ``os.environ`` so
children never see them.
"""
from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from typing import Mapping

log = logging.getLogger("vnvmed.notify")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str | None) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()   # abstract namespace
    if value.startswith("/"):
        return value
    return None   # vsock:... and friends: not for us


class Notifier:
    """One daemon's channel to systemd; captured from the environment at construction."""

    def __init__(self, environ: Mapping[str, str] | None = None, unset_environment: bool = False) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        if unset_environment and environ is None:
            for k in _ENV_KEYS:
                os.environ.pop(k, None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=VALUE fields in one datagram; True if systemd got it (False when disabled)."""
        if self.address is None:
            return False
        msg = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(msg, self.address)
        except OSError as e:
            log.debug("sd_notify to %r failed: %s", self.address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        # One datagram, one line per field: a newline would start a new field.
        return self.notify(STATUS=text.replace("\n", " "))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) tell this reload from the next.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def barrier(self, timeout: float = 2.0) -> bool:
        """Wait until systemd has processed every message we sent before (sd_notify_barrier):
        BARRIER=1 carries a pipe's write end, which systemd closes once it got that far.
        A live upgrade needs it: MAINPID= must be read before the old main process exits."""
        if self.address is None:
            return False
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                    s.sendmsg([b"BARRIER=1\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [w]).tobytes())], 0, self.address)
            except OSError as e:
                log.debug("sd_notify barrier to %r failed: %s", self.address, e)
                return False
            os.close(w)
            w = -1
            p = select.poll()
            p.register(r, select.POLLHUP | select.POLLIN)
            return bool(p.poll(int(timeout * 1000)))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def watchdog(self) -> bool:
        return self.watchdog_interval() is not None and self.notify(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds systemd waits for WATCHDOG=1 (ping at half of it); None when no watchdog is meant for us."""
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 1_000_000


_default: Notifier | None = None


def default() -> Notifier:
    """The process-wide notifier, built from os.environ on first use."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def reset_default() -> None:
    """Forget the cached notifier (tests; or after the environment changed)."""
    global _default
    _default = None


def ready(status: str | None = None) -> bool:
    return default().ready(status)


def status(text: str) -> bool:
    return default().status(text)


def reloading() -> bool:
    return default().reloading()


def stopping() -> bool:
    return default().stopping()


def barrier(timeout: float = 2.0) -> bool:
    return default().barrier(timeout)


def watchdog() -> bool:
    return default().watchdog()


def watchdog_interval() -> float | None:
    return default().watchdog_interval()
