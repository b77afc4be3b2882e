"""ops.config: TOML loader, command line, embedded default; one test per bad input."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from ops import config as C
from ops.cmdline import from_args
from ops.config import ConfigError, NamespaceKind, Polling
from ops.cores import format_cores

ENV = {"VNVMED_RUN_DIR": "/tmp/vnvmed-test-run"}


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "vnvmed.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def image(tmp_path: Path, size: int, name: str = "disk.img") -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


GOOD = """\
run_dir = "/tmp/vn-run"
cores = "0-1"
polling = "busy"
log_level = "DEBUG"

[[controllers]]
name = "fast"
socket = "fast.sock"
serial = "SN123"
mqes = 255
socket_mode = "0600"

[[controllers.namespaces]]
kind = "ram"
size = "64M"

[[controllers.namespaces]]
kind = "null"
size = "1G"
nsid = 7
block_size = 4096

[[controllers]]
name = "slow"
socket = "/tmp/vn-other/slow.sock"
socket_mode = 0o640

[[controllers.namespaces]]
kind = "file"
path = "{img}"
read_only = true
"""


def test_good_file_builds_the_model(tmp_path: Path) -> None:
    img = image(tmp_path, 1 << 20)
    cfg = C.load_toml(write(tmp_path, GOOD.format(img=img)), ENV)
    assert cfg.run_dir == "/tmp/vn-run"
    assert cfg.rpc_socket == "/tmp/vn-run/vnvmed.rpc"
    assert cfg.cores == [0, 1] and cfg.polling is Polling.BUSY
    assert cfg.log_level == "debug"
    fast, slow = cfg.controllers
    assert fast.socket == "/tmp/vn-run/fast.sock"          # relative -> inside run_dir
    assert fast.serial == "SN123" and fast.mqes == 255 and fast.socket_mode == 0o600
    assert [(n.kind, n.nsid, n.size, n.block_size) for n in fast.namespaces] == [
        (NamespaceKind.RAM, 1, 64 << 20, 512), (NamespaceKind.NULL, 7, 1 << 30, 4096)]
    assert slow.socket == "/tmp/vn-other/slow.sock" and slow.socket_mode == 0o640
    assert slow.serial == "VNVMESLOW" and slow.max_io_queues == 64
    (ns,) = slow.namespaces
    assert ns.kind is NamespaceKind.FILE and ns.arg == img and ns.size == 1 << 20 and ns.read_only
    assert cfg.source == os.path.abspath(tmp_path / "vnvmed.toml")


def load_err(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        C.load_toml(path, ENV)
    assert path in str(ei.value)          # every message names the file
    return ei.value


def test_unknown_key_names_key_path_and_line(tmp_path: Path) -> None:
    e = load_err(tmp_path, """\
        [[controllers]]
        name = "a"
        socket = "a.sock"
        [[controllers]]
        name = "b"
        socket = "b.sock"
        [[controllers.namespaces]]
        kind = "ram"
        size = "1M"
        colour = "blue"
        """)
    assert e.key == "controllers[1].namespaces[0].colour"
    assert e.line == 10
    assert "unknown key" in str(e) and "block_size" in str(e)   # lists valid keys
    assert str(e).startswith(f"{tmp_path / 'vnvmed.toml'}:10: controllers[1].namespaces[0].colour")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    e = load_err(tmp_path, 'log_lvl = "info"\n')
    assert e.key == "log_lvl" and e.line == 1


def test_wrong_type(tmp_path: Path) -> None:
    e = load_err(tmp_path, """\
        [[controllers]]
        name = "a"
        socket = "a.sock"
        mqes = "lots"
        """)
    assert e.key == "controllers[0].mqes" and e.line == 4
    assert "expected integer" in e.reason and "'lots'" in e.reason


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    e = load_err(tmp_path, "poll_sleep_us = true\n")
    assert e.key == "poll_sleep_us" and "expected integer" in e.reason


def test_removed_poll_idle_us_says_so(tmp_path: Path) -> None:
    e = load_err(tmp_path, "poll_idle_us = 50\n")
    assert e.key == "poll_idle_us" and "remove the line" in e.reason


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    e = load_err(tmp_path, 'run_dir = "/x"\ncores = [0, \n  = 3\n')
    assert e.line is not None and e.line >= 2
    assert "TOML syntax error" in e.reason


NS_CTRL = """\
[[controllers]]
name = "a"
socket = "a.sock"
"""


def test_duplicate_nsid(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + """\
[[controllers.namespaces]]
kind = "ram"
size = "1M"
nsid = 3
[[controllers.namespaces]]
kind = "null"
size = "1M"
nsid = 3
""")
    assert e.key == "controllers[0].namespaces[1].nsid" and e.line == 11
    assert "duplicate NSID 3" in e.reason


def test_nsid_out_of_range(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\nnsid = 0\n')
    assert e.key == "controllers[0].namespaces[0].nsid" and "out of range" in e.reason


def test_duplicate_controller_name(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers]]\nname = "a"\nsocket = "b.sock"\n')
    assert e.key == "controllers[1].name" and e.line == 5 and "duplicate controller name 'a'" in e.reason


def test_duplicate_controller_socket(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers]]\nname = "b"\nsocket = "/tmp/vn-run2/a.sock"\n'
                 .replace("/tmp/vn-run2/a.sock", "/tmp/vnvmed-test-run/a.sock"))
    assert e.key == "controllers[1].socket" and "already used by controllers[0]" in e.reason


def test_socket_may_not_be_the_rpc_socket(tmp_path: Path) -> None:
    e = load_err(tmp_path, '[[controllers]]\nname = "a"\nsocket = "vnvmed.rpc"\n')
    assert "management socket" in e.reason


@pytest.mark.parametrize("size", ["12Q", "-1", "0", "1.5G", "", "G"])
def test_bad_size(tmp_path: Path, size: str) -> None:
    e = load_err(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "ram"\nsize = "{size}"\n')
    assert e.key == "controllers[0].namespaces[0].size" and e.line == 6


def test_size_not_multiple_of_block(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers.namespaces]]\nkind = "ram"\nsize = 1000\n')
    assert "multiple of block_size 512" in e.reason


def test_bad_block_size(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\nblock_size = 520\n')
    assert e.key == "controllers[0].namespaces[0].block_size"


def test_missing_backing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    e = load_err(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "file"\npath = "{missing}"\n')
    assert e.key == "controllers[0].namespaces[0].path" and "does not exist" in e.reason
    assert str(missing) in e.reason and e.line == 6


def test_too_small_backing_file(tmp_path: Path) -> None:
    img = image(tmp_path, 4096)
    e = load_err(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "file"\npath = "{img}"\n'
                 'block_size = 8192\n')
    assert e.key == "controllers[0].namespaces[0].path" and "too small" in e.reason


def test_empty_backing_file(tmp_path: Path) -> None:
    img = image(tmp_path, 0)
    e = load_err(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "file"\npath = "{img}"\n')
    assert "too small" in e.reason


def test_file_partial_last_block_is_dropped(tmp_path: Path) -> None:
    img = image(tmp_path, 4096 + 100)
    cfg = C.load_toml(write(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "file"\npath = "{img}"\n'),
                      ENV)
    assert cfg.controllers[0].namespaces[0].size == 4096


def test_bad_kind(tmp_path: Path) -> None:
    e = load_err(tmp_path, NS_CTRL + '[[controllers.namespaces]]\nkind = "tape"\nsize = "1M"\n')
    assert e.key == "controllers[0].namespaces[0].kind" and e.line == 5
    assert "ram, null, file" in e.reason


def test_size_given_to_file_namespace(tmp_path: Path) -> None:
    img = image(tmp_path, 4096)
    e = load_err(tmp_path, NS_CTRL + f'[[controllers.namespaces]]\nkind = "file"\npath = "{img}"\nsize = "1M"\n')
    assert e.key == "controllers[0].namespaces[0].size" and "use 'path'" in e.reason


def test_bad_serial_and_name(tmp_path: Path) -> None:
    e = load_err(tmp_path, '[[controllers]]\nname = "a"\nsocket = "a.sock"\nserial = "x' + "9" * 20 + '"\n')
    assert e.key == "controllers[0].serial"
    e = load_err(tmp_path, '[[controllers]]\nname = "a b"\nsocket = "a.sock"\n')
    assert e.key == "controllers[0].name"


def test_bad_cores_polling_level(tmp_path: Path) -> None:
    assert load_err(tmp_path, 'cores = "3-1"\n').key == "cores"
    assert load_err(tmp_path, 'cores = [0, 0]\n').key == "cores"
    assert load_err(tmp_path, 'polling = "sometimes"\n').key == "polling"
    assert load_err(tmp_path, 'log_level = "loud"\n').key == "log_level"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        C.load_toml(str(tmp_path / "absent.toml"))


# ----------------------------------------------------------------- command line

def test_embedded_default_uses_run_dir_env() -> None:
    cfg = from_args([], ENV)
    (c,) = cfg.controllers
    assert c.name == "nvme0" and c.socket == "/tmp/vnvmed-test-run/nvme0.sock"
    (ns,) = c.namespaces
    assert (ns.kind, ns.size, ns.nsid) == (NamespaceKind.RAM, 1 << 30, 1)
    assert from_args([], {}).run_dir == "/run/vnvmed"


def test_cli_controllers_and_namespaces(tmp_path: Path) -> None:
    img = image(tmp_path, 1 << 20)
    cfg = from_args(["--cores", "0,1", "--controller", "a=rel.sock", "--controller", "b=/tmp/b.sock",
                       "--namespace", "a=null:2G", "--namespace", f"a=file:{img}", "--log-level", "WARNING",
                       "--polling", "busy"], ENV)
    a, b = cfg.controllers
    assert a.socket == os.path.abspath("rel.sock")          # CLI paths are relative to cwd
    assert [(n.kind, n.nsid, n.size) for n in a.namespaces] == [
        (NamespaceKind.NULL, 1, 2 << 30), (NamespaceKind.FILE, 2, 1 << 20)]
    assert [n.spec for n in b.namespaces] == ["ram:1G"]     # CLI controller without ns gets the default
    assert cfg.cores == [0, 1] and cfg.log_level == "warning" and cfg.polling is Polling.BUSY


def test_cli_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "debug"\ncores = "0"\npolling = "busy"\n' + NS_CTRL +
                 '[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\n')
    cfg = from_args(["--config", path, "--log-level", "error", "--cores", "1", "--polling", "adaptive",
                       "--controller", "a=/tmp/moved.sock", "--namespace", "a=ram:2M",
                       "--run-dir", "/tmp/other-run"], ENV)
    assert cfg.log_level == "error" and cfg.cores == [1] and cfg.polling is Polling.ADAPTIVE
    assert cfg.run_dir == "/tmp/other-run" and cfg.rpc_socket == "/tmp/other-run/vnvmed.rpc"
    (a,) = cfg.controllers
    assert a.socket == "/tmp/moved.sock"
    assert [(n.nsid, n.size) for n in a.namespaces] == [(1, 1 << 20), (2, 2 << 20)]


def test_cli_run_dir_moves_relative_sockets(tmp_path: Path) -> None:
    path = write(tmp_path, NS_CTRL)
    cfg = from_args(["--config", path, "--run-dir", "/tmp/rd2"], ENV)
    assert cfg.controllers[0].socket == "/tmp/rd2/a.sock"


@pytest.mark.parametrize("argv, key", [
    (["--namespace", "nvme9=ram:1M"], "--namespace[0]"),
    (["--controller", "a=/tmp/a.sock", "--namespace", "a=tape:1M"], "--namespace[0].kind"),
    (["--controller", "a=/tmp/a.sock", "--namespace", "a=ram:12Q"], "--namespace[0].size"),
    (["--controller", "a=/tmp/a.sock", "--namespace", "a=file:/nonexistent/x.img"], "--namespace[0].path"),
    (["--controller", "nosocket"], "--controller[0]"),
    (["--controller", "a=/tmp/s.sock", "--controller", "b=/tmp/s.sock"], "controllers[1].socket"),
    (["--cores", "x"], "--cores"),
    (["--controller", "c=/tmp/" + "x" * 120], "--controller[0].socket"),
])
def test_cli_errors(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        from_args(argv, ENV)
    assert ei.value.key == key and ei.value.source == "<command line>"


def test_cli_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as ei:
        from_args(["--log-level", "loud"], ENV)
    assert ei.value.code == 2


# ----------------------------------------------------------------- helpers

def test_parse_size_and_cores() -> None:
    assert C.parse_size("4096") == 4096 and C.parse_size(4096) == 4096
    assert C.parse_size("64M") == 64 << 20 and C.parse_size("2GiB") == 2 << 30 and C.parse_size("1t") == 1 << 40
    for bad in ("1.5G", "-5", "M", True, 0):
        with pytest.raises(ValueError):
            C.parse_size(bad)  # type: ignore[arg-type]
    assert C.parse_cores("0-2,5") == [0, 1, 2, 5] and format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_namespace_parse_and_check_for_mgmt(tmp_path: Path) -> None:
    ns = C.check_namespace(C.NamespaceSpec.parse("null:8M", block_size=4096))
    assert ns.size == 8 << 20 and ns.spec == "null:8M"
    with pytest.raises(ValueError, match="KIND:ARG"):
        C.NamespaceSpec.parse("ram")
    with pytest.raises(ConfigError, match="<request>"):
        C.check_namespace(C.NamespaceSpec.parse(f"file:{tmp_path}/missing"))


def test_controller_from_options_and_uniqueness() -> None:
    cfg = from_args([], ENV)
    c = C.controller_from_options("x", "x.sock", {"mqes": 63}, cfg.run_dir)
    assert c.socket == "/tmp/vnvmed-test-run/x.sock" and c.mqes == 63 and c.namespaces == []
    assert [k.name for k in C.with_controller(cfg, c).controllers] == ["nvme0", "x"]
    with pytest.raises(ConfigError) as ei:
        C.controller_from_options("x", "x.sock", {"colour": 1}, cfg.run_dir)
    assert ei.value.key == "params.colour"
    dup = C.controller_from_options("nvme0", "y.sock", {}, cfg.run_dir)
    with pytest.raises(ConfigError, match="duplicate controller name"):
        C.with_controller(cfg, dup)


def test_contrib_example_loads_and_documents_every_key() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "vnvmed.toml"
    cfg = C.load_toml(str(example), {})
    (c,) = cfg.controllers
    assert c.socket == "/run/vnvmed/nvme0.sock" and [n.nsid for n in c.namespaces] == [1, 2]
    text = example.read_text()
    for key in (*C._TOP_SCHEMA, *C._CTRL_SCHEMA, *C._NS_SCHEMA):
        if key not in ("controllers", "namespaces", "poll_idle_us"):   # poll_idle_us: removed
            assert f"{key} =" in text, f"{key} is not documented in contrib/vnvmed.toml"
