"""The client's interrupt eventfds (vfio-user SET_IRQS) -> one vector routing table.

QEMU hands over one eventfd per MSI-X vector (usually a KVM irqfd), plus an INTx
trigger (and resample) eventfd.  Workers only need "vector v -> write this fd":
MSI-X eventfds win; without them, every vector routes to INTx unless the guest
disabled INTx in the PCI command register or the client masked it; otherwise nothing
fires (clients that poll completions).  Pure bookkeeping plus fd ownership: every fd
handed in is owned here and closed when replaced or cleared.
"""
from __future__ import annotations

import os
from typing import Callable

from vfio_user.wire import Irq, IrqSetFlag

ACTIONS = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class IrqRouter:
    def __init__(self, vectors: int, intx_disabled: Callable[[], bool]) -> None:
        self.vectors = vectors
        self._intx_disabled = intx_disabled
        self.msix: dict[int, int] = {}
        self.intx: int | None = None
        self.intx_unmask: int | None = None     # resample eventfd: kept, not needed (edge kicks)
        self.other: dict[int, int] = {}         # MSI (count 0), ERR, REQ: kept, unused
        self.intx_masked = False
        self.routes: dict[int, int] = {}

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        """Apply one validated SET_IRQS; takes ownership of `fds`."""
        action = flags & ACTIONS
        if index == Irq.MSIX and action == IrqSetFlag.ACTION_TRIGGER:
            if flags & IrqSetFlag.DATA_NONE and count == 0:
                self._clear(self.msix)
            elif flags & IrqSetFlag.DATA_EVENTFD:
                # No fds with count > 0: de-assign (QEMU's "MSI-X on, no vector yet").
                for i in range(count):
                    _close(self.msix.pop(start + i, None))
                    if fds and fds[i] >= 0:
                        self.msix[start + i] = fds[i]
            else:                                   # DATA_NONE / DATA_BOOL: fire now
                for i in range(count):
                    if flags & IrqSetFlag.DATA_BOOL and not (i < len(data) and data[i]):
                        continue
                    fd = self.msix.get(start + i)
                    if fd is not None:
                        os.eventfd_write(fd, 1)
        elif index == Irq.INTX:
            if action == IrqSetFlag.ACTION_TRIGGER:
                if flags & IrqSetFlag.DATA_EVENTFD:
                    self.intx = self._swap(self.intx, fds[0] if fds else None)
                elif flags & IrqSetFlag.DATA_NONE and count == 0:
                    self.intx = self._swap(self.intx, None)
                    self.intx_unmask = self._swap(self.intx_unmask, None)
            elif action == IrqSetFlag.ACTION_UNMASK:
                if flags & IrqSetFlag.DATA_EVENTFD:
                    self.intx_unmask = self._swap(self.intx_unmask, fds[0] if fds else None)
                else:
                    self.intx_masked = False
            elif action == IrqSetFlag.ACTION_MASK and not flags & IrqSetFlag.DATA_EVENTFD:
                self.intx_masked = True
        else:
            for i, fd in enumerate(fds):
                key = (index << 16) + start + i
                _close(self.other.pop(key, None))
                self.other[key] = fd

    @staticmethod
    def _swap(old: int | None, new: int | None) -> int | None:
        if old is not None and old != new:
            _close(old)
        return new

    @staticmethod
    def _clear(table: dict[int, int]) -> None:
        for fd in table.values():
            _close(fd)
        table.clear()

    def refresh(self) -> bool:
        """Recompute the routing table; True if it changed (workers need the new one)."""
        if self.msix:
            routes = dict(self.msix)
        elif self.intx is not None and not self._intx_disabled() and not self.intx_masked:
            routes = {v: self.intx for v in range(self.vectors)}
        else:
            routes = {}
        if routes == self.routes:
            return False
        self.routes = routes
        return True

    def message(self) -> tuple[dict, list[int]]:
        """The `irqs` message for a worker and the fds it references (by index)."""
        fds = sorted(set(self.routes.values()))
        index = {fd: i for i, fd in enumerate(fds)}
        return {"op": "irqs", "vec": [[v, index[fd]] for v, fd in sorted(self.routes.items())]}, fds

    def fire(self, vector: int) -> None:
        fd = self.routes.get(vector)
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def clear(self) -> None:
        """Client gone: close every eventfd it gave us."""
        self._clear(self.msix)
        self._clear(self.other)
        self.intx = self._swap(self.intx, None)
        self.intx_unmask = self._swap(self.intx_unmask, None)
        self.intx_masked = False
