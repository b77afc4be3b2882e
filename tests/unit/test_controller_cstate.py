"""Controller state table: legal edges, refused edges, CC decoding."""
import pytest

from nvme.cstate import (EDGES, CEvent, CState, IllegalTransition, StateTable,
                         decode_cc_write)


def test_enable_disable_cycle():
    t = StateTable()
    assert t.apply(CEvent.ENABLE) is CState.READY
    assert t.apply(CEvent.DISABLE) is CState.DISABLED


def test_shutdown_path_and_reenable_needs_disable():
    t = StateTable(CState.READY)
    assert t.apply(CEvent.SHUTDOWN) is CState.SHUTTING_DOWN
    assert t.apply(CEvent.SHUTDOWN_DONE) is CState.SHUTDOWN_COMPLETE
    with pytest.raises(IllegalTransition):
        t.apply(CEvent.SHUTDOWN_DONE)
    assert t.apply(CEvent.DISABLE) is CState.DISABLED


@pytest.mark.parametrize("state,event", [
    (CState.READY, CEvent.ENABLE),
    (CState.DISABLED, CEvent.DISABLE),
    (CState.DISABLED, CEvent.SHUTDOWN_DONE),
    (CState.FATAL, CEvent.ENABLE),
    (CState.FATAL, CEvent.SHUTDOWN),
    (CState.SHUTTING_DOWN, CEvent.ENABLE),
    (CState.DISABLED, CEvent.FAULT),
])
def test_illegal_edges_refused_and_state_kept(state, event):
    t = StateTable(state)
    assert not t.can(event)
    with pytest.raises(IllegalTransition):
        t.apply(event)
    assert t.state is state


def test_reset_from_every_state():
    for s in CState:
        t = StateTable(s)
        assert t.apply(CEvent.RESET) is CState.DISABLED
    assert (CState.FATAL, CEvent.DISABLE) in EDGES


def test_decode_cc_write():
    assert list(decode_cc_write(0, 1)) == [CEvent.ENABLE]
    assert list(decode_cc_write(1, 0)) == [CEvent.DISABLE]
    assert list(decode_cc_write(1, 1 | 1 << 14)) == [CEvent.SHUTDOWN]
    assert list(decode_cc_write(1, 1 | 2 << 14)) == [CEvent.SHUTDOWN]
    assert list(decode_cc_write(1, 1 | 3 << 14)) == []        # reserved SHN ignored
    assert list(decode_cc_write(1 | 1 << 14, 1 | 2 << 14)) == []  # already shutting down
    assert list(decode_cc_write(1, 1 << 14)) == [CEvent.DISABLE, CEvent.SHUTDOWN]
    assert list(decode_cc_write(1, 1 | (6 << 16))) == []
