"""The one versioned snapshot format (live migration, live upgrade, saved files).

Theory of operation
-------------------
A snapshot ("blob") is self-delimiting and self-checking, so it can travel as a
byte stream cut into arbitrary chunks (v1 data section, v2 MIG_DATA, a file, a
handover socket) and be recognised, split and verified on the other side:

    header, 32 bytes (little-endian)
       0  magic    8   b"VNVMESNP"
       8  major    2   incompatible changes bump this: a reader refuses a newer major
      10  minor    2   compatible additions (new optional sections) bump this
      12  flags    4   reserved, 0
      16  nsect    4   number of sections (<= MAX_SECTIONS)
      20  total    8   whole blob: header + table + section bodies
      28  hcrc     4   CRC-32 of bytes 0..28 followed by the section table
    table, nsect x 32 bytes
       0  name    16   ASCII, NUL padded, unique within the blob
      16  length   4   body bytes
      20  crc      4   CRC-32 of the body
      24  sflags   4   bit 0 REQUIRED: a reader that does not know the name refuses
      28  -        4   reserved, 0
    bodies, in table order, each a msgpack document of `length` bytes

The header layout is the same in every major (so a newer format is recognised as
such); the table and bodies may change with the major.
Compatibility rules: unknown *optional* sections are skipped without being decoded
(`Snapshot.section` decodes lazily, one section at a time), an unknown REQUIRED
section or a newer major is refused with a message that names both versions, an
older major is refused too (we keep no converters yet: the format is young).  Any
truncation, bad magic, CRC mismatch or inconsistent length is `SnapshotCorrupt`.
Nothing here does I/O; the callers choose where the bytes go.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgpack

MAGIC = b"VNVMESNP"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
MAX_SECTIONS = 256
MAX_BLOB = 256 << 20          # a controller snapshot is a few KiB; refuse absurd sizes early
REQUIRED = 1

_HEAD = struct.Struct("<8sHHIIQ")      # without hcrc: 28 bytes
_HCRC = struct.Struct("<I")
_ENTRY = struct.Struct("<16sIIII")
HEADER_SIZE = _HEAD.size + _HCRC.size  # 32
ENTRY_SIZE = _ENTRY.size               # 32


class SnapshotError(ValueError):
    """A snapshot that cannot be used; the message says why (for logs and operators)."""


class SnapshotCorrupt(SnapshotError):
    """Truncated, bad magic, CRC mismatch, inconsistent lengths, undecodable section."""


class SnapshotVersionError(SnapshotError):
    """A format this build does not read (newer major, or an unknown required section)."""


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    data: Any
    required: bool = False


def _name_bytes(name: str) -> bytes:
    b = name.encode("ascii")
    if not b or len(b) > 16 or b"\0" in b:
        raise ValueError(f"section name {name!r}: 1..16 ASCII characters")
    return b.ljust(16, b"\0")


def encode(sections: Mapping[str, Any] | Iterable[Section], *, major: int = FORMAT_MAJOR,
           minor: int = FORMAT_MINOR, required: Iterable[str] = ()) -> bytes:
    """One blob from {name: msgpack-able value} (or Section objects), in the given order."""
    req = set(required)
    if isinstance(sections, Mapping):
        items = [Section(k, v, k in req) for k, v in sections.items()]
    else:
        items = list(sections)
    if len(items) > MAX_SECTIONS:
        raise ValueError(f"{len(items)} sections, at most {MAX_SECTIONS}")
    names = [s.name for s in items]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate section names in {names}")
    bodies = [msgpack.packb(s.data, use_bin_type=True) for s in items]
    table = b"".join(_ENTRY.pack(_name_bytes(s.name), len(b), zlib.crc32(b),
                                 REQUIRED if s.required else 0, 0)
                     for s, b in zip(items, bodies))
    total = HEADER_SIZE + len(table) + sum(len(b) for b in bodies)
    head = _HEAD.pack(MAGIC, major, minor, 0, len(items), total)
    hcrc = zlib.crc32(table, zlib.crc32(head))
    return b"".join([head, _HCRC.pack(hcrc), table, *bodies])


def blob_length(prefix: bytes | bytearray | memoryview) -> int | None:
    """Total length of the blob that starts `prefix`, once its header is there (else None).

    Checks the magic and the size bounds (SnapshotCorrupt) but not the CRC, so a
    stream reader can tell early how much more to wait for.
    """
    if len(prefix) < HEADER_SIZE:
        if bytes(prefix[:len(MAGIC)]) != MAGIC[:min(len(prefix), len(MAGIC))]:
            raise SnapshotCorrupt("not a vnvmed snapshot (bad magic)")
        return None
    magic, major, _minor, _flags, nsect, total = _HEAD.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise SnapshotCorrupt("not a vnvmed snapshot (bad magic)")
    if not HEADER_SIZE <= total <= MAX_BLOB:
        raise SnapshotCorrupt(f"blob length {total} out of bounds")
    if major == FORMAT_MAJOR and (nsect > MAX_SECTIONS or HEADER_SIZE + nsect * ENTRY_SIZE > total):
        raise SnapshotCorrupt(f"blob length {total} inconsistent with {nsect} sections")
    return total


@dataclass(slots=True)
class Snapshot:
    """A verified blob: version, section order, raw bodies (decoded on demand)."""

    major: int
    minor: int
    order: list[str]
    raw: dict[str, bytes]
    required: set[str] = field(default_factory=set)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def section(self, name: str, default: Any = KeyError) -> Any:
        """The decoded section; KeyError (or `default`) if absent, SnapshotCorrupt if undecodable."""
        if name not in self.raw:
            if default is KeyError:
                raise KeyError(f"snapshot has no section {name!r}")
            return default
        if name not in self._cache:
            try:
                self._cache[name] = msgpack.unpackb(self.raw[name], raw=False,
                                                    strict_map_key=False)
            except (ValueError, msgpack.UnpackException, TypeError) as e:
                raise SnapshotCorrupt(f"section {name!r} does not decode: {e}") from None
        return self._cache[name]

    def check_known(self, known: Iterable[str]) -> list[str]:
        """Refuse unknown REQUIRED sections; return the unknown optional ones (skipped)."""
        known = set(known)
        bad = sorted(self.required - known)
        if bad:
            raise SnapshotVersionError(
                f"snapshot {self.version} needs sections this vnvmed does not know: "
                f"{', '.join(bad)} (this build writes {FORMAT_MAJOR}.{FORMAT_MINOR})")
        return [n for n in self.order if n not in known]


def decode(data: bytes | bytearray | memoryview, *, accept_major: int = FORMAT_MAJOR) -> Snapshot:
    """Verify one whole blob (exactly `data`) and index its sections."""
    total = blob_length(data)
    if total is None:
        raise SnapshotCorrupt(f"truncated snapshot: {len(data)} bytes, the header alone is "
                              f"{HEADER_SIZE}")
    if len(data) < total:
        raise SnapshotCorrupt(f"truncated snapshot: {len(data)} of {total} bytes")
    if len(data) > total:
        raise SnapshotCorrupt(f"{len(data) - total} bytes after the end of the snapshot")
    mv = memoryview(data)
    _magic, major, minor, _flags, nsect, _total = _HEAD.unpack_from(mv, 0)
    # The 32-byte header keeps its layout in every major, so a newer format is
    # recognised as such (and not as corruption) before its table is looked at.
    if major != accept_major:
        newer = "newer" if major > accept_major else "older"
        raise SnapshotVersionError(
            f"snapshot format {major}.{minor} is {newer} than this vnvmed reads "
            f"({accept_major}.x); refusing it")
    (hcrc,) = _HCRC.unpack_from(mv, _HEAD.size)
    tend = HEADER_SIZE + nsect * ENTRY_SIZE
    if zlib.crc32(mv[HEADER_SIZE:tend], zlib.crc32(mv[:_HEAD.size])) != hcrc:
        raise SnapshotCorrupt("snapshot header/section table CRC mismatch")
    pos = tend
    order: list[str] = []
    raw: dict[str, bytes] = {}
    required: set[str] = set()
    for i in range(nsect):
        nameb, length, crc, sflags, _ = _ENTRY.unpack_from(mv, HEADER_SIZE + i * ENTRY_SIZE)
        try:
            name = nameb.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise SnapshotCorrupt(f"section {i}: name is not ASCII") from None
        if not name or name in raw:
            raise SnapshotCorrupt(f"section {i}: empty or duplicate name {name!r}")
        if pos + length > total:
            raise SnapshotCorrupt(f"section {name!r} runs past the end of the snapshot")
        body = bytes(mv[pos:pos + length])
        if zlib.crc32(body) != crc:
            raise SnapshotCorrupt(f"section {name!r} CRC mismatch")
        pos += length
        order.append(name)
        raw[name] = body
        if sflags & REQUIRED:
            required.add(name)
    if pos != total:
        raise SnapshotCorrupt(f"sections end at {pos}, the header says {total}")
    return Snapshot(major, minor, order, raw, required)


class StreamSplitter:
    """Cut a byte stream (data chunks of any size) into whole blobs.

    `feed()` returns the blobs completed by this chunk (verified with `decode`);
    `pending` is how many bytes of an unfinished blob are held.  A stream that
    does not start with a blob header raises SnapshotCorrupt at once.
    """

    def __init__(self, limit: int = MAX_BLOB) -> None:
        self._buf = bytearray()
        self.limit = limit
        self.received = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Snapshot]:
        self._buf += chunk
        self.received += len(chunk)
        out: list[Snapshot] = []
        while self._buf:
            total = blob_length(self._buf)
            if total is None or len(self._buf) < total:
                if len(self._buf) > self.limit:
                    raise SnapshotCorrupt(f"stream exceeds {self.limit} bytes")
                break
            out.append(decode(bytes(self._buf[:total])))
            del self._buf[:total]
        return out
