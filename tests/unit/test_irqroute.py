"""IRQ routing table: MSI-X over INTx, masking/disable, fd ownership."""
import os

from reactor.irqroute import IrqRouter
from vfio_user.wire import Irq, IrqSetFlag as F

TRIG_FD = F.DATA_EVENTFD | F.ACTION_TRIGGER


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_msix_wins_over_intx_and_intx_obeys_command_register():
    disabled = [False]
    r = IrqRouter(4, lambda: disabled[0])
    intx = os.eventfd(0)
    r.set_irqs(Irq.INTX, TRIG_FD, 0, 1, [intx], b"")
    assert r.refresh() and r.routes == {v: intx for v in range(4)}
    disabled[0] = True
    assert r.refresh() and r.routes == {}
    disabled[0] = False
    r.refresh()
    m = [os.eventfd(0), os.eventfd(0)]
    r.set_irqs(Irq.MSIX, TRIG_FD, 0, 2, m, b"")
    assert r.refresh() and r.routes == {0: m[0], 1: m[1]}
    msg, fds = r.message()
    assert fds == sorted(m) and len(msg["vec"]) == 2
    r.set_irqs(Irq.MSIX, TRIG_FD, 1, 1, [], b"")          # de-assign vector 1 (no fds)
    assert not is_open(m[1]) and r.refresh() and r.routes == {0: m[0]}
    r.set_irqs(Irq.MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0, [], b"")   # disable all
    assert not is_open(m[0]) and r.refresh() and set(r.routes.values()) == {intx}


def test_intx_mask_unmask_and_clear_closes_everything():
    r = IrqRouter(2, lambda: False)
    intx, err = os.eventfd(0), os.eventfd(0)
    r.set_irqs(Irq.INTX, TRIG_FD, 0, 1, [intx], b"")
    r.set_irqs(Irq.ERR, TRIG_FD, 0, 1, [err], b"")
    r.set_irqs(Irq.INTX, F.DATA_NONE | F.ACTION_MASK, 0, 1, [], b"")
    r.refresh()
    assert r.routes == {}
    r.set_irqs(Irq.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1, [], b"")
    r.refresh()
    r.fire(1)
    assert os.eventfd_read(intx) == 1
    r.clear()
    assert not is_open(intx) and not is_open(err)
    assert r.refresh() and r.routes == {}
