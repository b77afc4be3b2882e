"""ops.logsetup: one line per event, journal vs. terminal format, rate limiting."""
from __future__ import annotations

import io
import logging
import re
from typing import Iterator

import pytest

from ops.logsetup import RateLimitFilter, RateLimitedLogger, setup_logging, under_systemd


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_terminal_format_has_timestamp_and_one_line() -> None:
    buf = io.StringIO()
    setup_logging("info", buf, environ={})
    log = logging.getLogger("vnvmed.test")
    log.debug("hidden")
    log.warning("two\nlines")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} WARNING vnvmed\[\d+\] vnvmed.test: two \| lines$",
                    lines[0])
    assert "ERROR" in lines[1] and "Traceback" in lines[1] and "RuntimeError: boom" in lines[1]


@pytest.mark.parametrize("env", [{"JOURNAL_STREAM": "8:1234"}, {"INVOCATION_ID": "abc"}])
def test_journal_format_has_priority_no_timestamp(env: dict[str, str]) -> None:
    assert under_systemd(env)
    buf = io.StringIO()
    setup_logging("debug", buf, environ=env, process="vnvmed-worker1")
    logging.getLogger("w").debug("d")
    logging.getLogger("w").error("e")
    assert re.fullmatch(r"<7>vnvmed-worker1\[\d+\] w: d\n<3>vnvmed-worker1\[\d+\] w: e\n", buf.getvalue())


def test_level_and_replacement() -> None:
    buf1, buf2 = io.StringIO(), io.StringIO()
    setup_logging("error", buf1, environ={})
    setup_logging("WARNING", buf2, environ={})   # replaces, does not stack
    logging.getLogger("x").warning("w")
    assert buf1.getvalue() == "" and "w" in buf2.getvalue()
    with pytest.raises(ValueError):
        setup_logging("loud", io.StringIO(), environ={})


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def capture() -> tuple[logging.Logger, list[str]]:
    out: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(record.getMessage())

    lg = logging.getLogger(f"ratelimit.{id(out)}")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.addHandler(H())
    return lg, out


def test_rate_limit_per_key_then_suppressed_line() -> None:
    lg, out = capture()
    clock = Clock()
    rl = RateLimitedLogger(lg, burst=2, interval=10, clock=clock)
    sent = [rl.warning("sq1", "bad doorbell %d", i) for i in range(5)]
    assert sent == [True, True, False, False, False]
    assert rl.warning("sq2", "other queue")          # keys are independent
    clock.t += 10
    assert rl.warning("sq1", "bad doorbell again")
    assert out == ["bad doorbell 0", "bad doorbell 1",
                   "rate limit: more messages for sq1 suppressed for up to 10 s", "other queue",
                   "suppressed 3 messages for sq1 in the last 10 s", "bad doorbell again"]


def test_flush_and_key_eviction() -> None:
    lg, out = capture()
    rl = RateLimitedLogger(lg, burst=1, interval=60, max_keys=2, clock=Clock())
    rl.error("a", "a1"); rl.error("a", "a2"); rl.error("b", "b1")
    rl.error("c", "c1")                              # evicts "a", reporting its count
    notice = "rate limit: more messages for {} suppressed for up to 60 s"
    assert out == ["a1", notice.format("a"), "b1", "suppressed 1 messages for a in the last 60 s", "c1"]
    rl.error("c", "c2"); rl.flush()
    assert out[-2:] == [notice.format("c"), "suppressed 1 messages for c in the last 60 s"]
    rl.flush()
    assert len(out) == 7                             # nothing left to report


def test_rate_limit_disabled_level_costs_nothing() -> None:
    lg, out = capture()
    lg.setLevel(logging.ERROR)
    rl = RateLimitedLogger(lg, burst=1, clock=Clock())
    assert not rl.warning("k", "w") and out == []
    with pytest.raises(ValueError):
        RateLimitedLogger(lg, burst=0)


def test_filter_limits_only_marked_records() -> None:
    buf = io.StringIO()
    handler = setup_logging("info", buf, environ={})
    lg = logging.getLogger("vnvmed.test.guest")
    for i in range(50):
        lg.warning("bad doorbell %d", i, extra={"ratelimit": "bad doorbell"})
        lg.warning("ours %d", i)                       # unmarked: never limited
    for i in range(3):
        lg.info("other key %d", i, extra={"ratelimit": "other"})
    lines = buf.getvalue().splitlines()
    assert sum(re.search(r"bad doorbell \d", ln) is not None for ln in lines) == 5
    assert sum("rate limit: more messages for bad doorbell" in ln for ln in lines) == 1
    assert sum("ours" in ln for ln in lines) == 50
    assert sum("other key" in ln for ln in lines) == 3
    (flt,) = [f for f in handler.filters if isinstance(f, RateLimitFilter)]
    flt.limiter.flush()
    assert "suppressed 45 messages for bad doorbell" in buf.getvalue()
