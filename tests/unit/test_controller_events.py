"""Logs, features, AER queueing/masking/RAE, doorbell errors, snapshot/restore."""
import struct

import msgpack
import pytest

from nvme.status import Status
from tests.unit.test_controller_harness import DATA, Host, ready_host

AER = 0x0C
NS_NOTICE = 2 | (0 << 8) | (4 << 16)
DB_VALUE_ERR = 0 | (1 << 8) | (1 << 16)
DB_REG_ERR = 0 | (0 << 8) | (1 << 16)


def aer_done(h):
    return [c for c in h.cqes if c.dw0 and c.sqid == 0 and c.status == 0]


def test_aer_limit_and_queued_event_reported_on_arrival():
    h = ready_host()
    h.ok(0x09, cdw=(0x0B, 1 << 8))                 # enable NS attribute notices
    h.ctrl.namespaces_changed([2])                  # no AER outstanding: queued
    assert h.reap() == []
    cid = h.submit(AER)
    h.ctrl.poll_admin()
    got = h.reap()
    assert [(c.cid, c.dw0) for c in got] == [(cid, NS_NOTICE)]
    for _ in range(4):
        h.submit(AER)
    h.ctrl.poll_admin()
    assert h.reap() == []
    assert h.cmd(AER).status == Status.AER_LIMIT_EXCEEDED


def test_masked_until_log_read_without_rae():
    h = ready_host()
    h.ok(0x09, cdw=(0x0B, 1 << 8))
    a1, a2 = h.submit(AER), h.submit(AER)
    h.ctrl.poll_admin()
    h.ctrl.namespaces_changed([1])
    assert [c.cid for c in h.reap()] == [a1]
    h.ctrl.namespaces_changed([2])                  # masked: stays queued
    assert h.reap() == []
    c, page = h.get_log(0x04, 4096, rae=True)       # RAE=1: still masked, list kept
    assert struct.unpack_from("<3I", page) == (1, 2, 0)
    assert [x for x in h.reap() if x.cid == a2] == []
    c, page = h.get_log(0x04, 4096)                 # RAE=0: unmask -> a2 completes
    h.ctrl.poll_admin()
    h.reap()
    assert [x.dw0 for x in h.cqes if x.cid == a2] == [NS_NOTICE]
    _, page = h.get_log(0x04, 4096, rae=True)       # the RAE=0 read cleared the list
    assert struct.unpack_from("<I", page)[0] == 0


def test_notice_not_generated_when_disabled_by_config():
    h = ready_host()
    h.submit(AER)
    h.ctrl.poll_admin()
    h.ctrl.namespaces_changed([1])
    assert h.reap() == []
    assert struct.unpack_from("<I", h.get_log(0x04, 8)[1])[0] == 1


def test_disable_with_outstanding_aer_posts_nothing():
    h = ready_host()
    h.submit(AER)
    h.ctrl.poll_admin()
    h.disable()
    h.ctrl.doorbell_error(1, 1)
    assert h.reap() == []
    h.enable()
    cid = h.submit(AER)
    h.ctrl.poll_admin()
    assert h.reap() == []                            # event from the disabled era dropped
    h.ctrl.doorbell_error(1, 3)
    assert [(c.cid, c.dw0) for c in h.reap()] == [(cid, DB_VALUE_ERR)]


def test_invalid_doorbell_value_from_admin_runner_and_error_log():
    h = ready_host()
    cid = h.submit(AER)
    h.ctrl.poll_admin()
    h.db[0] = 100                                    # admin SQ tail beyond 16 entries
    h.ctrl.poll_admin()
    assert [(c.cid, c.dw0) for c in h.reap()] == [(cid, DB_VALUE_ERR)]
    h.db[0] = h.sq_tail                              # host repairs it
    c, page = h.get_log(0x01, 128)
    count, sqid, ecid = struct.unpack_from("<QHH", page)
    assert count >= 1 and sqid == 0 and ecid == 0xFFFF


def test_scan_doorbells_nonexistent_queue():
    h = ready_host()
    h.create_cq(1)
    h.db[1 * 2 + 1] = 3                             # CQ 1 exists: fine
    h.db[5 * 2] = 9                                  # SQ 5 does not exist
    cid = h.submit(AER)
    h.ctrl.poll_admin()
    h.ctrl.scan_doorbells()
    assert h.db[10] == 0 and h.db[3] == 3
    assert [(c.cid, c.dw0) for c in h.reap()] == [(cid, DB_REG_ERR)]
    _, page = h.get_log(0x01, 64)
    assert struct.unpack_from("<QH", page)[1] == 5


def test_smart_firmware_effects_and_log_errors():
    h = ready_host()
    h.ctrl.add_io_stats(bytes_read=512_001, bytes_written=512_000 * 3, reads=7, writes=9)
    c, p = h.get_log(0x02, 512)
    assert c.status == 0 and p[3] == 100
    assert int.from_bytes(p[32:48], "little") == 2 and int.from_bytes(p[48:64], "little") == 3
    assert int.from_bytes(p[64:80], "little") == 7 and int.from_bytes(p[80:96], "little") == 9
    assert h.get_log(0x02, 512, nsid=1)[0].status == Status.INVALID_FIELD
    _, p = h.get_log(0x03, 512)
    assert p[0] == 1 and p[8:11] == b"0.1"
    _, p = h.get_log(0x05, 4096)
    acs = struct.unpack_from("<256I", p)
    iocs = struct.unpack_from("<256I", p, 1024)
    assert acs[0x06] & 1 and acs[0x7C] & 1 and not acs[0x80]
    assert iocs[0x02] == 1 and iocs[0x01] == 3
    # partial read at an offset
    _, p2 = h.get_log(0x05, 8, offset=0x18)
    assert p2 == struct.pack("<2I", acs[6], acs[7])
    assert h.get_log(0x7F, 64)[0].status == Status.INVALID_LOG_PAGE
    assert h.get_log(0x05, 8, offset=2)[0].status == Status.INVALID_FIELD
    assert h.get_log(0x05, 8, offset=8192)[0].status == Status.INVALID_FIELD
    assert h.get_log(0x05, 256 * 1024)[0].status == Status.INVALID_FIELD   # > MDTS


def test_error_log_keeps_newest_entries():
    h = ready_host()
    for _ in range(70):
        h.ctrl.log_error(1, 5, Status.LBA_OUT_OF_RANGE, lba=9, nsid=1)
    _, p = h.get_log(0x01, 64 * 64)
    counts = [struct.unpack_from("<Q", p, 64 * i)[0] for i in range(64)]
    assert counts[0] == 70 and counts[-1] == 7


def test_features_get_set_sel_and_errors():
    h = ready_host()
    assert h.get_feature(0x06).dw0 == 1
    assert h.set_feature(0x06, 0).status == 0 and h.get_feature(0x06).dw0 == 0
    assert h.get_feature(0x06, sel=1).dw0 == 1                    # default
    assert h.get_feature(0x06, sel=2).dw0 == 1                    # saved = default
    assert h.get_feature(0x06, sel=3).dw0 == 0b100                # changeable
    assert h.get_feature(0x05, sel=3).dw0 == 0b110                # ns specific
    assert h.get_feature(0x06, sel=4).status == Status.INVALID_FIELD
    assert h.set_feature(0x06, 1, save=True).status == Status.FEATURE_NOT_SAVEABLE
    assert h.set_feature(0x06, 1, nsid=1).status == Status.FEATURE_NOT_NS_SPECIFIC
    assert h.set_feature(0x02, 1).status == Status.INVALID_FIELD
    assert h.set_feature(0x05, 1 << 16).status == Status.INVALID_FIELD
    assert h.get_feature(0x03).status == Status.INVALID_FIELD
    assert h.set_feature(0x01, 0x03020103).status == 0 and h.get_feature(0x01).dw0 == 0x03020103
    assert h.set_feature(0x04, 0x150).status == 0 and h.get_feature(0x04).dw0 == 0x150
    assert h.set_feature(0x04, 0x10 | (1 << 20)).status == 0
    assert h.get_feature(0x04, cdw11=1 << 20).dw0 == 0x10 | (1 << 20)
    assert h.get_feature(0x04, cdw11=2 << 16).status == Status.INVALID_FIELD
    assert h.set_feature(0x0A, 1).status == 0 and h.get_feature(0x0A).dw0 == 1
    assert h.set_feature(0x0B, 0xFFFFFFFF).status == 0 and h.get_feature(0x0B).dw0 == 0x1FF


def test_number_of_queues_set_once():
    h = ready_host()
    assert h.get_feature(0x07).dw0 == 63 | (63 << 16)
    assert h.set_feature(0x07, 200 | (3 << 16)).dw0 == 63 | (3 << 16)
    assert h.set_feature(0x07, 1).dw0 == 63 | (3 << 16)          # unchanged
    assert h.get_feature(0x07).dw0 == 63 | (3 << 16)
    assert h.set_feature(0x07, 0xFFFF).status == Status.INVALID_FIELD
    h2 = ready_host()
    h2.create_cq(1)
    assert h2.set_feature(0x07, 1).status == Status.COMMAND_SEQUENCE_ERROR


def test_coalescing_and_vector_config_reach_hooks():
    h = ready_host()
    assert h.set_feature(0x08, 0x0A05).status == 0
    assert h.hooks.calls[-1] == ("coal", 5, 10, set())
    assert h.set_feature(0x09, 3 | (1 << 16)).status == 0
    assert h.hooks.calls[-1] == ("coal", 5, 10, {3})
    assert h.get_feature(0x09, cdw11=3).dw0 == 3 | (1 << 16)
    assert h.get_feature(0x09, cdw11=4).dw0 == 4
    assert h.set_feature(0x09, 64).status == Status.INVALID_FIELD


def test_timestamp_roundtrip():
    h = ready_host()
    h.write(DATA + 0x2000, (123456789).to_bytes(8, "little"))
    assert h.set_feature(0x0E, 0, prp1=DATA + 0x2000).status == 0
    h.clock.t += 2.5
    assert h.get_feature(0x0E, prp1=DATA).status == 0
    raw = h.read(DATA, 8)
    assert int.from_bytes(raw[:6], "little") == 123456789 + 2500 and (raw[6] >> 1) & 7 == 1


def test_snapshot_restore_round_trip():
    h = ready_host()
    h.ok(0x09, cdw=(0x0B, 1 << 8))
    h.set_feature(0x08, 0x0102)
    h.create_cq(1, iv=2); h.create_sq(1, 1)
    h.ok(0x7C, prp1=0x120000, prp2=0x121000)
    h.submit(AER)                                    # a1
    a2 = h.submit(AER)
    h.ctrl.poll_admin()
    h.ctrl.doorbell_error(1, 1)                      # reported to a1, masks errors
    h.ctrl.doorbell_error(0, 7)                      # queued
    h.ctrl.log_error(1, 3, Status.LBA_OUT_OF_RANGE)
    h.reap()
    snap = h.ctrl.snapshot()
    wire = msgpack.unpackb(msgpack.packb(snap), strict_map_key=False)

    h2 = Host()
    h2.buf[:] = h.buf                                # guest memory moves with the VM
    h2.dbpage[:] = h.dbpage
    h2.ctrl.restore(wire)
    assert h2.ctrl.snapshot() == snap
    assert ("cq+", 1) in h2.hooks.calls and ("sq+", 1) in h2.hooks.calls
    assert ("shadow", 0x120000, 0x121000) in h2.hooks.calls
    assert h2.ctrl.read_register(0x1C, 4) == h.ctrl.read_register(0x1C, 4) == 1
    for off in (0x14, 0x24, 0x28, 0x30):
        assert h2.ctrl.read_register(off, 4) == h.ctrl.read_register(off, 4)
    # the destination carries on: host state moves too
    h2.sq_tail, h2.cq_head, h2.phase, h2.asqs, h2.acqs = h.sq_tail, h.cq_head, h.phase, h.asqs, h.acqs
    h2.next_cid = h.next_cid
    h2.get_log(0x01, 64)                             # unmask errors -> a2 gets the queued one
    h2.ctrl.poll_admin()
    h2.reap()
    assert [c.dw0 for c in h2.cqes if c.cid == a2] == [DB_REG_ERR]
    assert h2.ok(0x18)


def test_restore_rejects_unknown_version():
    h = ready_host()
    snap = h.ctrl.snapshot()
    snap["version"] = 99
    with pytest.raises(ValueError):
        Host().ctrl.restore(snap)
