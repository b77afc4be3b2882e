"""Dependency direction (DESIGN.md §2): pure packages never import the process layers."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = {"vfio_user", "pci", "nvme", "backends", "reactor", "ops", "workers", "migration", "benchmarks"}

# package -> project packages it may import
ALLOWED = {
    "vfio_user": set(),
    "nvme": {"backends"},            # the Backend protocol a Namespace wraps
    "backends": set(),
    "pci": {"vfio_user"},            # ProtocolError for bad config accesses
    "migration": {"vfio_user", "pci", "nvme", "backends"},
    "workers": {"nvme", "backends", "vfio_user", "reactor", "ops", "migration"},
}
# modules of reactor a worker may use (shared-memory plumbing, not the front-end loop)
WORKER_REACTOR_OK = {"reactor.channel", "reactor.guestmem", "reactor.ipc", "reactor.shm",
                     "ops.proctitle", "ops.logsetup"}


def imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from reactor import ipc` names the module reactor.ipc
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules(pkg: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_package_imports_only_what_it_may(pkg):
    bad = []
    for path in modules(pkg):
        for mod in imports(path):
            top = mod.split(".")[0]
            if top in PROJECT and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
            if pkg == "workers" and top in ("reactor", "ops") and not any(
                    mod == ok or mod.startswith(ok + ".") for ok in WORKER_REACTOR_OK):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {mod} (front-end side)")
    assert not bad, "\n".join(bad)
