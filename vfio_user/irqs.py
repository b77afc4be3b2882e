"""DEVICE_SET_IRQS validation (spec "VFIO_USER_DEVICE_SET_IRQS", lvu lib/irq.c).

Pure: given the decoded request, the number of fds that came with it and the
index's vector count, refuse what the spec does not allow.  The device only ever
sees validated requests.
"""
from __future__ import annotations

import errno

from .errors import ProtocolError
from .messages import SetIrqs
from .wire import IRQ_ACTION_MASK, IRQ_DATA_MASK, Irq, IrqSetFlag

_KNOWN = int(IRQ_DATA_MASK | IRQ_ACTION_MASK)


def _one_bit(v: int) -> bool:
    return v != 0 and v & (v - 1) == 0


def validate_set_irqs(msg: SetIrqs, nfds: int, vectors: int) -> None:
    """Raise ProtocolError(EINVAL) unless `msg` is a legal request for an index
    with `vectors` vectors carrying `nfds` eventfds."""
    flags = msg.flags
    if flags & ~_KNOWN:
        raise ProtocolError(errno.EINVAL, f"SET_IRQS unknown flags {flags:#x}")
    data, action = flags & IRQ_DATA_MASK, flags & IRQ_ACTION_MASK
    if not _one_bit(data) or not _one_bit(action):
        raise ProtocolError(errno.EINVAL, "SET_IRQS needs exactly one DATA and one ACTION")
    if msg.index in (Irq.ERR, Irq.REQ):
        if action != IrqSetFlag.ACTION_TRIGGER or msg.count > 1:
            raise ProtocolError(errno.EINVAL, "ERR/REQ allow only TRIGGER with count <= 1")
    if msg.count == 0:
        # Only "disable everything": DATA_NONE + TRIGGER, start 0, count 0.
        if not (data == IrqSetFlag.DATA_NONE and action == IrqSetFlag.ACTION_TRIGGER
                and msg.start == 0):
            raise ProtocolError(errno.EINVAL, "SET_IRQS count 0 only to disable an index")
    elif msg.start + msg.count > vectors:   # Python ints: no wrap
        raise ProtocolError(errno.EINVAL,
                            f"SET_IRQS [{msg.start}, +{msg.count}) beyond {vectors} vectors")
    if data == IrqSetFlag.DATA_EVENTFD:
        # No fds means de-assign (QEMU sends "-1" chunks that way).
        if nfds not in (0, msg.count):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS {nfds} fds for count {msg.count}")
    elif nfds:
        raise ProtocolError(errno.EINVAL, "SET_IRQS fds without DATA_EVENTFD")
    if data == IrqSetFlag.DATA_BOOL and len(msg.data) != msg.count:
        raise ProtocolError(errno.EINVAL, "SET_IRQS bool data length != count")
