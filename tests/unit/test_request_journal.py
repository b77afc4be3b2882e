"""The front-end's request journal (reactor/rescue.py) and the take-over's reading of
it (reactor/revive.py): records peeked but maybe not taken off the socket."""
import socket

from reactor.rescue import INBOX_OFF, CheckpointArea
from reactor.revive import still_queued
from vfio_user.wire import Header


def msg(mid: int, payload: bytes = b"", cmd: int = 9) -> bytes:
    return Header(mid, cmd, 16 + len(payload)).encode() + payload


def area_with(*records: tuple[int, bytes, bool]) -> CheckpointArea:
    a = CheckpointArea()
    off = 0
    for seq, raw, untaken in records:
        off = a.append(off, seq, raw, 0, untaken)
    return a


def test_untaken_flag_round_trips_and_clears_with_one_store() -> None:
    a = area_with((1, msg(1, b"abc"), False), (2, msg(2, b"defgh"), True), (3, msg(3), True))
    try:
        recs, last, end = a.journal()
        assert [(r.seq, r.untaken, r.nfds) for r in recs] == [(1, False, 0), (2, True, 0), (3, True, 0)]
        assert recs[1].raw == msg(2, b"defgh") and recs[0].off == 0 and last == 3
        a.mark_taken(recs[1].off)
        a.mark_taken(recs[2].off)
        assert [r.untaken for r in a.journal()[0]] == [False, False, False]
        # the flag shares the length word with nfds: both read back intact
        b = CheckpointArea()
        b.append(0, 7, msg(7), 3, True)
        r = b.journal()[0][0]
        assert (r.nfds, r.untaken, r.raw) == (3, True, msg(7))
        assert b.words[INBOX_OFF // 8] == 7
        b.close()
    finally:
        a.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_still_queued_splits_off_records_the_socket_still_holds() -> None:
    a = area_with((1, msg(1), False), (2, msg(2, b"x"), True), (3, msg(3, b"y"), True))
    client, server = _pair()
    try:
        client.sendall(msg(2, b"x") + msg(3, b"y") + msg(4))     # the crash came before the take
        pending = a.journal()[0]
        kept, unread = still_queued(pending, server)
        assert [r.seq for r in kept] == [1] and [r.seq for r in unread] == [2, 3]
        assert unread[0].off == pending[1].off
        # nothing was consumed by looking
        assert server.recv(4096) == msg(2, b"x") + msg(3, b"y") + msg(4)
    finally:
        a.close()
        client.close()
        server.close()


def test_still_queued_keeps_records_that_were_taken() -> None:
    a = area_with((1, msg(1), False), (2, msg(2, b"x"), True))
    client, server = _pair()
    try:
        pending = a.journal()[0]
        # taken, crash before the flag was cleared: the socket is empty ...
        assert still_queued(pending, server) == (pending, [])
        # ... or holds the next request (its msg_id differs)
        client.sendall(msg(3, b"x"))
        assert still_queued(pending, server) == (pending, [])
    finally:
        a.close()
        client.close()
        server.close()


def test_still_queued_without_untaken_records_does_not_touch_the_socket() -> None:
    a = area_with((1, msg(1), False))
    client, server = _pair()
    client.close()
    server.close()                          # a recv on it would raise (EBADF)
    try:
        pending = a.journal()[0]
        assert still_queued(pending, server) == (pending, [])
    finally:
        a.close()
