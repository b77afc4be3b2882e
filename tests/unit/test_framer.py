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


def test_fds_belong_to_message_of_chunks_last_byte():
    f = Framer(4096)
    a, b = efds(1), efds(2)
    m1, m2 = msg(1, b"1" * 20), msg(2, b"2" * 20)
    out = f.feed(m1[:10], a)                    # fds with a chunk that ends inside message 1
    out += f.feed(m1[10:] + m2[:5], b)          # tail of message 1 + start of message 2 (fds: 2)
    out += f.feed(m2[5:])
    assert out[0].fds == a and out[1].fds == b
    for fr in out:
        fr.close()
    assert not any(map(is_open, a + b))


def test_kernel_glues_fdless_bytes_before_an_fd_message_real_socket():
    """The Linux behaviour the rule above relies on, on a real AF_UNIX stream socket.

    QEMU pipelines DMA_UNMAP (no fd) and DMA_MAP (memfd); one recvmsg returns both and
    the memfd must go to the DMA_MAP, not to the message the chunk starts with.
    """
    import array
    import socket
    s, r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.eventfd(0)
    try:
        unmap, mapm = msg(1, b"u" * 24, cmd=3), msg(2, b"m" * 32, cmd=2)
        s.sendmsg([unmap])
        s.sendmsg([mapm], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        data, anc, _, _ = r.recvmsg(65536, socket.CMSG_SPACE(4 * 16))
        got = array.array("i")
        for _, _, d in anc:
            got.frombytes(d)
        assert data == unmap + mapm and len(got) == 1   # one chunk, fds of the 2nd message
        out = Framer(4096).feed(data, list(got))
        assert out[0].header.command == 3 and out[0].fds == []
        assert out[1].header.command == 2 and len(out[1].fds) == 1
        for fr in out:
            fr.close()
    finally:
        s.close()
        r.close()
        os.close(fd)


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


def test_whole_frames_marks_complete_messages_only():
    from vfio_user.framing import whole_frames
    raw = msg(1, b"abcd") + msg(2) + msg(3, b"x" * 100)
    assert whole_frames(raw, 4096) == [20, 36, 152]
    assert whole_frames(raw[:151], 4096) == [20, 36]          # the last one is partial
    assert whole_frames(raw[:10], 4096) == []
    bad = msg(1) + Header(2, 4, 8).encode()                     # size < 16: the framer refuses it
    assert whole_frames(bad, 4096) == [16]
    assert whole_frames(msg(1, b"y" * 5000), 4096) == []        # above the limit
