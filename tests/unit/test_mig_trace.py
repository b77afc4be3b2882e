"""migration/trace.py: marks from several processes on one time line."""
from __future__ import annotations

import time

from migration.trace import PhaseTrace, format_phases, merge, phases, window


def test_marks_are_monotonic_clock_ns_and_bounded() -> None:
    tr = PhaseTrace(maxlen=3)
    before = time.monotonic_ns()
    for name in ("a", "b", "c", "d"):
        tr.mark(name)
    tr.mark("given", 5)
    marks = tr.marks()
    assert [n for n, _ in marks] == ["c", "d", "given"]      # the oldest dropped
    assert all(t >= before for _, t in marks[:2]) and marks[2][1] == 5


def test_window_merge_and_phases_partition_the_blackout() -> None:
    client = [("client stop", 100), ("client running", 1000)]
    src = [["old", 50], ["quiesced", 300], ["saved", 400]]
    dst = [["loaded", 700], ["first poll", 1200], ["later", 99999]]
    line = merge(client, window(src, 100, 1100, "src "), window(dst, 100, 1100 + 200, "dst "))
    assert [n for n, _ in line] == ["client stop", "src quiesced", "src saved", "dst loaded",
                                    "client running", "dst first poll"]
    ph = phases(line)
    assert ph[0] == ("src quiesced", 200 / 1e6)
    assert abs(sum(dt for _, dt in ph) - (1200 - 100) / 1e6) < 1e-12
    text = format_phases(line)
    assert text.splitlines()[0].endswith("client stop") and "dst first poll" in text
    assert format_phases([]) == "(no marks)"


def test_gc_watch_marks_a_full_collection() -> None:
    import gc

    from migration.trace import GcWatch
    tr = PhaseTrace()
    w = GcWatch(tr)
    w.install()
    try:
        gc.collect()
    finally:
        w.remove()
    names = [n for n, _ in tr.marks()]
    assert names[-2:] == ["gc start", "gc gen2 done"]
    gc.collect()
    assert len(tr.marks()) == len(names)          # removed: no more marks
