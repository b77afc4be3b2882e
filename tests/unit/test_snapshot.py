"""migration.snapshot: the versioned blob format, its checks and the stream splitter."""
import struct
import zlib

import pytest

from migration import snapshot as snap
from migration.snapshot import (HEADER_SIZE, Section, SnapshotCorrupt, SnapshotVersionError,
                                StreamSplitter, decode, encode)

SECTIONS = {"identity": {"serial": "S1", "ns": [1, 2]}, "pci": bytes(range(256)) * 16,
            "empty": None}


def test_round_trip_keeps_order_and_values():
    blob = encode(SECTIONS)
    s = decode(blob)
    assert s.order == ["identity", "pci", "empty"]
    assert s.section("identity") == {"serial": "S1", "ns": [1, 2]}
    assert s.section("pci") == SECTIONS["pci"]
    assert s.section("empty") is None
    assert s.version == f"{snap.FORMAT_MAJOR}.{snap.FORMAT_MINOR}"
    assert snap.blob_length(blob[:HEADER_SIZE]) == len(blob)


def test_unknown_optional_section_skipped_without_decoding():
    # A section a newer minor added: garbage for msgpack, but nobody asks to decode it.
    blob = _with_raw_section(encode({"identity": 1}), "future", b"\xc1\xc1\xc1")
    s = decode(blob)
    assert s.check_known({"identity"}) == ["future"]
    assert s.section("identity") == 1
    with pytest.raises(SnapshotCorrupt):
        s.section("future")


def test_unknown_required_section_refused():
    blob = encode([Section("identity", 1), Section("newthing", 2, required=True)])
    with pytest.raises(SnapshotVersionError, match="newthing"):
        decode(blob).check_known({"identity"})


def test_newer_minor_read_newer_major_refused_with_versions_named():
    decode(encode({"a": 1}, minor=snap.FORMAT_MINOR + 5))
    with pytest.raises(SnapshotVersionError) as e:
        decode(encode({"a": 1}, major=snap.FORMAT_MAJOR + 1, minor=3))
    assert f"{snap.FORMAT_MAJOR + 1}.3 is newer" in str(e.value)
    with pytest.raises(SnapshotVersionError, match="older"):
        decode(encode({"a": 1}, major=0))


def test_newer_major_with_a_different_table_is_still_a_version_error():
    # A future major may change the table; only the 32-byte header is fixed.
    head = struct.pack("<8sHHIIQ", snap.MAGIC, snap.FORMAT_MAJOR + 1, 0, 0, 9999, 40)
    blob = head + b"\0" * 4 + b"x" * 8
    with pytest.raises(SnapshotVersionError):
        decode(blob)


@pytest.mark.parametrize("cut", [0, 5, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 40, -1])
def test_truncated_refused(cut):
    blob = encode(SECTIONS)
    with pytest.raises(SnapshotCorrupt):
        decode(blob[:cut] if cut >= 0 else blob[:len(blob) - 1])


def test_trailing_bytes_refused():
    with pytest.raises(SnapshotCorrupt, match="after the end"):
        decode(encode(SECTIONS) + b"\0")


def test_every_flipped_byte_is_detected():
    blob = encode({"identity": {"serial": "S1"}, "regs": [1, 2, 3]})
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        with pytest.raises((SnapshotCorrupt, SnapshotVersionError)):
            s = decode(bytes(bad))
            for name in s.order:
                s.section(name)


def test_bad_magic():
    blob = bytearray(encode(SECTIONS))
    blob[0:8] = b"NOTASNAP"
    with pytest.raises(SnapshotCorrupt, match="magic"):
        decode(bytes(blob))
    with pytest.raises(SnapshotCorrupt, match="magic"):
        StreamSplitter().feed(b"GARBAGE!")


def test_absurd_length_refused_before_buffering():
    head = struct.pack("<8sHHIIQ", snap.MAGIC, snap.FORMAT_MAJOR, 0, 0, 1, snap.MAX_BLOB + 1)
    with pytest.raises(SnapshotCorrupt):
        snap.blob_length(head + b"\0" * 4)


def test_splitter_any_chunking_and_two_blobs():
    a, b = encode({"identity": 1}), encode(SECTIONS)
    stream = a + b
    for step in (1, 7, 64, len(stream)):
        sp = StreamSplitter()
        got = []
        for i in range(0, len(stream), step):
            got += sp.feed(stream[i:i + step])
        assert [s.order for s in got] == [["identity"], ["identity", "pci", "empty"]]
        assert sp.pending == 0 and sp.received == len(stream)


def test_splitter_holds_partial():
    b = encode(SECTIONS)
    sp = StreamSplitter()
    assert sp.feed(b[:-3]) == []
    assert sp.pending == len(b) - 3
    assert len(sp.feed(b[-3:])) == 1


def test_bad_section_names():
    with pytest.raises(ValueError):
        encode({"x" * 17: 1})
    with pytest.raises(ValueError):
        encode({"": 1})


def _with_raw_section(blob: bytes, name: str, body: bytes) -> bytes:
    """Append a raw (non-msgpack) optional section, fixing the table and CRCs."""
    s = decode(blob)
    entries = [(n, s.raw[n], snap.REQUIRED if n in s.required else 0) for n in s.order]
    entries.append((name, body, 0))
    table = b"".join(struct.pack("<16sIIII", n.encode().ljust(16, b"\0"), len(b), zlib.crc32(b), f, 0)
                     for n, b, f in entries)
    total = HEADER_SIZE + len(table) + sum(len(b) for _, b, _ in entries)
    head = struct.pack("<8sHHIIQ", snap.MAGIC, s.major, s.minor, 0, len(entries), total)
    return head + struct.pack("<I", zlib.crc32(table, zlib.crc32(head))) + table + b"".join(
        b for _, b, _ in entries)
