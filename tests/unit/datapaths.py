"""The data paths QueueRunner tests run on: python (the reference) and native (nvme.native).

`runner(datapath, executor=None, **kw)` makes the runner; `PARAMS` parametrises a test
over both.  Where the native extension is not built the native cases skip with the
reason, except under VNVMED_NATIVE_REQUIRED=1 (scripts/test, CI), where they fail: the
second data path must not silently go untested.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

from nvme import native
from nvme.qpair import QueueRunner

REQUIRED = os.environ.get("VNVMED_NATIVE_REQUIRED") == "1"


def _native_param() -> Any:
    if native.available or REQUIRED:
        return pytest.param("native")
    return pytest.param("native", marks=pytest.mark.skip(reason=f"native data path {native.why_not}"))


PARAMS = [pytest.param("python"), _native_param()]


def runner(datapath: str, executor: Any = None, **kw: Any) -> QueueRunner:
    if datapath == "native":
        if not native.available:
            pytest.fail(f"VNVMED_NATIVE_REQUIRED=1 but the native data path is {native.why_not}")
        return native.NativeQueueRunner(executor=executor, **kw)
    return QueueRunner(**kw)
