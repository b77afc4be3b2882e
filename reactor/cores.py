"""Parse the --cores option into a list of CPU numbers.

Accepted syntax is the one taskset/cpuset use: comma-separated items, each a
single core ``N`` or an inclusive ascending range ``A-B``. The result is sorted
and unique. Every core must be in the affinity mask we were started with
(os.sched_getaffinity(0)), because workers are pinned to them and pinning to a
core outside the mask fails later, in a child, with a much worse message.
"""
from __future__ import annotations

import os
import re

__all__ = ["parse_cores"]

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_cores(spec: str, allowed: set[int] | None = None) -> list[int]:
    """Parse ``"0-3"``, ``"0,2,5"``, ``"1-2,7"`` into sorted unique cores.

    ``allowed`` defaults to os.sched_getaffinity(0); it is a parameter so tests
    do not depend on the machine.

    Raises:
        ValueError: bad syntax, empty list, descending range, or a core that is
            not in ``allowed``. The message names the offending item.
    """
    if not isinstance(spec, str):
        raise ValueError(f"core list must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("core list is empty")
    cores: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"core list {spec!r}: empty item (stray comma?)")
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(
                f"core list {spec!r}: bad item {item!r} (expected N or A-B with A <= B)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"core list {spec!r}: descending range {item!r}")
        # Bound the range before materialising it: "0-99999999999" must not eat RAM.
        if hi - lo > 65535:
            raise ValueError(f"core list {spec!r}: range {item!r} is implausibly large")
        cores.update(range(lo, hi + 1))
    if allowed is None:
        allowed = set(os.sched_getaffinity(0))
    missing = sorted(cores - set(allowed))
    if missing:
        raise ValueError(
            f"core list {spec!r}: core(s) {_fmt(missing)} not available to this process "
            f"(allowed: {_fmt(sorted(allowed))})")
    return sorted(cores)


def _fmt(cores: list[int]) -> str:
    """Compact 'a-b,c' rendering of a sorted core list, for error messages."""
    out: list[str] = []
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        out.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(out) if out else "none"
