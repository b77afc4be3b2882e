"""The sans-I/O framer: message boundaries, fd attribution, fd ownership."""
import os

import pytest

from vfio_user.errors import StreamError
from vfio_user.framing import Framer
from vfio_user.wire import Header


def msg(mid, payload=b"", cmd=4):
    return Header(mid, cmd, 16 + len(payload)).encode() + payload


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def efds(n):
    return [os.eventfd(0) for _ in range(n)]


def test_split_and_joined_messages():
    f = Framer(4096)
    raw = msg(1, b"abcd") + msg(2) + msg(3, b"x" * 100)
    out = []
    for i in range(0, len(raw), 7):
        out += f.feed(raw[i:i + 7])
    assert [(fr.header.msg_id, fr.payload) for fr in out] == [(1, b"abcd"), (2, b""),
                                                             (3, b"x" * 100)]
    assert f.pending_bytes == 0


def test_fds_belong_to_message_of_chunks_first_byte():
    f = Framer(4096)
    a, b = efds(1), efds(2)
    m1, m2 = msg(1, b"1" * 20), msg(2, b"2" * 20)
    out = f.feed(m1[:10], a)                    # fds with message 1's first chunk
    out += f.feed(m1[10:] + m2[:5], b)          # chunk starts inside message 1
    out += f.feed(m2[5:])
    assert out[0].fds == a + b and out[1].fds == []
    for fr in out:
        fr.close()
    assert not any(map(is_open, a + b))


def test_fds_of_a_chunk_starting_a_message():
    f = Framer(4096)
    a = efds(1)
    m1, m2 = msg(1), msg(2, b"zz")
    out = f.feed(m1)
    out += f.feed(m2, a)
    assert out[0].fds == [] and out[1].fds == a
    assert out[1].take_fds() == a
    out[1].close()
    assert is_open(a[0])                       # taken: owned by the caller now
    os.close(a[0])


@pytest.mark.parametrize("hdr", [Header(1, 4, 15), Header(1, 4, 5000), Header(1, 4, 16, 0x5)])
def test_bad_headers_raise_and_close_pending_fds(hdr):
    f = Framer(4096)
    a = efds(2)
    f.feed(msg(7, b"p" * 30)[:20], a[:1])      # incomplete message holding an fd
    with pytest.raises(StreamError):
        f.feed(msg(7, b"p" * 30)[20:] + hdr.encode(), a[1:])
    assert not any(map(is_open, a))


def test_close_releases_buffered_fds():
    f = Framer(4096)
    a = efds(3)
    f.feed(msg(1, b"y" * 40)[:17], a)
    f.close()
    assert not any(map(is_open, a)) and f.pending_bytes == 0


def test_fds_with_empty_chunk_closed():
    f = Framer(4096)
    a = efds(1)
    assert f.feed(b"", a) == []
    assert not is_open(a[0])
