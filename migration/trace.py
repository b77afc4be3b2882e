"""Phase marks of a migration's blackout, from every process on one time line.

Theory of operation
-------------------
The blackout (stop arc sent .. destination RUNNING) crosses many processes: the
client, the source front-end and its workers, the destination front-end and its
workers.  Each of them stamps the moments it sees (`PhaseTrace.mark`) with
`time.monotonic_ns()`: CLOCK_MONOTONIC is one clock for every process of a host, so
stamps taken anywhere on the host line up without any exchange of clocks (the test
rig's two "hosts" are two daemons on one machine; across real hosts the client's
marks alone are comparable).  A front-end keeps the last `MAX_MARKS` marks of its
migration controller in a ring (`vnvmectl --json controller list` shows them under
`migration.trace`); a reader keeps the ones inside the blackout window
(`window`), merges the processes' lists (`merge`) and reads the phases as the gaps
between consecutive marks (`phases`).

Marking costs one clock read and a deque append, and happens only on migration
requests, quiesce acks and the first poll after a resume that asked for it: never
per command.  Pure: no I/O.
"""
from __future__ import annotations

import collections
import gc
import time
from typing import Iterable, Sequence

MAX_MARKS = 96

Mark = tuple[str, int]          # (name, CLOCK_MONOTONIC ns)


def now() -> int:
    return time.monotonic_ns()


class PhaseTrace:
    def __init__(self, maxlen: int = MAX_MARKS) -> None:
        self._marks: collections.deque[Mark] = collections.deque(maxlen=maxlen)

    def mark(self, name: str, t: int | None = None) -> None:
        self._marks.append((name, now() if t is None else int(t)))

    def marks(self) -> list[list]:
        """JSON-ready: [[name, ns], ...] oldest first."""
        return [[n, t] for n, t in self._marks]


class GcWatch:
    """Marks the garbage collector's pauses into a trace: every collection of generation
    1 or 2, and any that lasted `min_ns` or more ("gc start" .. "gc genN done"), so a
    pause inside a blackout shows up as its own phase.  One clock read per collection."""

    def __init__(self, trace: PhaseTrace, min_ns: int = 300_000) -> None:
        self.trace = trace
        self.min_ns = min_ns
        self._t = 0

    def install(self) -> None:
        gc.callbacks.append(self._cb)

    def remove(self) -> None:
        try:
            gc.callbacks.remove(self._cb)
        except ValueError:
            pass

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = now()
            return
        gen = info.get("generation", 0)
        t = now()
        if gen >= 1 or t - self._t >= self.min_ns:
            self.trace.mark("gc start", self._t)
            self.trace.mark(f"gc gen{gen} done", t)


def window(marks: Iterable[Sequence], t0: int, t1: int, prefix: str = "") -> list[Mark]:
    """The marks stamped in [t0, t1], names prefixed (e.g. "src " / "dst ")."""
    return [(prefix + str(n), int(t)) for n, t in marks if t0 <= int(t) <= t1]


def merge(*lists: Iterable[Mark]) -> list[Mark]:
    out: list[Mark] = [m for lst in lists for m in lst]
    out.sort(key=lambda m: m[1])
    return out


def phases(marks: Sequence[Mark]) -> list[tuple[str, float]]:
    """(name, ms since the previous mark) per mark after the first; the first is t0."""
    return [(n, (t - marks[i][1]) / 1e6) for i, (n, t) in enumerate(marks[1:])]


def format_phases(marks: Sequence[Mark]) -> str:
    if not marks:
        return "(no marks)"
    t0 = marks[0][1]
    lines = [f"{'at ms':>8} {'+ms':>7}  {marks[0][0]}"]
    for (name, dt), (_, t) in zip(phases(marks), marks[1:]):
        lines.append(f"{(t - t0) / 1e6:8.3f} {dt:7.3f}  {name}")
    return "\n".join(lines)
