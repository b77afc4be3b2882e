"""The null backend: any size, reads return zeroes, writes are dropped (benchmarks)."""
from __future__ import annotations

from typing import Any, Sequence

_ZERO = memoryview(bytes(1 << 20))
# Zero views of the common transfer lengths (page-sized pieces and whole I/Os).
_ZERO_BY_LEN = {n: _ZERO[:n] for n in [512 * k for k in range(1, 9)] + [1 << k for k in range(13, 21)]}


def zero_fill(bufs: Sequence[memoryview]) -> None:
    """Zero caller buffers without allocating per call."""
    for b in bufs:
        n = len(b)
        pos = 0
        while pos < n:
            step = min(n - pos, len(_ZERO))
            b[pos:pos + step] = _ZERO[:step]
            pos += step


class NullBackend:
    def __init__(self, size: int, read_only: bool = False) -> None:
        if size < 512:
            raise ValueError(f"null backend size {size} is smaller than one 512-byte block")
        self.size = size
        self.read_only = read_only

    native_kind = "null"       # the native data path zero-fills reads itself (nvme/native)

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        # Hot path of every null-backend benchmark: a cached zero view of exactly the
        # buffer's length makes this one memset-like copy with no slicing.
        for b in bufs:
            z = _ZERO_BY_LEN.get(len(b))
            if z is None:
                zero_fill((b,))
            else:
                b[:] = z

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def spec(self) -> dict[str, Any]:
        return {"kind": "null", "size": self.size, "read_only": self.read_only}

    def close(self) -> None:
        pass

    def destroy(self) -> None:
        pass
