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
from typing import Sequence

__all__ = ["expand_cores", "parse_cores", "format_cores"]

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_cores(spec: str) -> list[int]:
    """Syntax only: ``"1-2,7,2"`` -> ``[1, 2, 7, 2]``, in the order written, repeats kept.

    No availability check: ops/config.py validates a configuration that may be
    meant for another machine, and decides itself what a repeated core means.

    Raises:
        ValueError: not a string, empty list, bad item, descending or huge range.
            The message names the offending item.
    """
    if not isinstance(spec, str):
        raise ValueError(f"core list must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("core list is empty")
    cores: list[int] = []
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
        cores.extend(range(lo, hi + 1))
    return cores


def parse_cores(spec: str, allowed: set[int] | None = None) -> list[int]:
    """Parse ``"0-3"``, ``"0,2,5"``, ``"1-2,7"`` into sorted unique cores.

    ``allowed`` defaults to os.sched_getaffinity(0); it is a parameter so tests
    do not depend on the machine.

    Raises:
        ValueError: bad syntax (see expand_cores), or a core that is not in
            ``allowed``. The message names the offending item.
    """
    cores = set(expand_cores(spec))
    if allowed is None:
        allowed = set(os.sched_getaffinity(0))
    missing = sorted(cores - set(allowed))
    if missing:
        raise ValueError(
            f"core list {spec!r}: core(s) {format_cores(missing)} not available to this process "
            f"(allowed: {format_cores(sorted(allowed)) or 'none'})")
    return sorted(cores)


def format_cores(cores: Sequence[int]) -> str:
    """Inverse of parse_cores for display: [0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
