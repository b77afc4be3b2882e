"""DEVICE_SET_IRQS (8): eventfds over SCM_RIGHTS, chunking, disable, errors."""
import errno
import os

import pytest

from vfio_user.client import eventfd
from vfio_user.errors import ProtocolError
from vfio_user.messages import SetIrqs
from vfio_user.wire import Command, Irq, IrqSetFlag as F

EV_T = F.DATA_EVENTFD | F.ACTION_TRIGGER


def _irqs(device):
    return [e for e in device.events if e[0] == "irqs"]


def test_eventfd_reaches_device_and_fires(client, device, server):
    efd = eventfd()
    try:
        client.set_irqs(Irq.MSIX, EV_T, 3, 1, [efd])
        server.call(lambda: device.trigger(Irq.MSIX, 3))
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


def test_chunked_by_server_max_fds(client, device):
    fds = [eventfd() for _ in range(16)]
    try:
        client.server_max_fds = 5       # as if the server had said 5: 4 messages
        client.set_irqs(Irq.MSIX, EV_T, 0, 16, fds)
        assert [(e[3], e[4], e[5]) for e in _irqs(device)] == [(0, 5, 5), (5, 5, 5),
                                                                (10, 5, 5), (15, 1, 1)]
        assert len(device.irq_fds) == 16
    finally:
        for fd in fds:
            os.close(fd)


def test_qemu_msix_enable_without_vectors_and_disable(client, device):
    client.set_irqs(Irq.MSIX, EV_T, 0, 1)      # fd "-1": no fd attached
    client.set_irqs(Irq.MSIX, F.DATA_NONE | F.ACTION_TRIGGER, 0, 0)
    assert [e[4:6] for e in _irqs(device)] == [(1, 0), (0, 0)]


def test_bool_mask(client, device):
    client.set_irqs(Irq.MSIX, F.DATA_BOOL | F.ACTION_MASK, 0, 2, data=b"\1\0")
    assert _irqs(device)[-1][6] == b"\1\0"


@pytest.mark.parametrize("flags,index,start,count,nfds", [
    (F.DATA_EVENTFD | F.DATA_NONE | F.ACTION_TRIGGER, Irq.MSIX, 0, 1, 1),
    (EV_T, Irq.MSIX, 15, 2, 2),            # beyond the vector count
    (EV_T, Irq.MSIX, 0, 2, 1),             # fd count != count
    (F.DATA_NONE | F.ACTION_TRIGGER, Irq.MSIX, 0, 1, 1),   # fds without DATA_EVENTFD
    (EV_T, 7, 0, 1, 1),                    # no such index
    (F.DATA_NONE | F.ACTION_MASK, Irq.ERR, 0, 1, 0),
])
def test_refused_and_fds_not_leaked(client, device, flags, index, start, count, nfds):
    fds = [eventfd() for _ in range(nfds)]
    try:
        with pytest.raises(ProtocolError) as e:
            client.request(Command.DEVICE_SET_IRQS,
                           SetIrqs(20, flags, index, start, count).encode(), fds)
        assert e.value.errno == errno.EINVAL
        assert not _irqs(device) and not device.irq_fds
    finally:
        for fd in fds:
            os.close(fd)


def test_more_fds_than_negotiated(client, device):
    fds = [eventfd() for _ in range(17)]
    try:
        with pytest.raises(ProtocolError) as e:
            client.request(Command.DEVICE_SET_IRQS, SetIrqs(20, EV_T, Irq.MSIX, 0, 16).encode(),
                           fds)
        assert e.value.errno == errno.EINVAL
        assert not device.irq_fds
    finally:
        for fd in fds:
            os.close(fd)
