"""Controller state table: CC.EN / CC.SHN / CSTS as data.

Theory of operation: the register file only stores CC; what the host wrote is
turned into *events* by `decode_cc_write` (EN 0->1, EN 1->0, SHN 00b->01b/10b),
and each event moves the controller along one edge of `EDGES`.  `apply()` is the
only way to change state and refuses any edge not in the table, so an impossible
sequence (e.g. shutdown completing twice) is our bug, not silently absorbed.
CSTS.RDY/SHST/CFS are derived from the state (NVMe Base 1.4 3.1.6, 7.6.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterator


class CState(Enum):
    DISABLED = "disabled"                  # CC.EN=0, RDY=0: registers programmable
    READY = "ready"                        # CC.EN=1, RDY=1: admin queue live
    SHUTTING_DOWN = "shutting_down"        # SHST=01b
    SHUTDOWN_COMPLETE = "shutdown_complete"  # SHST=10b; needs EN 1->0 (or reset) to leave
    FATAL = "fatal"                        # CSTS.CFS=1; host must clear EN (or reset)


class CEvent(Enum):
    ENABLE = "enable"              # CC.EN 0->1 accepted
    ENABLE_FAILED = "enable_failed"  # CC.EN 0->1 with bad AQA/ASQ/ACQ/CC fields
    DISABLE = "disable"            # CC.EN 1->0
    SHUTDOWN = "shutdown"          # CC.SHN 00b -> 01b or 10b
    SHUTDOWN_DONE = "shutdown_done"  # teardown and flush finished
    FAULT = "fault"                # internal failure (e.g. quiesce timeout)
    RESET = "reset"                # DEVICE_RESET / NSSR: power-on state


class IllegalTransition(Exception):
    def __init__(self, state: CState, event: CEvent) -> None:
        super().__init__(f"no edge {state.name} --{event.name}-->")
        self.state = state
        self.event = event


S, E = CState, CEvent
EDGES: dict[tuple[CState, CEvent], CState] = {
    (S.DISABLED, E.ENABLE): S.READY,
    (S.DISABLED, E.ENABLE_FAILED): S.FATAL,
    # SHN while disabled: nothing to tear down, completes at once (as QEMU does).
    (S.DISABLED, E.SHUTDOWN): S.SHUTTING_DOWN,
    (S.READY, E.DISABLE): S.DISABLED,
    (S.READY, E.SHUTDOWN): S.SHUTTING_DOWN,
    (S.READY, E.FAULT): S.FATAL,
    (S.SHUTTING_DOWN, E.SHUTDOWN_DONE): S.SHUTDOWN_COMPLETE,
    (S.SHUTTING_DOWN, E.DISABLE): S.DISABLED,
    (S.SHUTTING_DOWN, E.FAULT): S.FATAL,
    (S.SHUTDOWN_COMPLETE, E.DISABLE): S.DISABLED,
    # Shutdown reached with EN=0: the host may enable again directly.
    (S.SHUTDOWN_COMPLETE, E.ENABLE): S.READY,
    (S.SHUTDOWN_COMPLETE, E.ENABLE_FAILED): S.FATAL,
    (S.FATAL, E.DISABLE): S.DISABLED,
}
for _s in CState:
    EDGES[(_s, E.RESET)] = S.DISABLED
del _s


@dataclass(slots=True)
class StateTable:
    state: CState = CState.DISABLED

    def can(self, event: CEvent) -> bool:
        return (self.state, event) in EDGES

    def apply(self, event: CEvent) -> CState:
        try:
            self.state = EDGES[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        return self.state


# CC fields (NVMe Base 1.4 3.1.5)
CC_EN = 1 << 0
CC_SHN_SHIFT = 14
SHN_NONE, SHN_NORMAL, SHN_ABRUPT, SHN_RESERVED = 0, 1, 2, 3


def cc_en(cc: int) -> bool:
    return bool(cc & CC_EN)


def cc_shn(cc: int) -> int:
    return (cc >> CC_SHN_SHIFT) & 3


def decode_cc_write(old: int, new: int) -> Iterator[CEvent]:
    """Events a CC write produces, in the order they must be applied.

    Disable first (a host clearing EN and setting SHN at once wants a reset followed
    by a shutdown), then enable, then shutdown.  SHN=11b is reserved: ignored.
    ENABLE here means "EN 0->1 requested"; the controller turns it into ENABLE or
    ENABLE_FAILED after validating the admin queue registers.
    """
    if cc_en(old) and not cc_en(new):
        yield CEvent.DISABLE
    if not cc_en(old) and cc_en(new):
        yield CEvent.ENABLE
    if cc_shn(old) == SHN_NONE and cc_shn(new) in (SHN_NORMAL, SHN_ABRUPT):
        yield CEvent.SHUTDOWN
