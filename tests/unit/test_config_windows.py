"""The per-controller `message_write_windows` option: TOML, command line, RPC form, errors."""
from __future__ import annotations

import pytest

from ops import config as C
from ops.cmdline import from_args
from ops.ctl import build_parser, request_for

pytestmark = pytest.mark.timeout(20)
MB = 1 << 20


def test_default_is_low_memory_and_cli_overrides(tmp_path) -> None:
    cfg = from_args(["--controller", f"a={tmp_path}/a.sock", "--controller", f"b={tmp_path}/b.sock",
                       "--controller", f"c={tmp_path}/c.sock",
                       "--message-write-windows", "b=0-640K, 0xE0000-1M",
                       "--message-write-windows", "c=none"], {})
    assert cfg.controller("a").message_write_windows == ((0, MB),)
    assert cfg.controller("b").message_write_windows == ((0, 0xA0000), (0xE0000, MB))
    assert cfg.controller("c").message_write_windows == ()


def test_toml_key(tmp_path) -> None:
    p = tmp_path / "v.toml"
    p.write_text('[[controllers]]\nname = "c"\nsocket = "c.sock"\n'
                 'message_write_windows = ["0x100000-2M", "0-0xa0000"]\n'
                 '[[controllers]]\nname = "d"\nsocket = "d.sock"\nmessage_write_windows = []\n')
    c, d = C.load_toml(str(p), {"VNVMED_RUN_DIR": str(tmp_path)}).controllers
    assert c.message_write_windows == ((0, 0xA0000), (MB, 2 * MB))
    assert d.message_write_windows == ()
    assert "message_write_windows" in C.CONTROLLER_OPTIONS


@pytest.mark.parametrize("value, why", [
    ('["1M-0"]', "start < end"), ('["0-1M", "512K-2M"]', "overlap"), ('["0-1Q"]', "bad address"),
    ('["4096"]', "START-END"), ('[5]', "must be a string"), ('"0-1M"', None),
])
def test_bad_toml_values_name_the_key(tmp_path, value, why) -> None:
    p = tmp_path / "v.toml"
    p.write_text(f'[[controllers]]\nname = "c"\nsocket = "c.sock"\nmessage_write_windows = {value}\n')
    if why is None:     # the command-line form is accepted in the file too
        (c,) = C.load_toml(str(p), {"VNVMED_RUN_DIR": str(tmp_path)}).controllers
        assert c.message_write_windows == ((0, MB),)
        return
    with pytest.raises(C.ConfigError, match=rf"controllers\[0\]\.message_write_windows.*{why}"):
        C.load_toml(str(p), {"VNVMED_RUN_DIR": str(tmp_path)})


def test_bad_command_line(tmp_path) -> None:
    with pytest.raises(C.ConfigError, match="no controller named 'x'"):
        from_args(["--controller", f"a={tmp_path}/a.sock", "--message-write-windows", "x=0-1M"], {})
    with pytest.raises(C.ConfigError, match="NAME=RANGES"):
        from_args(["--controller", f"a={tmp_path}/a.sock", "--message-write-windows", "0-1M"], {})


def test_vnvmectl_and_controller_add_options(tmp_path) -> None:
    a = build_parser().parse_args(["controller", "add", "vm", "--socket", "/tmp/vm.sock",
                                   "--message-write-windows", "0-2M"])
    method, params = request_for(a)
    assert method == "controller.add" and params["message_write_windows"] == "0-2M"
    spec = C.controller_from_options("vm", "/tmp/vm.sock", {"message_write_windows": "0-2M"}, str(tmp_path))
    assert spec.message_write_windows == ((0, 2 * MB),)
    with pytest.raises(C.ConfigError, match=r"params\.message_write_windows"):
        C.controller_from_options("vm", "/tmp/vm.sock", {"message_write_windows": ["2M-1M"]}, str(tmp_path))


def test_controller_add_rpc_takes_the_options_vnvmectl_sends() -> None:
    from ops.mgmt import jsonrpc as rpc
    from ops.mgmt.server import METHODS
    a = build_parser().parse_args(["controller", "add", "vm", "--socket", "/tmp/vm.sock",
                                   "--doorbells", "trapped", "--message-write-windows", "none"])
    method, params = request_for(a)
    kwargs = rpc.bind(METHODS[method], params)
    assert kwargs["doorbells"] == "trapped" and kwargs["message_write_windows"] == "none"
