"""A decoded admin SQE and the data-transfer helpers admin handlers share.

The SQE lives in guest memory the host may rewrite at any time, so it is copied
into plain ints once (`AdminCmd.decode`) and never read again.  Admin commands
move data with PRPs only (PSDT must be 0, NVMe Base 1.4 4.2: SGLs are for I/O);
the walking itself is nvme.prp's.
"""
from __future__ import annotations

from dataclasses import dataclass

from nvme.errors import CommandError
from nvme.memory import GuestMemory, NeedsMessageDma
from nvme.prp import map_prp
from nvme.status import Status


@dataclass(slots=True, frozen=True)
class AdminCmd:
    opcode: int
    fuse: int
    psdt: int
    cid: int
    nsid: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, sqe: memoryview) -> "AdminCmd":
        dw = sqe.cast("B").cast("I") if sqe.format != "I" else sqe
        d0 = dw[0]
        return cls(opcode=d0 & 0xFF, fuse=(d0 >> 8) & 3, psdt=(d0 >> 14) & 3, cid=d0 >> 16,
                   nsid=dw[1], prp1=dw[6] | (dw[7] << 32), prp2=dw[8] | (dw[9] << 32),
                   cdw10=dw[10], cdw11=dw[11], cdw12=dw[12], cdw13=dw[13], cdw14=dw[14],
                   cdw15=dw[15])


def to_host(mem: GuestMemory, cmd: AdminCmd, data: bytes | bytearray) -> None:
    """Copy controller-to-host data into the command's PRPs."""
    try:
        views = map_prp(mem, cmd.prp1, cmd.prp2, len(data), to_guest=True)
    except NeedsMessageDma:
        # fd-less memory would need the front-end's DMA-message slow path; admin buffers
        # live in guest RAM in practice, so this is reported rather than retried.
        raise CommandError(Status.DATA_TRANSFER_ERROR, "admin buffer needs message DMA") from None
    pos = 0
    for v in views:
        n = len(v)
        v[:] = data[pos:pos + n]
        pos += n


def from_host(mem: GuestMemory, cmd: AdminCmd, length: int) -> bytes:
    """Read host-to-controller data from the command's PRPs."""
    try:
        views = map_prp(mem, cmd.prp1, cmd.prp2, length, to_guest=False)
    except NeedsMessageDma:
        raise CommandError(Status.DATA_TRANSFER_ERROR, "admin buffer needs message DMA") from None
    return b"".join(bytes(v) for v in views)
