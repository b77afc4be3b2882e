"""pyflakes over every Python file of the checkout, and mypy over the packages (setup.cfg [mypy]).

Both tools come with the test extras (scripts/setup --test).  Where they are not installed
the test skips with that reason, except under VNVMED_LINT_REQUIRED=1 (scripts/test, CI),
where a missing tool is a failure: the gate must not silently vanish.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        msg = f"{module} is not installed in {sys.prefix} (scripts/setup --test installs it)"
        if os.environ.get("VNVMED_LINT_REQUIRED") == "1":
            pytest.fail(msg + " and VNVMED_LINT_REQUIRED=1", pytrace=False)
        pytest.skip(msg)


SKIP_DIRS = {".git", ".venv", ".cache", ".mypy_cache", ".pytest_cache", "__pycache__", "build", "dist"}


def python_files() -> list[str]:
    """The checkout's Python files: git's list, or (no git on the machine, or a tarball
    rather than a clone: a fresh Debian 13 had no git) a walk that leaves out what
    .gitignore ignores."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py", "bin/*"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        return [p for p in out if (ROOT / p).is_file()]
    files = []
    for d, subdirs, names in os.walk(ROOT):
        subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS and not s.endswith(".egg-info")
                            and os.path.relpath(os.path.join(d, s), ROOT) != "tests/qemu/.cache")
        rel = os.path.relpath(d, ROOT)
        files += [os.path.normpath(os.path.join(rel, n)) for n in sorted(names)
                  if n.endswith(".py") or rel == "bin"]
    return files


def test_pyflakes_clean() -> None:
    _need("pyflakes")
    files = python_files()
    assert "reactor/supervisor.py" in files and "bin/vnvmed" in files
    res = subprocess.run([sys.executable, "-m", "pyflakes", *files], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pyflakes:\n{res.stdout}{res.stderr}"


@pytest.mark.timeout(600)
def test_mypy_clean() -> None:
    _need("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"mypy (files from setup.cfg [mypy]):\n{res.stdout}{res.stderr}"
