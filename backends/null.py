"""The null backend: any size, reads return zeroes, writes are dropped (benchmarks)."""
from __future__ import annotations

from typing import Any, Sequence

_ZERO = memoryview(bytes(1 << 20))


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

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        zero_fill(bufs)

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
