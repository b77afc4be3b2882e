"""The per-controller `doorbells` option: TOML, command line, default, bad values."""
from __future__ import annotations

import pytest

from ops import config as C
from ops.cmdline import from_args

pytestmark = pytest.mark.timeout(20)


def test_default_is_mmap_and_cli_sets_trapped(tmp_path) -> None:
    cfg = from_args(["--controller", f"a={tmp_path}/a.sock", "--controller", f"b={tmp_path}/b.sock",
                       "--doorbells", "b=trapped"], {})
    assert cfg.controller("a").doorbells is C.DoorbellMode.MMAP
    assert cfg.controller("b").doorbells is C.DoorbellMode.TRAPPED


def test_toml_key(tmp_path) -> None:
    p = tmp_path / "v.toml"
    p.write_text('[[controllers]]\nname = "c"\nsocket = "c.sock"\ndoorbells = "Trapped"\n'
                 '[[controllers.namespaces]]\nkind = "ram"\nsize = "1M"\n')
    (c,) = C.load_toml(str(p), {"VNVMED_RUN_DIR": str(tmp_path)}).controllers
    assert c.doorbells == "trapped"


def test_bad_values_are_config_errors(tmp_path) -> None:
    p = tmp_path / "v.toml"
    p.write_text('[[controllers]]\nname = "c"\nsocket = "c.sock"\ndoorbells = "ioeventfd"\n')
    with pytest.raises(C.ConfigError, match=r"controllers\[0\]\.doorbells.*'mmap' or 'trapped'"):
        C.load_toml(str(p), {})
    with pytest.raises(C.ConfigError, match="no controller named 'x'"):
        from_args(["--controller", f"a={tmp_path}/a.sock", "--doorbells", "x=trapped"], {})
    with pytest.raises(C.ConfigError, match="NAME=MODE"):
        from_args(["--controller", f"a={tmp_path}/a.sock", "--doorbells", "trapped"], {})
