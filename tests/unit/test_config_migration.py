"""ops.config: the migration keys - a controller's `restore` file, a namespace's `fingerprint`."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from migration import snapshot
from ops import config as C
from ops.cmdline import from_args
from ops.config import ConfigError

ENV = {"VNVMED_RUN_DIR": "/tmp/vnvmed-test-run"}

TOML = """\
[[controllers]]
name = "a"
socket = "a.sock"
restore = "{restore}"

[[controllers.namespaces]]
kind = "null"
size = "16M"
fingerprint = "{fp}"
"""


def load(tmp_path: Path, restore: str, fp: str = "shared-lun-7") -> C.DaemonConfig:
    p = tmp_path / "vnvmed.toml"
    p.write_text(textwrap.dedent(TOML.format(restore=restore, fp=fp)))
    return C.load_toml(str(p), ENV)


def test_restore_relative_to_the_file_and_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "a.snap").write_bytes(snapshot.encode({"identity": {}}))
    cfg = load(tmp_path, "a.snap")
    c = cfg.controllers[0]
    assert c.restore == str(tmp_path / "a.snap")
    assert c.namespaces[0].fingerprint == "shared-lun-7"


@pytest.mark.parametrize("content,why", [(None, "cannot read"), (b"garbage!", "not a vnvmed")])
def test_bad_restore_file(tmp_path: Path, content: bytes | None, why: str) -> None:
    if content is not None:
        (tmp_path / "a.snap").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "a.snap")
    assert "controllers[0].restore" in str(e.value) and why in str(e.value)


def test_empty_fingerprint_refused(tmp_path: Path) -> None:
    (tmp_path / "a.snap").write_bytes(snapshot.encode({"identity": {}}))
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "a.snap", fp="")
    assert "fingerprint" in str(e.value)


def test_restore_on_the_command_line(tmp_path: Path) -> None:
    snap = tmp_path / "x.snap"
    snap.write_bytes(snapshot.encode({"identity": {}}))
    cfg = from_args(["--controller", f"n={tmp_path}/n.sock", "--restore", f"n={snap}"], ENV)
    assert cfg.controllers[0].restore == str(snap)
    with pytest.raises(ConfigError) as e:
        from_args(["--controller", f"n={tmp_path}/n.sock", "--restore", f"m={snap}"], ENV)
    assert "no controller named 'm'" in str(e.value)
