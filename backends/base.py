"""The block backend Protocol, size parsing, and the two ways to get a backend.

A backend is a flat byte store of `size` bytes.  Data moves straight between it
and caller-supplied memoryviews (slices of guest memory), so the I/O path makes no
extra copy.  Backends are per process: the creator (`create_backend`) makes the
shared resource (e.g. a POSIX shm object) and describes it with `spec()`, a small
msgpack-able dict; any other process (a worker) reattaches with `open_backend(spec)`.
Only the creator's `destroy()` removes shared resources; `close()` drops only this
process's handle.

Backend errors are OSError (EIO and friends); the I/O executor maps them to media
status codes.
"""
from __future__ import annotations

import re
from typing import Any, Protocol, Sequence, runtime_checkable

MIN_SIZE = 512  # one block of the smallest LBA format

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


@runtime_checkable
class Backend(Protocol):
    size: int
    read_only: bool

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None: ...
    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None: ...
    def flush(self) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def spec(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def destroy(self) -> None: ...


def parse_size(text: str | int) -> int:
    """'64M' -> 67108864; '4096' -> 4096; binary units K/M/G/T (optional 'B'/'iB')."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 64M")
    n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def check_range(b: Backend, offset: int, length: int) -> None:
    """Our own bug guard: callers (Namespace) already range-check on Python ints."""
    if offset < 0 or length < 0 or offset + length > b.size:
        raise ValueError(f"backend range {offset}+{length} outside 0..{b.size}")


def total_len(bufs: Sequence[memoryview]) -> int:
    return sum(len(b) for b in bufs)


def create_backend(kind: str, arg: str, *, name_prefix: str, read_only: bool = False,
                   direct: bool = False, size: int | None = None, depth: int | None = None) -> Backend:
    """Creator side: 'ram'/'null' (arg = size), 'file' (arg = path), 'nbd' (arg = URI),
    'rbd' (arg = POOL/IMAGE[?...]).  nbd/rbd connect once to check (ValueError, one line).
    `depth` (async backends) travels in the spec to the workers."""
    b = _create(kind, arg, name_prefix=name_prefix, read_only=read_only, direct=direct, size=size)
    if depth is not None:
        b.depth = depth  # type: ignore[attr-defined]
    return b


def _create(kind: str, arg: str, *, name_prefix: str, read_only: bool, direct: bool,
            size: int | None) -> Backend:
    if kind in ("nbd", "rbd"):
        from .registry import unavailable
        why = unavailable(kind)
        if why:
            raise ValueError(f"{kind}: backend unavailable: {why}")
    if kind == "nbd":
        from .nbd import NbdBackend
        return NbdBackend.create(arg, size, read_only)
    if kind == "rbd":
        from .rbd import RbdBackend
        return RbdBackend.create(arg, size, read_only)
    if kind == "ram":
        from .ram import RamBackend
        return RamBackend.create(parse_size(arg), name_prefix=name_prefix, read_only=read_only)
    if kind == "null":
        from .null import NullBackend
        return NullBackend(parse_size(arg), read_only=read_only)
    if kind == "file":
        from .file import FileBackend
        return FileBackend(arg, read_only=read_only, direct=direct)
    raise ValueError(f"unknown backend kind {kind!r}: use ram:SIZE, null:SIZE, file:PATH, nbd:URI or rbd:POOL/IMAGE")


def open_backend(spec: dict[str, Any]) -> Backend:
    """Attach to a backend described by another process's `spec()` (never unlinks)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ValueError(f"bad backend spec {spec!r}: needs a 'kind'")
    kind = spec["kind"]
    ro = bool(spec.get("read_only", False))
    try:
        if kind == "ram":
            from .ram import RamBackend
            return RamBackend.attach(str(spec["shm"]), int(spec["size"]), read_only=ro)
        if kind == "null":
            from .null import NullBackend
            return NullBackend(int(spec["size"]), read_only=ro)
        if kind == "file":
            from .file import FileBackend
            b: Any = FileBackend(str(spec["path"]), read_only=ro, direct=bool(spec.get("direct", False)))
        elif kind == "nbd":
            from .nbd import NbdBackend
            b = NbdBackend.attach(spec)
        elif kind == "rbd":
            from .rbd import RbdBackend
            b = RbdBackend.attach(spec)
        else:
            raise ValueError(f"unknown backend kind {kind!r}")
        if spec.get("depth") is not None:
            b.depth = int(spec["depth"])
        return b
    except KeyError as e:
        raise ValueError(f"backend spec {spec!r} lacks {e}") from None
    raise ValueError(f"unknown backend kind {kind!r}")
