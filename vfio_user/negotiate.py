"""VERSION negotiation (spec "VFIO_USER_VERSION", reference §2 and §6.3/§6.7).

We speak protocol 0.0.  The client's JSON may be absent (SPDK's client sends
none): then the spec defaults apply to it (max_msg_fds 1, max_data_xfer_size
1 MiB).  Our reply:

- major 0, minor 0 (<= the client's minor); a different major is refused (ENOTSUP).
- capabilities only ever a subset of what the client proposed, and never
  `write_multiple` or `twin_socket` (we implement neither); `migration: {pgsize}`
  (v1-era dirty bitmaps, DIRTY_PAGES) only if the client offered it;
- **no larger than the request**: QEMU receives the reply into a buffer the size of
  its request and fails "reply larger than recv buffer" otherwise.  We drop optional
  keys until the reply fits, then fall back to `{"capabilities":{}}` and finally to
  no JSON at all.

The client's JSON is bounded before it is parsed (MAX_JSON_BYTES, MAX_JSON_DEPTH):
json.loads recurses per nesting level, so ~1000 levels raised RecursionError, which
the pipeline rightly treats as our bug (found from outside, issue 12).  Too large or
too deep is malformed input: EINVAL like any other bad JSON.

`ClientCaps` records what the peer told us; `qemu_flavour` is set when the JSON has
`capabilities.migration.max_bitmap_size`, which only QEMU sends: the hint used to
pick QEMU's off-spec DMA_READ/DMA_WRITE layout.
"""
from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError
from .messages import Version
from .wire import HEADER_SIZE

SERVER_MAJOR = 0
SERVER_MINOR = 0
SERVER_MAX_MSG_FDS = 16          # what WE can receive in one message
SERVER_MAX_XFER = 1 << 20        # largest REGION/DMA/MIG count we accept
SERVER_PGSIZES = 4096

# Limits a sane client stays within (QEMU enforces the same on our reply).
_MAX_FDS_LIMIT = 1024
_MAX_XFER_LIMIT = 64 << 20
# QEMU's JSON is ~150 bytes and 3 levels deep; libvfio-user's is smaller.
MAX_JSON_BYTES = 16 << 10
MAX_JSON_DEPTH = 16


@dataclass(frozen=True, slots=True)
class ClientCaps:
    """What the client told us about itself (spec defaults when it said nothing)."""

    major: int = 0
    minor: int = 0
    max_msg_fds: int = 1             # fds the client can receive per message
    max_data_xfer_size: int = SERVER_MAX_XFER
    max_dma_maps: int = 65535
    pgsizes: int = 4096
    write_multiple: bool = False
    twin_socket: bool = False
    migration: dict[str, Any] | None = None
    had_json: bool = False
    proposed: frozenset[str] = field(default_factory=frozenset)

    @property
    def qemu_flavour(self) -> bool:
        return bool(self.migration) and "max_bitmap_size" in self.migration  # type: ignore[operator]


def _pos_int(caps: dict[str, Any], key: str, default: int, limit: int) -> int:
    if key not in caps:
        return default
    v = caps[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > limit:
        raise ProtocolError(errno.EINVAL, f"capability {key}={v!r} out of range")
    return v


def parse_client_version(payload: bytes | memoryview) -> ClientCaps:
    """Decode and check a client's VERSION request payload."""
    msg = Version.decode(payload)
    if msg.major != SERVER_MAJOR:
        raise ProtocolError(errno.ENOTSUP, f"protocol major {msg.major} not supported")
    if msg.json is None:
        return ClientCaps(msg.major, msg.minor)
    doc = load_bounded_json(msg.json, "VERSION JSON")
    if not isinstance(doc, dict):
        raise ProtocolError(errno.EINVAL, "VERSION JSON is not an object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError(errno.EINVAL, "capabilities is not an object")
    mig = caps.get("migration")
    if mig is not None and not isinstance(mig, dict):
        raise ProtocolError(errno.EINVAL, "capabilities.migration is not an object")
    twin = caps.get("twin_socket")
    pgsizes = _pos_int(caps, "pgsizes", 4096, 1 << 63)
    if pgsizes % 4096:
        raise ProtocolError(errno.EINVAL, f"pgsizes {pgsizes:#x} lacks 4 KiB")
    return ClientCaps(
        major=msg.major, minor=msg.minor,
        max_msg_fds=_pos_int(caps, "max_msg_fds", 1, _MAX_FDS_LIMIT),
        max_data_xfer_size=_pos_int(caps, "max_data_xfer_size", SERVER_MAX_XFER, _MAX_XFER_LIMIT),
        max_dma_maps=_pos_int(caps, "max_dma_maps", 65535, 1 << 31),
        pgsizes=pgsizes,
        write_multiple=caps.get("write_multiple") is True,
        twin_socket=isinstance(twin, dict) and twin.get("supported") is True,
        migration=mig,
        had_json=True,
        proposed=frozenset(caps),
    )


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in `text` (brackets inside strings don't count).

    A linear scan, no recursion; valid or not, so it can run before json.loads.
    """
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def load_bounded_json(text: str, what: str) -> Any:
    """json.loads with size and depth bounded first; anything wrong is EINVAL."""
    if len(text) > MAX_JSON_BYTES:
        raise ProtocolError(errno.EINVAL, f"{what}: {len(text)} bytes (at most {MAX_JSON_BYTES})")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ProtocolError(errno.EINVAL, f"{what}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(errno.EINVAL, f"malformed {what}: {e}") from e


def migration_pgsize(client: ClientCaps) -> int | None:
    """The dirty-bitmap page size of the v1-era `migration` capability, or None.

    Only when the client offered `migration` with a usable pgsize (a power of two, at
    least 4 KiB): we log at 4 KiB and fold into any larger page, so the smaller of the
    two sides is always 4096 (reference §2).
    """
    mig = client.migration
    if not isinstance(mig, dict):
        return None
    pg = mig.get("pgsize", 4096)
    if isinstance(pg, bool) or not isinstance(pg, int) or pg < 4096 or pg & (pg - 1):
        return None
    return SERVER_PGSIZES


def _dump(caps: dict[str, Any]) -> str:
    return json.dumps({"capabilities": caps}, separators=(",", ":"))


def build_server_version(client: ClientCaps, request_size: int) -> Version:
    """Our VERSION reply payload, guaranteed to fit in `request_size` (whole message)."""
    minor = min(client.minor, SERVER_MINOR)
    budget = request_size - HEADER_SIZE - 4 - 1   # header, major/minor, NUL
    if not client.had_json:
        # Nothing proposed: a subset of nothing is nothing; defaults apply both ways.
        return Version(SERVER_MAJOR, minor, None)
    # In order of importance; the least important is dropped first when short.
    wanted: list[tuple[str, Any]] = [
        ("max_msg_fds", SERVER_MAX_MSG_FDS),
        ("max_data_xfer_size", min(SERVER_MAX_XFER, client.max_data_xfer_size)),
        ("pgsizes", SERVER_PGSIZES),
    ]
    caps = {k: v for k, v in wanted if k in client.proposed}
    pg = migration_pgsize(client)
    if pg is not None:
        caps["migration"] = {"pgsize": pg}      # least important: dropped first when short
    while caps:
        text = _dump(caps)
        if len(text.encode()) <= budget:
            return Version(SERVER_MAJOR, minor, text)
        caps.popitem()
    text = _dump({})
    if len(text) <= budget:
        return Version(SERVER_MAJOR, minor, text)
    return Version(SERVER_MAJOR, minor, None)


def parse_server_version(payload: bytes | memoryview) -> tuple[Version, dict[str, Any]]:
    """Client side: decode the server's VERSION reply and its capabilities."""
    msg = Version.decode(payload)
    caps: dict[str, Any] = {}
    if msg.json:
        doc = load_bounded_json(msg.json, "server JSON")
        caps = doc.get("capabilities", {}) if isinstance(doc, dict) else {}
    return msg, caps
