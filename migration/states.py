"""The migration state machine, as data: one table serves both wire schemes.

Theory of operation
-------------------
The states are VFIO migration v2's (`enum vfio_device_mig_state`, reference §5.3).
`ARCS` lists the direct transitions a device implements; everything else is a
*walk*: the shortest path over ARCS that has no saving-group state (PRE_COPY,
STOP_COPY) in its middle, derived by `_derive()` at import time.  The result is
exactly libvfio-user's `next_state[from][to]` table (pinned by a unit test), with
its one explicit exception: STOP_COPY -> PRE_COPY is refused (a finished saving
session may not start over as pre-copy; the kernel refuses it the same way).
ERROR is never requested and never left by an arc: only a device reset leaves it.

The v1 scheme (region 9, reference §4.3) writes `device_state` bits.  `V1_STATES`
maps each valid bit pattern onto a v2 state, so a v1 write is "walk to that state";
`V1_EDGES` is the set of v1 transitions accepted (the spec's table, plus what QEMU's
read-modify-write and its cancel path produce, see below), and everything else is
refused without moving.

`MigrationFsm.apply(target)` refuses an illegal target (EINVAL) and otherwise
returns the list of single arcs to perform in order; the caller performs each arc
and calls `step()` after it succeeded, so a failure mid-walk leaves the machine in
the last state actually reached (libvfio-user behaves the same way).
"""
from __future__ import annotations

import enum
from collections import deque


class MigState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5     # not used by vfio-user: refused
    PRE_COPY = 6
    PRE_COPY_P2P = 7    # not used by vfio-user: refused


SAVING = frozenset({MigState.PRE_COPY, MigState.STOP_COPY})
USABLE = (MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING,
          MigState.PRE_COPY)

# Direct arcs (spec "Direct State Transitions"; lvu lib/migration.c transitions[]).
ARCS: frozenset[tuple[MigState, MigState]] = frozenset({
    (MigState.RUNNING, MigState.STOP),
    (MigState.STOP_COPY, MigState.STOP),      # ends the saving session
    (MigState.RESUMING, MigState.STOP),       # consumes the received data
    (MigState.PRE_COPY, MigState.RUNNING),    # ends the saving session
    (MigState.STOP, MigState.RUNNING),
    (MigState.RUNNING, MigState.PRE_COPY),    # a saving session begins
    (MigState.STOP, MigState.STOP_COPY),      # a saving session begins
    (MigState.PRE_COPY, MigState.STOP_COPY),
    (MigState.STOP, MigState.RESUMING),
})
FORBIDDEN: frozenset[tuple[MigState, MigState]] = frozenset({
    (MigState.STOP_COPY, MigState.PRE_COPY),
})


def _derive() -> dict[tuple[MigState, MigState], tuple[MigState, ...]]:
    """Shortest walks over ARCS with no saving state strictly inside (BFS per source)."""
    out: dict[tuple[MigState, MigState], tuple[MigState, ...]] = {}
    for src in USABLE:
        prev: dict[MigState, MigState | None] = {src: None}
        todo = deque([src])
        while todo:
            cur = todo.popleft()
            if cur != src and cur in SAVING:
                continue                    # may end a walk here, never pass through
            for dst in USABLE:
                if (cur, dst) in ARCS and dst not in prev:
                    prev[dst] = cur
                    todo.append(dst)
        for dst, p in prev.items():
            if dst == src or (src, dst) in FORBIDDEN:
                continue
            path = [dst]
            while p is not None and p != src:
                path.append(p)
                p = prev[p]
            out[(src, dst)] = tuple(reversed(path))
    return out


WALKS = _derive()


def walk(src: MigState, dst: MigState) -> tuple[MigState, ...] | None:
    """States entered on the way from src to dst (dst last); () if equal; None if refused."""
    if src == dst and src in USABLE:
        return ()
    return WALKS.get((src, dst))


# ----------------------------------------------------------------------------- v1

V1_RUNNING, V1_SAVING, V1_RESUMING = 1, 2, 4
V1_MASK = 7
V1_ERROR = V1_SAVING | V1_RESUMING      # 6: the error state (IS_ERROR)

V1_STATES: dict[int, MigState] = {
    0: MigState.STOP,
    V1_RUNNING: MigState.RUNNING,
    V1_SAVING: MigState.STOP_COPY,
    V1_RUNNING | V1_SAVING: MigState.PRE_COPY,
    V1_RESUMING: MigState.RESUMING,
    V1_ERROR: MigState.ERROR,
}
V1_BITS = {v: k for k, v in V1_STATES.items()}

_S, _R, _SC, _PC, _RS = (MigState.STOP, MigState.RUNNING, MigState.STOP_COPY,
                         MigState.PRE_COPY, MigState.RESUMING)
# The spec's v1 table (@1569a37) ...
V1_EDGES: frozenset[tuple[MigState, MigState]] = frozenset({
    (_S, _R),
    (_R, _S), (_R, _SC), (_R, _PC), (_R, _RS),
    (_SC, _S), (_SC, _R),
    (_PC, _SC),
    (_RS, _R),
    # ... plus what real clients do that the table forgets (libvfio-user accepted them):
    (_PC, _S),      # libvfio-user's extra pre-copy -> stop
    (_PC, _R),      # QEMU's cancel path: set RUNNING, clear SAVING
    (_S, _SC),      # a VM stopped before migration: save_setup sets SAVING on a stopped device
    (_S, _RS),      # a destination device that was stopped first
    (_RS, _S),      # a destination that is loaded but not started yet
})


def v1_target(bits: int) -> MigState | None:
    """The v2 state a v1 device_state value names (None: invalid combination)."""
    if bits & ~V1_MASK:
        return None
    return V1_STATES.get(bits)


# ----------------------------------------------------------------------------- the machine

class TransitionRefused(Exception):
    """The requested target is not reachable from here (-> EINVAL); nothing moved."""


class MigrationFsm:
    """Current state plus the one `apply`: validate a request, return the arcs to perform."""

    def __init__(self, state: MigState = MigState.RUNNING) -> None:
        self.state = state

    def apply(self, target: int, *, v1: bool = False) -> list[MigState]:
        """States to step through to reach `target` (empty if already there)."""
        try:
            dst = MigState(target)
        except ValueError:
            raise TransitionRefused(f"no migration state {target}") from None
        src = self.state
        if dst not in USABLE:
            raise TransitionRefused(f"{dst.name} cannot be requested")
        if src is MigState.ERROR:
            raise TransitionRefused("device is in the ERROR state: only a reset leaves it")
        if v1 and src != dst and (src, dst) not in V1_EDGES:
            raise TransitionRefused(f"v1 transition {src.name} -> {dst.name} not allowed")
        path = walk(src, dst)
        if path is None:
            raise TransitionRefused(f"no transition {src.name} -> {dst.name}")
        return list(path)

    def step(self, to: MigState) -> None:
        """Record one performed arc (refuses anything that is not a direct arc)."""
        if (self.state, to) not in ARCS:
            raise RuntimeError(f"migration: {self.state.name} -> {to.name} is not an arc")
        self.state = to

    def fail(self) -> None:
        """An internal failure the device cannot undo: ERROR until reset."""
        self.state = MigState.ERROR

    def reset(self) -> None:
        self.state = MigState.RUNNING
