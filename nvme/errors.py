"""Exceptions that carry an NVMe answer.

`CommandError(status)` is raised by helpers deep inside a command (PRP/SGL walking,
LBA range checks, field validation) and caught once by the executor that owns the
command, which turns it into the CQE status.  It is shared by the admin and the
I/O command sets so the helpers do not care who called them.

`NeedsMessageDma` (nvme.memory) is deliberately NOT a CommandError: it means "this
command touches memory only reachable through vfio-user DMA messages"; the caller
may retry the whole command on the front-end's slow path, so it must propagate.
"""
from __future__ import annotations


class CommandError(Exception):
    """A command failed with an NVMe status ((SCT << 8) | SC, see nvme.status)."""

    __slots__ = ("status", "dnr")

    def __init__(self, status: int, detail: str = "", dnr: bool = True) -> None:
        super().__init__(f"status {int(status):#05x}" + (f": {detail}" if detail else ""))
        self.status = int(status)
        self.dnr = dnr
