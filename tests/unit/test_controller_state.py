"""Enable / disable / shutdown / NSSR through register writes."""
import pytest

from nvme.config import ControllerConfig
from nvme.cstate import CState
from nvme.regs import Reg, RegisterAccessError
from tests.unit.test_controller_harness import ASQ, CC_IO, MEM_BASE, Host, ready_host


def csts(h):
    return h.reg(Reg.CSTS)


@pytest.mark.parametrize("setup", [
    lambda h: h.enable(cc=CC_IO | 1 | (1 << 7)),         # MPS 8 KiB
    lambda h: h.enable(cc=CC_IO | 1 | (1 << 4)),         # CSS not NVM
    lambda h: h.enable(cc=CC_IO | 1 | (1 << 11)),        # AMS WRR
    lambda h: h.enable(asqs=1),                          # AQA too small
    lambda h: (h.ctrl.write_register(Reg.AQA, 4, 0x000F000F), h.ctrl.write_register(Reg.ASQ, 8, ASQ + 8),
               h.ctrl.write_register(Reg.ACQ, 8, ASQ + 0x1000), h.ctrl.write_register(Reg.CC, 4, CC_IO | 1)),
    lambda h: (h.ctrl.write_register(Reg.AQA, 4, 0x000F000F), h.ctrl.write_register(Reg.ASQ, 8, 0x10000000),
               h.ctrl.write_register(Reg.ACQ, 8, MEM_BASE), h.ctrl.write_register(Reg.CC, 4, CC_IO | 1)),
])
def test_bad_enable_sets_cfs_and_disable_recovers(setup):
    h = Host()
    setup(h)
    assert csts(h) & 0b11 == 0b10          # CFS=1, RDY=0
    assert h.ctrl.fatal and h.hooks.calls[-1][0] == "fatal"
    assert h.ctrl.poll_admin() == 0
    h.disable()
    assert csts(h) == 0 and h.ctrl.state is CState.DISABLED
    h.enable()
    assert csts(h) == 1


def test_disable_deletes_io_queues_zeroes_doorbells_and_clears_rdy():
    h = ready_host()
    h.ok(0x09, cdw=(0x07, 0x00030003))                  # 4 SQs / 4 CQs
    h.create_cq(1); h.create_cq(2); h.create_sq(1, 1); h.create_sq(2, 2)
    h.db[2] = 5
    h.hooks.calls.clear()
    assert h.ctrl.cc_write_tears_down(CC_IO)
    h.disable()
    assert h.hooks.calls == [("sq-", 1), ("sq-", 2), ("cq-", 1), ("cq-", 2)]
    assert csts(h) & 1 == 0 and not h.ctrl.queues.sqs and h.db[2] == 0 and h.db[0] == 0
    # re-enable: the queues are gone, the allocation can be set again
    h.enable()
    assert h.ok(0x09, cdw=(0x07, 0x00070007)).dw0 == 0x00070007
    assert h.create_sq(1, 1).status == 0x100              # CQ 1 no longer exists


def test_cc_write_tears_down_predicate():
    h = Host()
    assert not h.ctrl.cc_write_tears_down(CC_IO | 1)
    h.enable()
    assert not h.ctrl.cc_write_tears_down(CC_IO | 1)
    assert h.ctrl.cc_write_tears_down(CC_IO | 1 | (1 << 14))
    assert h.ctrl.register_write_tears_down(Reg.NSSR, 4, 0x4E564D65)
    assert not h.ctrl.register_write_tears_down(Reg.NSSR, 4, 1)


@pytest.mark.parametrize("shn", [1, 2])
def test_shutdown_completes_flushes_and_stops_admin(shn):
    h = ready_host()
    h.create_cq(1)
    h.hooks.calls.clear()
    h.ctrl.write_register(Reg.CC, 4, CC_IO | 1 | (shn << 14))
    assert csts(h) == 1 | (2 << 2)                          # RDY still 1, SHST=10b
    assert h.hooks.calls == [("cq-", 1)]
    assert all(ns.flushes == 1 for ns in h.ns.values())
    h.submit(0x18)
    assert h.ctrl.poll_admin() == 0
    h.disable()
    assert csts(h) == 0
    h.enable()
    assert csts(h) == 1 and h.ok(0x18)


def test_reserved_shn_ignored():
    h = ready_host()
    h.ctrl.write_register(Reg.CC, 4, CC_IO | 1 | (3 << 14))
    assert csts(h) == 1


def test_nssr_resets_and_sets_nssro_rw1c():
    h = ready_host()
    h.create_cq(1)
    h.ctrl.write_register(Reg.NSSR, 4, 0x1234)               # wrong magic: nothing
    assert csts(h) == 1
    h.ctrl.write_register(Reg.NSSR, 4, 0x4E564D65)
    assert csts(h) == 0x10 and h.reg(Reg.CC) == 0 and h.reg(Reg.AQA) == 0
    assert ("cq-", 1) in h.hooks.calls
    h.ctrl.write_register(Reg.CSTS, 4, 0x10)
    assert csts(h) == 0


def test_nssr_ignored_when_unsupported():
    h = ready_host(cfg=ControllerConfig(nssr_supported=False))
    h.ctrl.write_register(Reg.NSSR, 4, 0x4E564D65)
    assert csts(h) == 1


def test_device_reset_and_fail():
    h = ready_host()
    h.ctrl.fail("quiesce timeout")
    assert csts(h) & 0b11 == 0b11 and h.hooks.calls[-1] == ("fatal", "quiesce timeout")
    h.ctrl.reset()
    assert csts(h) == 0 and h.ctrl.state is CState.DISABLED
    h.enable()
    assert h.ok(0x18)


def test_register_width_errors_propagate_from_controller():
    h = Host()
    with pytest.raises(RegisterAccessError):
        h.ctrl.write_register(Reg.CC, 2, 1)
    with pytest.raises(RegisterAccessError):
        h.ctrl.read_register(Reg.CSTS, 8)
    assert h.ctrl.read_register(Reg.ASQ + 4, 4) == 0
