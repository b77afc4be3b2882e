"""Which backend kinds this Python can serve, and why not (operators see this).

`bin/vnvmed --help` and `vnvmectl backends` print it; creating a namespace of an
unavailable kind fails with the same reason.  nbd and rbd need Debian's bindings
(python3-libnbd, python3-rados, python3-rbd), which only Debian's own Python sees:
scripts/setup makes a virtual environment with --system-site-packages for that.
"""
from __future__ import annotations

KINDS = ("ram", "null", "file", "nbd", "rbd")


def unavailable(kind: str) -> str | None:
    """None if `kind` works here, else the reason (one line)."""
    if kind == "nbd":
        from .nbd import unavailable as why
        return why()
    if kind == "rbd":
        from .rbd import unavailable as why
        return why()
    return None


def file_engine() -> str:
    from .uring import uring_unavailable
    why = uring_unavailable()
    return "io_uring" if why is None else f"thread pool ({why})"


def availability() -> dict[str, dict[str, object]]:
    """{kind: {"available": bool, "detail": str}} (msgpack/JSON-able, for the RPC)."""
    out: dict[str, dict[str, object]] = {}
    for kind in KINDS:
        why = unavailable(kind)
        detail = why or ("asynchronous: " + file_engine() if kind == "file" else
                         "asynchronous" if kind in ("nbd", "rbd") else "in memory")
        out[kind] = {"available": why is None, "detail": detail}
    return out


def availability_lines() -> list[str]:
    return [f"{kind:5} {'yes' if v['available'] else 'NO '}  {v['detail']}" for kind, v in availability().items()]
