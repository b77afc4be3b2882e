"""vfio_user is sans-project: it imports only the standard library and itself."""
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = {"nvme", "pci", "reactor", "workers", "migration", "backends", "bin", "tests"}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_vfio_user_imports_nothing_from_the_project():
    bad = {(p.name, m) for p in (ROOT / "vfio_user").glob("*.py") for m in _imports(p)
           if m in PROJECT}
    assert not bad


def test_vfio_user_uses_only_stdlib():
    std = sys.stdlib_module_names | {"vfio_user"}
    bad = {(p.name, m) for p in (ROOT / "vfio_user").glob("*.py") for m in _imports(p)
           if m not in std}
    assert not bad
