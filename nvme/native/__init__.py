"""The native data path: a C loop (fastpath.c) for the common commands, Python for the rest.

    from nvme.native import available, why_not, NativeQueueRunner

`available` is True when the extension (nvme/native/_fastpath*.so, built by
`python -m nvme.native.build`, which scripts/setup runs) imports and was built from
the fastpath.c/fastpath.h next to it; otherwise `why_not` says why in one line and
workers run the Python data path (nvme.qpair.QueueRunner), which stays the reference.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("fastpath.h", "fastpath.c", "uring.h", "uring.c")


def source_id() -> str:
    """Hash of the C sources: a build of other sources is not used (stale build)."""
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _load() -> tuple[Any, Any, str | None]:
    try:
        from . import _fastpath  # type: ignore[attr-defined]
    except ImportError as e:
        return None, None, f"not built ({e}); build it with: python -m nvme.native.build"
    built = _fastpath.ffi.string(_fastpath.lib.vn_source_id()).decode()
    if built != source_id():
        return None, None, "built from other sources (stale); rebuild: python -m nvme.native.build"
    return _fastpath.ffi, _fastpath.lib, None


ffi, lib, why_not = _load()
available = lib is not None

from .runner import NativeQueueRunner  # noqa: E402  (needs ffi/lib above)

__all__ = ["available", "why_not", "ffi", "lib", "NativeQueueRunner", "source_id"]
