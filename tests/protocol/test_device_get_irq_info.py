"""DEVICE_GET_IRQ_INFO (7)."""
import errno

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import IrqInfoMsg
from vfio_user.wire import Command, Irq, IrqInfoFlag


def test_irq_info(client):
    m = client.get_irq_info(Irq.MSIX)
    assert m.index == Irq.MSIX and m.count == 16 and m.flags & IrqInfoFlag.EVENTFD
    assert client.get_irq_info(Irq.ERR).count == 1
    assert client.get_irq_info(Irq.MSI).count == 0


def test_index_out_of_range(client):
    with pytest.raises(ProtocolError) as e:
        client.get_irq_info(5)
    assert e.value.errno == errno.EINVAL


def test_argsz_too_small(client):
    with pytest.raises(ProtocolError) as e:
        client.request(Command.DEVICE_GET_IRQ_INFO, IrqInfoMsg(4, 0, 2).encode())
    assert e.value.errno == errno.EINVAL
