"""Plain, snapshot-able queue records shared by the front-end and the workers.

These records are the whole truth about a queue: a worker can be handed one (as a
dict over a ring), run it, and hand it back; live migration serialises exactly
these.  No methods with side effects live here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def plain(obj: Any) -> dict[str, Any]:
    """A flat slots dataclass as a dict: what dataclasses.asdict gives for scalar and
    list-of-scalar fields, several times faster (asdict walks every value through
    copy.deepcopy; a migration's save and restore run this for every queue record inside
    the blackout)."""
    out = {}
    for k in obj.__slots__:
        v = getattr(obj, k)
        out[k] = list(v) if isinstance(v, list) else v
    return out


@dataclass(slots=True)
class CqState:
    cqid: int
    base: int            # guest-physical address of entry 0 (PC=1: contiguous)
    size: int            # number of entries (1's based)
    iv: int              # interrupt vector (MSI-X table index)
    ien: bool            # interrupts enabled
    tail: int = 0        # next slot the controller writes
    phase: int = 1       # phase tag the controller writes in the current pass
    head: int = 0        # last head the host reported through the doorbell
    broken: bool = False  # last head doorbell was invalid: skipped until fixed

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CqState":
        return cls(**d)


@dataclass(slots=True)
class SqState:
    sqid: int
    cqid: int
    base: int            # guest-physical address of entry 0
    size: int            # number of entries (1's based)
    prio: int = 0
    head: int = 0        # next entry the controller fetches
    tail: int = 0        # last tail the host reported through the doorbell
    broken: bool = False  # last tail doorbell was invalid: skipped until fixed

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SqState":
        return cls(**d)


@dataclass(slots=True)
class ShadowDoorbells:
    """Doorbell Buffer Config (admin 7Ch): guest pages holding shadow doorbells and EventIdx."""
    dbbuf: int = 0       # PRP1: shadow doorbell page (guest-physical), 0 = off
    eventidx: int = 0    # PRP2: EventIdx page (guest-physical)

    @property
    def enabled(self) -> bool:
        return self.dbbuf != 0


@dataclass(slots=True)
class NamespaceInfo:
    """What the data path needs to know about a namespace (no backend object)."""
    nsid: int
    block_size: int      # bytes, power of two >= 512
    blocks: int          # capacity in logical blocks
    read_only: bool = False
    backend: dict[str, Any] = field(default_factory=dict)  # backends.open_backend(spec) input

    @property
    def lba_shift(self) -> int:
        return self.block_size.bit_length() - 1
