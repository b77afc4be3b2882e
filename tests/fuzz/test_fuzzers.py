"""The fuzzers themselves, on a CI budget (seconds): every atheris target and the
socket-level fuzzer find nothing, and the runner classifies known-bad targets right.

Long runs: scripts/fuzz --minutes N (fuzz/run.py).  atheris comes with the test
extras (scripts/setup --test); where it is missing these tests skip and say so,
except under VNVMED_LINT_REQUIRED=1 (scripts/test, CI), where that is a failure.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from fuzz.run import run_atheris, run_socket, table
from fuzz.targets import TARGETS

pytestmark = pytest.mark.timeout(180)


def _need_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        msg = "atheris is not installed (scripts/setup --test installs it)"
        if os.environ.get("VNVMED_LINT_REQUIRED") == "1":
            pytest.fail(msg + " and VNVMED_LINT_REQUIRED=1", pytrace=False)
        pytest.skip(msg)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_target_finds_nothing(target: str, tmp_path) -> None:
    _need_atheris()
    r = run_atheris(target, 5, str(tmp_path))
    print(table([r]))
    assert r.steps > 1000, r
    assert (r.crashes, r.hangs, r.guard_hits) == (0, 0, 0), "\n".join(r.findings)


@pytest.mark.parametrize("kind,field", [("crash", "crashes"), ("guard", "guard_hits"), ("hang", "hangs")])
def test_runner_classifies_findings(kind: str, field: str, tmp_path) -> None:
    _need_atheris()
    r = run_atheris(f"selftest_{kind}", 3, str(tmp_path), log=lambda s: None, unit_timeout=1)
    assert getattr(r, field) >= 1, r
    others = {"crashes", "hangs", "guard_hits"} - {field}
    assert all(getattr(r, f) == 0 for f in others), r
    assert any((tmp_path / "findings" / f"selftest_{kind}").iterdir())


def test_socket_fuzzer_finds_nothing(tmp_path) -> None:
    r = run_socket(12, str(tmp_path))
    print(table([r]))
    assert r.steps > 100, r
    assert (r.crashes, r.hangs) == (0, 0), "\n".join(r.findings)
