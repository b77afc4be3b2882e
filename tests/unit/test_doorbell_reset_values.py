"""Doorbells read as their reset value (0) at every enable (found from outside, issue 12).

A host may write admin doorbells while CC.EN=0 or after a reset (Linux polls and rings
the admin queue around a disable, a crash kernel inherits a half-used controller).  The
controller must not take those values at the next enable: an SQ tail would make it fetch
a lap of SQEs the host never submitted, a CQ head would mark the admin CQ broken.
"""
from __future__ import annotations

import pytest

from nvme.regs import Reg
from nvme.status import Status
from tests.unit.test_controller_harness import ACQ, MEM_BASE, Host


def _stale_doorbells(h: Host, how: str) -> None:
    if how == "disable":
        h.disable()
    else:
        h.ctrl.reset()
    assert not h.ctrl.ready
    h.db[0] = 5          # admin SQ tail written while disabled
    h.db[1] = 3          # admin CQ head written while disabled
    h.db[2] = 7          # and an I/O SQ tail / CQ head (queue 1 does not exist yet)
    h.db[3] = 2


@pytest.mark.parametrize("how", ["disable", "reset"])
def test_doorbells_written_while_disabled_do_not_survive_enable(how: str) -> None:
    h = Host()
    h.enable()
    h.ok(0x18)                                  # keep alive: the admin queue works
    _stale_doorbells(h, how)
    h.enable()
    assert h.ctrl.ready
    assert [h.db[i] for i in range(4)] == [0, 0, 0, 0]
    h.ctrl.poll_admin()
    assert h.read(ACQ, 16 * h.acqs) == bytes(16 * h.acqs), "phantom completions after enable"
    c = h.ok(0x18)                              # the first real command completes
    assert c.sqhd == 1 and c.status == Status.SUCCESS
    assert not any(call[0] == "fatal" for call in h.hooks.calls)
    assert h.ctrl.errlog.count == 0, "zero-filled SQEs were executed"


def test_shadow_pages_are_not_read_after_reenable() -> None:
    """Shadow doorbells set up before a disable are gone after the next enable."""
    h = Host()
    h.enable()
    dbbuf, ei = MEM_BASE + 0x20000, MEM_BASE + 0x21000
    h.ok(0x7C, prp1=dbbuf, prp2=ei)
    assert h.ctrl.shadow.enabled
    h.disable()
    h.enable()
    assert not h.ctrl.shadow.enabled
    assert h.reg(Reg.CSTS) & 1
