"""World-connectable controller sockets are refused unless forced (issue 12).

Any local user who can connect to a controller socket can attach to the guest's disks,
so a socket_mode with world bits (e.g. 0666) is a configuration error unless the
controller also says `allow_world_socket = true`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ops import config as C
from ops.config import ConfigError

ENV = {"VNVMED_RUN_DIR": "/tmp/vn-run"}


def _load(tmp_path: Path, extra: str) -> C.DaemonConfig:
    p = tmp_path / "vnvmed.toml"
    p.write_text(f'[[controllers]]\nname = "c"\nsocket = "c.sock"\n{extra}\n'
                 '[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\n')
    return C.load_toml(str(p), ENV)


@pytest.mark.parametrize("mode", ['"0666"', '"0606"', '"0601"', "0o777", '"0644"'])
def test_world_bits_refused(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, f"socket_mode = {mode}")
    msg = str(ei.value)
    assert "socket_mode" in msg and "allow_world_socket" in msg


@pytest.mark.parametrize("mode,want", [('"0600"', 0o600), ('"0660"', 0o660), ("0o640", 0o640)])
def test_owner_and_group_modes_accepted(tmp_path: Path, mode: str, want: int) -> None:
    (c,) = _load(tmp_path, f"socket_mode = {mode}").controllers
    assert c.socket_mode == want and not c.allow_world_socket


def test_world_bits_accepted_when_forced(tmp_path: Path) -> None:
    (c,) = _load(tmp_path, 'socket_mode = "0666"\nallow_world_socket = true').controllers
    assert c.socket_mode == 0o666 and c.allow_world_socket


def test_force_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, 'socket_mode = "0666"\nallow_world_socket = "yes"')


def test_controller_add_options_refuse_world_bits() -> None:
    with pytest.raises(ConfigError):
        C.controller_from_options("c", "/tmp/c.sock", {"socket_mode": "0666"}, "/tmp")
    c = C.controller_from_options("c", "/tmp/c.sock", {"socket_mode": "0666", "allow_world_socket": True}, "/tmp")
    assert c.socket_mode == 0o666
