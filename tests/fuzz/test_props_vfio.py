"""Property tests of the sans-I/O vfio-user pieces: messages, framing, negotiation,
the DMA region table and the DMA_READ/WRITE message layouts (issue 12)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import assume, given, strategies as st

from fuzz.targets import VfioMessageTarget
from vfio_user.dma import DmaTable
from vfio_user.dmamsg import DmaLayout, DmaRw, decode_read_reply, encode_read_reply
from vfio_user.errors import ProtocolError, StreamError
from vfio_user.framing import Framer
from vfio_user.messages import (DeviceFeature, DeviceInfoMsg, DmaMap, DmaUnmap, IrqInfoMsg,
                                RegionAccess, RegionInfoReply, RegionInfoRequest, SetIrqs, Version)
from vfio_user.negotiate import (MAX_JSON_DEPTH, SERVER_MAX_XFER, build_server_version,
                                 parse_client_version)
from vfio_user.wire import HEADER_SIZE, Command, Header, IrqSetFlag

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

MESSAGES = st.one_of(
    st.builds(Version, st.just(0), st.integers(0, 0xFFFF), st.none() | st.text(
        st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=64)),
    st.builds(DmaMap, st.integers(32, 2**32 - 1), u32, u64, u64, u64),
    st.builds(DmaUnmap, st.integers(24, 2**32 - 1), u32, u64, u64),
    st.builds(DeviceInfoMsg, st.integers(16, 2**32 - 1), u32, u32, u32),
    st.builds(RegionInfoRequest, st.integers(32, 2**32 - 1), u32),
    st.builds(IrqInfoMsg, st.integers(16, 2**32 - 1), u32, u32, u32),
    st.builds(SetIrqs, st.integers(20, 2**32 - 1), u32.filter(lambda f: not f & IrqSetFlag.DATA_BOOL),
              u32, u32, u32),
    # a reply's argsz is what its encoding needs (32 without capabilities)
    st.builds(RegionInfoReply, st.just(32), u32.filter(lambda f: not f & 8), u32, u64, u64),
)


def _decoder(m: object):
    if isinstance(m, RegionAccess):
        return lambda b: RegionAccess.decode(b, with_data=bool(m.data), max_xfer=SERVER_MAX_XFER)
    return type(m).decode


@given(MESSAGES)
def test_message_roundtrip(m) -> None:
    assert _decoder(m)(m.encode()) == m


@given(st.integers(0, 2**64 - 1), st.integers(0, 9), st.binary(min_size=1, max_size=512))
def test_region_write_roundtrip(offset: int, region: int, data: bytes) -> None:
    m = RegionAccess(offset, region, len(data), data)
    assert RegionAccess.decode(m.encode(), with_data=True, max_xfer=SERVER_MAX_XFER) == m


@given(st.binary(max_size=600))
def test_decoders_answer_garbage_with_protocol_errors_only(data: bytes) -> None:
    # The vfio_message fuzz target: framing + the pipeline's decoders + round trip.
    _TARGET.one(data)


_TARGET = VfioMessageTarget()


def _stream(msgs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(Header(i, cmd, HEADER_SIZE + len(p), 0).encode() + p
                    for i, (cmd, p) in enumerate(msgs))


@given(st.lists(st.tuples(st.sampled_from(list(Command)), st.binary(max_size=80)), max_size=8),
       st.lists(st.integers(1, 97), min_size=1, max_size=20))
def test_framer_any_chunking_gives_the_same_messages(msgs, cuts) -> None:
    stream = _stream(msgs)
    f = Framer(1 << 20)
    frames, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        frames += f.feed(stream[pos:pos + n])
        pos += n
        i += 1
    assert [(fr.header.command, fr.payload) for fr in frames] == [(int(c), p) for c, p in msgs]
    assert f.pending_bytes == 0


@given(st.lists(st.tuples(st.sampled_from(list(Command)), st.binary(max_size=40)), min_size=1, max_size=6),
       st.data())
def test_framer_fds_go_to_the_message_of_the_chunks_last_byte(msgs, data) -> None:
    """Each chunk carries one real fd; it must come out with the message holding the
    chunk's last byte (Linux SCM_RIGHTS rule), and every fd is handed out or closed."""
    stream = _stream(msgs)
    ends, acc = [], 0
    for i, (_, p) in enumerate(msgs):
        acc += HEADER_SIZE + len(p)
        ends.append(acc)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=5)) + [len(stream)]))
    f = Framer(1 << 20)
    expect: dict[int, list[int]] = {}
    frames, start = [], 0
    for cut in cuts:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        owner = next(i for i, e in enumerate(ends) if cut - 1 < e)
        expect.setdefault(owner, []).append(fd)
        frames += f.feed(stream[start:cut], [fd])
        start = cut
    try:
        for i, fr in enumerate(frames):
            assert fr.fds == expect.get(i, []), (i, fr.fds, expect)
    finally:
        for fr in frames:
            fr.close()


@given(st.binary(min_size=HEADER_SIZE, max_size=200))
def test_framer_garbage_is_stream_error_and_closes_fds(data: bytes) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    f = Framer(4096)
    try:
        frames = f.feed(data, [fd])
    except StreamError:
        with pytest.raises(OSError):
            os.fstat(fd)                       # the framer closed it
        return
    for fr in frames:
        fr.close()
    f.close()
    with pytest.raises(OSError):
        os.fstat(fd)                           # handed out and closed, or closed by close()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=30)
CAPS = st.fixed_dictionaries({}, optional={
    "max_msg_fds": st.integers(-2, 2000), "max_data_xfer_size": st.integers(-1, 1 << 27),
    "pgsizes": st.integers(0, 1 << 20), "max_dma_maps": st.integers(0, 1 << 32),
    "migration": JSON, "twin_socket": JSON, "write_multiple": JSON, "x": JSON})


@given(st.one_of(JSON, st.fixed_dictionaries({"capabilities": CAPS})), st.integers(0, 400))
def test_negotiation_bounded_and_reply_fits(doc, extra: int) -> None:
    text = json.dumps(doc)
    payload = Version(0, 0, text).encode()
    try:
        caps = parse_client_version(payload)
    except ProtocolError:
        return
    assert 1 <= caps.max_msg_fds <= 1024 and 1 <= caps.max_data_xfer_size <= 64 << 20
    size = HEADER_SIZE + len(payload) + extra
    reply = build_server_version(caps, size)
    assert HEADER_SIZE + len(reply.encode()) <= size
    if reply.json:
        offered = json.loads(reply.json)["capabilities"]
        assert set(offered) <= caps.proposed
        assert "write_multiple" not in offered and "twin_socket" not in offered


@given(st.integers(1, 3000))
def test_deep_json_is_einval(depth: int) -> None:
    text = '{"capabilities": {"m": ' + "[" * depth + "]" * depth + "}}"
    if depth + 2 <= MAX_JSON_DEPTH:
        parse_client_version(Version(0, 0, text).encode())
    else:
        with pytest.raises(ProtocolError):
            parse_client_version(Version(0, 0, text).encode())


OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "find"]), st.integers(0, 40),
                         st.integers(0, 12)), max_size=40)


@given(OPS)
def test_dma_table_matches_a_model(ops) -> None:
    page = 4096
    t = DmaTable(max_regions=8)
    model: dict[int, int] = {}                 # iova -> size
    for op, a, n in ops:
        iova, size = a * page, n * page
        if op == "add":
            overlaps = any(iova < s + z and s < iova + size for s, z in model.items())
            ok = size > 0 and not overlaps and len(model) < 8
            try:
                t.add(iova, size, True, True)
                assert ok, f"add {iova:#x}+{size:#x} accepted over {model}"
                model[iova] = size
            except ProtocolError:
                assert not ok, f"add {iova:#x}+{size:#x} refused, model {model}"
        elif op == "remove":
            try:
                t.remove(iova, size)
                assert model.get(iova) == size
                del model[iova]
            except ProtocolError:
                assert model.get(iova) != size
        else:
            length = max(size, 1)
            inside = [s for s, z in model.items() if s <= iova and iova + length <= s + z]
            try:
                e, off = t.find(iova, length)
                assert inside == [e.iova] and off == iova - e.iova
            except ProtocolError:
                assert not inside
    assert sorted((e.iova, e.size) for e in t) == sorted(model.items())


@given(u64, st.binary(max_size=300), st.sampled_from(list(DmaLayout)))
def test_dma_read_reply_roundtrip(addr: int, data: bytes, layout: DmaLayout) -> None:
    payload = encode_read_reply(addr, data, layout)
    got, _proven = decode_read_reply(payload, addr, len(data), layout)
    assert got == data


@given(u64, st.integers(0, 4096), st.sampled_from([Command.DMA_READ, Command.DMA_WRITE]),
       st.sampled_from(list(DmaLayout)))
def test_dma_request_roundtrip(addr: int, count: int, cmd: int, layout: DmaLayout) -> None:
    data = bytes(count) if cmd == Command.DMA_WRITE else b""
    m = DmaRw(addr, count, data)
    assume(addr + count <= 2**64)
    assert DmaRw.decode(m.encode(cmd, layout), cmd, layout, 1 << 20) == m


@given(st.binary(max_size=64))
def test_device_feature_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        DeviceFeature.decode(data)
    except ProtocolError:
        pass
