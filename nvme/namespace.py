"""A namespace: NamespaceInfo (plain, snapshot-able) + an open backend + LBA math."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CommandError
from .state import NamespaceInfo
from .status import Status

if TYPE_CHECKING:  # nvme stays import-free of other packages at runtime
    from backends.base import Backend


class Namespace:
    __slots__ = ("info", "backend", "nsid", "block_size", "blocks", "lba_shift", "read_only")

    def __init__(self, info: NamespaceInfo, backend: "Backend") -> None:
        bs = info.block_size
        if bs < 512 or bs & (bs - 1):
            raise ValueError(f"block size {bs} is not a power of two >= 512")
        if info.blocks <= 0 or info.blocks * bs > backend.size:
            raise ValueError(f"namespace {info.nsid}: {info.blocks} blocks of {bs} do not fit "
                             f"a {backend.size}-byte backend")
        self.info = info
        self.backend = backend
        self.nsid = info.nsid
        self.block_size = bs
        self.blocks = info.blocks
        self.lba_shift = info.lba_shift
        self.read_only = info.read_only or backend.read_only

    @classmethod
    def for_backend(cls, nsid: int, backend: "Backend", block_size: int = 512,
                    read_only: bool = False) -> "Namespace":
        info = NamespaceInfo(nsid=nsid, block_size=block_size, blocks=backend.size // block_size,
                             read_only=read_only, backend=backend.spec())
        return cls(info, backend)

    def byte_range(self, slba: int, nlb: int) -> tuple[int, int]:
        """(offset, length) of nlb blocks at slba; LBA_OUT_OF_RANGE on Python ints (no wrap)."""
        if slba < 0 or nlb < 0 or slba + nlb > self.blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} beyond {self.blocks}")
        return slba << self.lba_shift, nlb << self.lba_shift
