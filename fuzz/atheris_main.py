"""Run one fuzz target under atheris (libFuzzer): ``python -m fuzz.atheris_main TARGET [libFuzzer args]``.

The project's packages are imported under `atheris.instrument_imports`, so libFuzzer
sees Python line/branch coverage of the code under test and keeps inputs that reach
new code.  libFuzzer's own flags pass through (-max_total_time, -timeout,
-runs, corpus directories, -artifact_prefix, ...).  Exit status and output are
libFuzzer's: fuzz/run.py reads them (steps, crash kind).
"""
from __future__ import annotations

import importlib
import sys

import atheris

INSTRUMENTED = ["vfio_user", "nvme", "reactor", "backends", "fuzz"]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer args]")
    name = argv[1]
    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.targets import SELFTEST, TARGETS
        # The vfio_message target's decoders live in the pipeline's table: import it
        # here, under instrumentation (the target imports it lazily).
        importlib.import_module("reactor.pipeline")
    known = {**TARGETS, **SELFTEST}
    if name not in known:
        sys.exit(f"unknown target {name!r}: one of {', '.join(TARGETS)}")
    target = known[name]()
    atheris.Setup([argv[0], *argv[2:]], target.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
