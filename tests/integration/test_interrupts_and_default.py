"""INTx routing when MSI-X is off, and the embedded default controller (CLI contract)."""
from __future__ import annotations

import os
import struct

import pytest

from tests.integration.conftest import Host
from vfio_user.wire import Irq, IrqSetFlag

TRIGGER_EVENTFD = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER


def _efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_intx_fires_without_msix_and_stops_once_msix_is_on(host):
    h = host
    h.enable()
    intx = _efd()
    try:
        h.c.set_irqs(Irq.INTX, TRIGGER_EVENTFD, 0, 1, [intx])
        h.create_io_queue(1, 16, iv=1, ien=True)
        buf = h.ram.alloc(4096)
        h.wait_eventfd(intx, 0.2)                    # drain admin-queue interrupts
        assert h.rw(1, True, 1, 0, 8, buf) == 0
        assert h.wait_eventfd(intx, 5.0) >= 1, "no INTx for an I/O completion"
        # MSI-X enabled: vector 1 gets the interrupts, INTx stays quiet
        msix = h.setup_msix(2)
        h.wait_eventfd(intx, 0.2)
        assert h.rw(1, False, 1, 0, 8, buf) == 0
        assert h.wait_eventfd(msix[1], 5.0) >= 1
        assert h.wait_eventfd(intx, 0.3) == 0
        # INTx disabled by the client (count 0): nothing anywhere once MSI-X goes too
        h.c.set_irqs(Irq.MSIX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        h.c.set_irqs(Irq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        assert h.rw(1, True, 1, 8, 8, buf) == 0
        assert h.wait_eventfd(intx, 0.3) == 0
    finally:
        os.close(intx)


@pytest.mark.daemon_args(["--cores", "0"])
def test_embedded_default_is_nvme0_with_1gib_ram(daemon):
    sock = os.path.join(daemon.run_dir, "nvme0.sock")
    assert os.path.exists(sock) and oct(os.stat(sock).st_mode & 0o777) == "0o600"
    h = Host(sock)
    try:
        n = h.nvme
        n.enable()
        ctrl = n.identify(1)
        assert struct.unpack_from("<I", ctrl, 516)[0] >= 1           # NN
        ns = n.identify(0, 1)
        nsze = struct.unpack_from("<Q", ns, 0)[0]
        lbaf = ns[128 + 4 * (ns[26] & 0xF) + 2]                        # LBADS of the format in use
        assert nsze << lbaf == 1 << 30
    finally:
        h.close()
