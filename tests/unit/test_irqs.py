"""SET_IRQS validation."""
import pytest

from vfio_user.errors import ProtocolError
from vfio_user.irqs import validate_set_irqs
from vfio_user.messages import SetIrqs
from vfio_user.wire import Irq, IrqSetFlag as F

T, EV, NONE, BOOL = F.ACTION_TRIGGER, F.DATA_EVENTFD, F.DATA_NONE, F.DATA_BOOL


def ok(flags, index, start, count, nfds=0, vectors=8, data=b""):
    validate_set_irqs(SetIrqs(20, flags, index, start, count, data), nfds, vectors)


def bad(*a, **k):
    with pytest.raises(ProtocolError):
        ok(*a, **k)


def test_accepted():
    ok(EV | T, Irq.MSIX, 0, 1, 1)
    ok(EV | T, Irq.MSIX, 0, 1, 0)          # QEMU's "MSI-X on, no vectors"
    ok(EV | T, Irq.MSIX, 2, 6, 6)
    ok(NONE | T, Irq.MSIX, 0, 0)           # disable the index
    ok(NONE | F.ACTION_MASK, Irq.MSIX, 3, 1)
    ok(BOOL | F.ACTION_UNMASK, Irq.MSIX, 0, 2, data=b"\1\0")
    ok(EV | T, Irq.ERR, 0, 1, 1, vectors=1)


def test_refused():
    bad(EV | NONE | T, Irq.MSIX, 0, 1, 1)
    bad(EV | T | F.ACTION_MASK, Irq.MSIX, 0, 1, 1)
    bad(EV, Irq.MSIX, 0, 1, 1)
    bad(0x40 | EV | T, Irq.MSIX, 0, 1, 1)
    bad(EV | T, Irq.MSIX, 7, 2, 2)
    bad(EV | T, Irq.MSIX, 0xFFFFFFFF, 2, 2)
    bad(EV | T, Irq.MSIX, 0, 2, 1)
    bad(EV | T, Irq.MSIX, 0, 0)
    bad(NONE | T, Irq.MSIX, 0, 1, 1)        # fds without DATA_EVENTFD
    bad(NONE | F.ACTION_MASK, Irq.ERR, 0, 1, vectors=1)
    bad(EV | T, Irq.ERR, 0, 2, 2, vectors=4)
    bad(NONE | T, Irq.MSIX, 1, 0)
