"""The verified-I/O model (tests/ioverify.py) on its own: each verdict it must reach.

Both stress drivers (tests/verifyload.py, tests/stress/client.py) trust this model to
say MISMATCH / DOUBLED / LOST / ERROR; a model that misses one makes every stress and
migration test pass vacuously, so each verdict is checked here from both sides (the
bad case is caught, the good case is not flagged).
"""
from __future__ import annotations

import random

import pytest

from tests.ioverify import DNR, SC_DATA_TRANSFER_ERROR, BlockModel, Cmd, Verifier, pattern

BS = 512
SC_COMMAND_INTERRUPTED = 0x21      # SCT 0: the status a replaced worker's parked command gets
SC_INVALID_FIELD = 0x02


def _write(v: Verifier, qid: int, cid: int, lba: int, nblk: int = 1) -> Cmd:
    cmd = Cmd(qid, cid, lba, nblk, True, v.next_gen())
    v.submitted(cmd)
    return cmd


def _read(v: Verifier, qid: int, cid: int, lba: int, nblk: int = 1) -> Cmd:
    cmd = Cmd(qid, cid, lba, nblk, False)
    v.submitted(cmd)
    return cmd


def _disk(v: Verifier, blocks: int) -> bytearray:
    """A namespace the tests 'write' through: what a correct device would hold."""
    return bytearray(blocks * v.model.bs)


def _store(disk: bytearray, v: Verifier, cmd: Cmd) -> None:
    bs = v.model.bs
    disk[cmd.lba * bs:(cmd.lba + cmd.nblk) * bs] = v.model.data(cmd.lba, cmd.nblk, cmd.gen)


def _from(disk: bytearray, bs: int):
    return lambda cmd: bytes(disk[cmd.lba * bs:(cmd.lba + cmd.nblk) * bs])


def _stored(v: Verifier, disk: bytearray, cid: int, lba: int, nblk: int = 1) -> Cmd:
    """A write on queue 1 that the device stores and completes with success."""
    w = _write(v, 1, cid, lba, nblk)
    _store(disk, v, w)
    assert v.completed(1, cid, 0) is w
    return w


def test_pattern_differs_per_block_generation_and_seed() -> None:
    a = pattern(1, 10, 3, BS)
    assert len(a) == BS
    assert len({a, pattern(1, 11, 3, BS), pattern(1, 10, 4, BS), pattern(2, 10, 3, BS)}) == 4


def test_write_then_read_verifies_every_byte() -> None:
    v = Verifier(64, BS, seed=5)
    disk = _disk(v, 64)
    _stored(v, disk, 1, 8, nblk=4)
    r = _read(v, 1, 2, 8, nblk=4)
    assert v.completed(1, 2, 0, _from(disk, BS), sqid=1) is r
    assert v.c["bytes_verified"] == 4 * BS and v.c["reads"] == 1 and v.c["writes"] == 1
    assert v.problems == [] and v.c["mismatches"] == 0
    assert not v.inflight and v.model.busy == set()


def test_mismatch_one_wrong_byte_in_one_block() -> None:
    v = Verifier(64, BS, seed=5)
    disk = _disk(v, 64)
    _stored(v, disk, 1, 8, nblk=4)
    disk[10 * BS + 300] ^= 1              # the third block of the four, one bit
    _read(v, 1, 2, 8, nblk=4)
    v.completed(1, 2, 0, _from(disk, BS))
    assert v.c["mismatches"] == 1
    assert v.c["bytes_verified"] == 3 * BS
    assert len(v.problems) == 1 and v.problems[0].startswith("MISMATCH: lba 10 ")


def test_stale_generation_is_a_mismatch() -> None:
    """The device kept the older write (a lost update): same block, older generation."""
    v = Verifier(16, BS, seed=1)
    disk = _disk(v, 16)
    _stored(v, disk, 1, 3)
    _write(v, 1, 2, 3)                    # completes, but the device never stored it
    v.completed(1, 2, 0)
    _read(v, 1, 3, 3)
    v.completed(1, 3, 0, _from(disk, BS))
    assert v.c["mismatches"] == 1 and v.problems[0].startswith("MISMATCH")


def test_zeroed_namespace_checks_never_written_blocks() -> None:
    v = Verifier(16, BS, seed=1, zeroed=True)
    disk = _disk(v, 16)
    _read(v, 2, 7, 0, nblk=16)
    v.completed(2, 7, 0, _from(disk, BS))
    assert v.c["bytes_verified"] == 16 * BS and not v.problems
    disk[5 * BS] = 0xFF
    _read(v, 2, 8, 0, nblk=16)
    v.completed(2, 8, 0, _from(disk, BS))
    assert v.c["mismatches"] == 1 and "lba 5 " in v.problems[0]


def test_not_zeroed_namespace_checks_only_what_was_written() -> None:
    v = Verifier(16, BS, seed=1)
    garbage = bytearray(b"\xab" * 16 * BS)   # an earlier client's data
    _read(v, 1, 1, 0, nblk=16)
    v.completed(1, 1, 0, _from(garbage, BS))
    assert v.c["bytes_verified"] == 0 and not v.problems


def test_doubled_completion() -> None:
    v = Verifier(16, BS, seed=1)
    _write(v, 1, 4, 0)
    assert v.completed(1, 4, 0) is not None
    assert v.completed(1, 4, 0) is None          # the same CQE again
    assert v.completed(2, 4, 0) is None          # right CID, wrong queue
    assert v.c["doubled"] == 2 and v.c["completed"] == 1
    assert all(p.startswith("DOUBLED") for p in v.problems) and len(v.problems) == 2


def test_cid_reused_while_in_flight_is_a_driver_bug() -> None:
    v = Verifier(16, BS, seed=1)
    _write(v, 1, 4, 0)
    with pytest.raises(AssertionError, match="reused"):
        _read(v, 1, 4, 8)
    _read(v, 2, 4, 8)                            # the same CID on another queue is fine


def test_lost_command() -> None:
    v = Verifier(16, BS, seed=1)
    old = _write(v, 1, 1, 0)
    old.t -= 30.0                                 # submitted 30 s ago, no CQE since
    _read(v, 1, 2, 4)
    late = v.overdue(20.0)
    assert late == [old]
    v.lost(late, "CSTS 0x1")
    assert v.c["lost"] == 1 and v.problems[0].startswith("LOST: qid 1 cid 1 ")
    assert "CSTS 0x1" in v.problems[0]
    assert v.overdue(20.0, now=old.t + 10.0) == []


def test_abort_makes_writes_unknown_and_frees_blocks() -> None:
    v = Verifier(16, BS, seed=1, zeroed=True)
    disk = _disk(v, 16)
    _stored(v, disk, 1, 2, nblk=2)
    assert v.model.known(2) and v.model.known(3)
    again = _write(v, 1, 2, 2, nblk=2)            # in flight when the controller resets
    _read(v, 1, 3, 9)
    assert not v.model.free(2, 1)
    gone = v.abort_all("aborted")
    assert {c.cid for c in gone} == {2, 3} and v.c["aborted"] == 2
    assert not v.inflight and v.model.free(0, 16)
    assert not v.model.known(2) and not v.model.known(3) and v.model.known(9)
    assert v.model.expected(2) is None
    # The device may hold either write (or a mix): nothing is checked there ...
    half = bytearray(disk)
    half[2 * BS:3 * BS] = v.model.data(2, 1, again.gen)
    _read(v, 1, 4, 0, nblk=4)
    v.completed(1, 4, 0, _from(half, BS))
    assert not v.problems and v.c["bytes_verified"] == 2 * BS     # blocks 0, 1 (zero)
    # ... until a write that completes makes the blocks known again.
    w2 = _stored(v, half, 5, 2, nblk=2)
    assert v.model.known(2) and v.model.expected(3) == v.model.data(3, 1, w2.gen)
    # A CQE for an aborted command (a stale ring) is doubled.
    assert v.completed(1, 2, 0) is None and v.c["doubled"] == 1


def test_retryable_vs_error() -> None:
    v = Verifier(16, BS, seed=1)
    _stored(v, _disk(v, 16), 1, 0)
    # Command Interrupted, DNR clear: retryable, the write's blocks become unknown.
    _write(v, 1, 2, 0)
    v.completed(1, 2, SC_COMMAND_INTERRUPTED)
    assert v.c["retryable"] == 1 and v.c["errors"] == 0 and not v.problems
    assert not v.model.known(0)
    # The same with DNR set: an error.
    _write(v, 1, 3, 4)
    v.completed(1, 3, SC_COMMAND_INTERRUPTED | DNR)
    assert v.c["errors"] == 1 and v.problems[-1].startswith("ERROR status 0x4021")
    # Invalid Field with DNR: an error; a read that failed is not checked.
    _read(v, 1, 4, 0)
    v.completed(1, 4, SC_INVALID_FIELD | DNR, read=lambda cmd: pytest.fail("read a failed read"))
    assert v.c["errors"] == 2 and v.c["retryable"] == 1 and v.c["reads"] == 0


def test_strict_driver_tolerates_nothing() -> None:
    v = Verifier(16, BS, seed=1, tolerate=False, storms=lambda: True)
    _write(v, 1, 1, 0)
    v.completed(1, 1, SC_COMMAND_INTERRUPTED)
    _write(v, 1, 2, 4)
    v.completed(1, 2, SC_DATA_TRANSFER_ERROR | DNR)
    assert v.c["errors"] == 2 and v.c["retryable"] == 0 and v.c["storm_dte"] == 0
    assert len(v.problems) == 2 and all(p.startswith("ERROR") for p in v.problems)


def test_transfer_error_counts_apart_only_during_storms() -> None:
    storming = [False]
    v = Verifier(16, BS, seed=1, storms=lambda: storming[0])
    _write(v, 1, 1, 0)
    v.completed(1, 1, SC_DATA_TRANSFER_ERROR | DNR)
    assert v.c["errors"] == 1 and v.c["storm_dte"] == 0
    storming[0] = True
    _write(v, 1, 2, 4)
    v.completed(1, 2, SC_DATA_TRANSFER_ERROR | DNR)
    assert v.c["storm_dte"] == 1 and v.c["errors"] == 1 and not v.model.known(4)


def test_wrong_sqid_is_an_error() -> None:
    v = Verifier(16, BS, seed=1)
    _write(v, 3, 9, 0)
    assert v.completed(3, 9, 0, sqid=2) is not None
    assert v.c["errors"] == 1 and "SQID 2" in v.problems[0]


def test_plan_never_picks_a_busy_block_and_writes_unknown_ranges() -> None:
    v = Verifier(8, BS, seed=1)
    rng = random.Random(3)
    cids = iter(range(1000))
    cmds = []
    while (cmd := v.plan(rng, 2, ratio=0.0, align=2)) is not None:
        assert cmd.lba % 2 == 0 and cmd.write      # nothing known yet: a read checks nothing
        cmd.qid, cmd.cid = 1, next(cids)
        v.submitted(cmd)
        cmds.append(cmd)
    starts = sorted(c.lba for c in cmds)
    assert 1 <= len(starts) <= 4 and len(set(starts)) == len(starts)   # disjoint
    gens = [c.gen for c in cmds]
    assert len(set(gens)) == len(gens) and 0 not in gens
    v.model.claim(0, 8)                            # every block busy: nothing to pick
    assert v.plan(rng, 1) is None


def test_block_model_check_reports_first_bytes() -> None:
    m = BlockModel(4, BS, seed=9, zeroed=False)
    m.written(1, 1, 7)
    got = bytearray(m.data(0, 2, 7))
    got[BS + 1] ^= 0xFF
    ok, bad = m.check(0, 2, got)
    assert ok == 0 and [b for b, _ in bad] == [1] and bad[0][1] == bytes(got[BS:BS + 32])
