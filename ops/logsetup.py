"""Logging for the daemon and its workers: one line per event, journal-friendly.

Under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) stderr goes to the
journal, which stamps time itself and reads a ``<N>`` syslog priority prefix,
so lines carry the priority and no timestamp.  Elsewhere lines start with an
ISO timestamp and the level name.  A record's message or traceback never spans
lines: newlines become `` | `` so ``grep`` and the journal keep one event per
line.

``RateLimitedLogger`` exists for guest-triggered errors (bad doorbell values,
malformed commands, DMA outside the map): a misbehaving guest can produce them
at millions per second, and an unbounded log is both a DoS on the disk and a
way to hide the first, useful message.  Per key, ``burst`` messages per
``interval`` are logged; the first one over budget logs a one-line "rate limit"
notice, the rest are counted and reported as one "suppressed K messages" line when
the key is next allowed (or on ``flush``).

Guest- and client-triggered lines are marked where they are logged, with the
standard ``extra`` mechanism: ``log.warning(..., extra={"ratelimit": KEY})``.  The
pure packages (nvme/, vfio_user/) can do that without importing anything of ours;
``setup_logging`` installs `RateLimitFilter` on the handler of every process
(supervisor, front-ends, workers), which runs each marked record through one
`RateLimitedLogger` budget per key.  Unmarked lines (our own events and bugs) are
never limited.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping, TextIO

_SYSLOG_PRIO = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


class OneLineFormatter(logging.Formatter):
    """Formats a record as exactly one line; optionally with a ``<prio>`` journal prefix."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt, datefmt="%Y-%m-%dT%H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n").replace("\r", "").replace("\n", " | ")
        if self.journal:
            prio = _SYSLOG_PRIO.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            text = f"<{prio}>{text}"
        return text


def setup_logging(level: str | int = "info", stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None, process: str = "vnvmed") -> logging.Handler:
    """Configure the root logger (replacing earlier handlers); returns the handler installed.

    ``process`` names this process in each line (``vnvmed``, ``vnvmed-worker3``):
    all processes share one stderr/journal stream.
    """
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    journal = under_systemd(environ)
    fmt = (f"{process}[%(process)d] %(name)s: %(message)s" if journal
           else f"%(asctime)s.%(msecs)03d %(levelname)s {process}[%(process)d] %(name)s: %(message)s")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(OneLineFormatter(fmt, journal))
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    return handler


class RateLimitedLogger:
    """At most ``burst`` messages per ``interval`` seconds per key; the rest are counted.

    Memory is bounded: at most ``max_keys`` keys are tracked (the least
    recently seen is forgotten first, reporting its suppressed count), since
    keys may derive from guest-controlled values.
    """

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0,
                 max_keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval <= 0 or max_keys < 1:
            raise ValueError("burst >= 1, interval > 0 and max_keys >= 1 are required")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, messages logged in window, messages suppressed in window]
        self._keys: OrderedDict[Any, list[Any]] = OrderedDict()

    def _report(self, key: Any, state: list[Any], level: int) -> None:
        if state[2]:
            self.logger.log(level, "suppressed %d messages for %s in the last %.0f s", state[2], key,
                            self.interval)
            state[2] = 0

    def log(self, level: int, key: Any, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log unless key is over its budget; True when the message was emitted."""
        if not self.logger.isEnabledFor(level) or not self.allow(key, level):
            return False
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def allow(self, key: Any, level: int = logging.WARNING) -> bool:
        """Spend one message of key's budget: True if it may be logged, else it is counted."""
        now = self.clock()
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= self.max_keys:
                old_key, old = self._keys.popitem(last=False)
                self._report(old_key, old, level)
            state = self._keys[key] = [now, 0, 0]
        else:
            self._keys.move_to_end(key)
        if now - state[0] >= self.interval:
            self._report(key, state, level)
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            if not state[2]:      # say so at once, not only when the window ends
                self.logger.log(level, "rate limit: more messages for %s suppressed for up to %.0f s",
                                key, self.interval - (now - state[0]))
            state[2] += 1
            return False
        state[1] += 1
        return True

    def flush(self, level: int = logging.WARNING) -> None:
        """Report every pending suppressed count now (e.g. periodically, or at shutdown)."""
        for key, state in self._keys.items():
            self._report(key, state, level)

    def debug(self, key: Any, msg: str, *args: Any, **kw: Any) -> bool:
        return self.log(logging.DEBUG, key, msg, *args, **kw)

    def info(self, key: Any, msg: str, *args: Any, **kw: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kw)

    def warning(self, key: Any, msg: str, *args: Any, **kw: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kw)

    def error(self, key: Any, msg: str, *args: Any, **kw: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args, **kw)


RATE_LIMIT_ATTR = "ratelimit"


class RateLimitFilter(logging.Filter):
    """Handler filter: records carrying ``extra={"ratelimit": KEY}`` share KEY's budget.

    The "suppressed K messages for KEY" report goes through the ``vnvmed.ratelimit``
    logger (unmarked, so never limited itself) just before the next allowed line.
    """

    def __init__(self, burst: int = 5, interval: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = RateLimitedLogger(logging.getLogger("vnvmed.ratelimit"), burst, interval,
                                         max_keys, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, RATE_LIMIT_ATTR, None)
        if key is None:
            return True
        return self.limiter.allow(key, record.levelno)
