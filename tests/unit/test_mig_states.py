"""migration.states: derived walks equal libvfio-user's next_state table; v1 mapping."""
import pytest

from migration.states import (ARCS, V1_EDGES, MigState, MigrationFsm, TransitionRefused, v1_target,
                              walk)

S, R, SC, RS, PC = (MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING,
                    MigState.PRE_COPY)

# libvfio-user lib/migration.c next_state[from][to] (reference §5.3), None = refused.
NEXT = {
    S: {R: R, SC: SC, RS: RS, PC: R},
    R: {S: S, SC: S, RS: S, PC: PC},
    SC: {S: S, R: S, RS: S, PC: None},
    RS: {S: S, R: S, SC: S, PC: S},
    PC: {S: R, R: R, SC: SC, RS: R},
}


@pytest.mark.parametrize("src", list(NEXT))
def test_first_step_is_libvfio_users(src):
    for dst, first in NEXT[src].items():
        p = walk(src, dst)
        if first is None:
            assert p is None, (src, dst)
        else:
            assert p is not None and p[0] == first and p[-1] == dst, (src, dst, p)


def test_walks_are_arcs_with_no_saving_state_inside():
    for src in NEXT:
        for dst in NEXT[src]:
            p = walk(src, dst)
            if p is None:
                continue
            prev = src
            for s in p:
                assert (prev, s) in ARCS
                prev = s
            assert not {PC, SC} & set(p[:-1]), (src, dst, p)


def test_full_walks():
    assert walk(S, PC) == (R, PC)
    assert walk(RS, PC) == (S, R, PC)
    assert walk(PC, RS) == (R, S, RS)
    assert walk(R, SC) == (S, SC)
    assert walk(R, R) == ()


def test_fsm_apply_and_step():
    f = MigrationFsm()
    assert f.state is R
    steps = f.apply(RS)
    assert steps == [S, RS]
    for s in steps:
        f.step(s)
    assert f.state is RS
    with pytest.raises(RuntimeError):
        f.step(PC)          # not an arc from RESUMING


@pytest.mark.parametrize("target", [MigState.ERROR, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P, 8, 99])
def test_unrequestable(target):
    with pytest.raises(TransitionRefused):
        MigrationFsm().apply(target)


def test_error_is_left_only_by_reset():
    f = MigrationFsm()
    f.fail()
    for t in (S, R, RS):
        with pytest.raises(TransitionRefused):
            f.apply(t)
    f.reset()
    assert f.state is R


def test_v1_mapping():
    assert v1_target(0) is S and v1_target(1) is R and v1_target(2) is SC
    assert v1_target(3) is PC and v1_target(4) is RS and v1_target(6) is MigState.ERROR
    assert v1_target(5) is None and v1_target(7) is None and v1_target(8) is None


def test_v1_qemu_source_and_destination_sequences():
    f = MigrationFsm()
    for target in (PC, SC, S, R):             # save_setup, VM stop, complete, (cancel-less) resume
        for s in f.apply(target, v1=True):
            f.step(s)
        assert f.state is target
    f = MigrationFsm()
    for target in (RS, R):
        for s in f.apply(target, v1=True):
            f.step(s)
    assert f.state is R


def test_v1_refused_edges():
    for src, dst in [(SC, PC), (RS, SC), (RS, PC)]:
        assert (src, dst) not in V1_EDGES
        f = MigrationFsm(src)
        with pytest.raises(TransitionRefused):
            f.apply(dst, v1=True)
        assert f.state is src
    # same-state writes are fine (QEMU's read-modify-write may rewrite the state)
    assert MigrationFsm(PC).apply(PC, v1=True) == []
