"""Sans-I/O framing of a vfio-user byte stream with SCM_RIGHTS fds.

`Framer.feed(chunk, fds)` appends bytes and returns every message that is now
complete.  File descriptors arrive as SCM_RIGHTS with some `recvmsg` chunk.  On a
Linux AF_UNIX stream socket one `recvmsg` copies queued skbs one after the other and
stops right *after* the first skb that carries fds (unix_stream_read_generic): the
fds therefore belong to the message that contains the chunk's *last byte*, and bytes
of earlier fd-less messages may precede them in the same chunk.  (The fds ride on the
first skb of the sender's sendmsg, so the last byte of the chunk always lies in the
message they were sent with.)  QEMU pipelines DMA_UNMAP/DMA_MAP during memory
transactions, so attributing fds to a chunk's first byte hands a DMA_MAP's memfd to
the DMA_UNMAP before it: the map then looks fd-less and every access to guest RAM
needs DMA messages — which is what made SeaBIOS fail to boot.  The framer records
the stream offset of each chunk's fds and hands them out with the message covering
that offset.

fd ownership: every fd fed in is either handed out inside a `Frame` (the receiver
then owns it: `take_fds()` or `close()`) or closed by the framer (on a framing
error, on `close()`).  Nothing leaks.

A header whose size is < 16 or above the limit, or whose type bits are garbage,
means the stream can no longer be trusted: `StreamError`, and the caller drops the
connection.  Used by the server transport and by the test client.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .scm import close_fds  # noqa: F401  (re-exported: framing users close fds with it)
from .wire import HEADER_SIZE, Header


@dataclass(slots=True)
class Frame:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False   # the kernel dropped some (MSG_CTRUNC)
    seq: int = 0                  # request journal number (reactor/rescue.py), 0 = none

    def take_fds(self) -> list[int]:
        """Hand over ownership of the fds; the frame no longer closes them."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []


def whole_frames(data: bytes, max_size: int) -> list[int]:
    """End offsets of the complete messages at the start of `data` (a stream chunk that
    begins on a message boundary); stops at a partial message or a bad header (the
    framer, fed those bytes, raises on the latter)."""
    ends: list[int] = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        try:
            hdr = Header.decode(data[pos:pos + HEADER_SIZE])
            hdr.validate_framing(max_size)
        except Exception:
            break
        if len(data) - pos < hdr.size:
            break
        pos += hdr.size
        ends.append(pos)
    return ends


class Framer:
    """Bytes + fds in, complete `Frame`s out.  Sans-I/O."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._base = 0                                  # stream offset of _buf[0]
        self._fds: deque[tuple[int, list[int], bool]] = deque()  # (offset, fds, ctrunc)

    def feed(self, data: bytes, fds: list[int] | None = None,
             truncated: bool = False) -> list[Frame]:
        if fds or truncated:
            # fds of an empty chunk (EOF) belong to nothing: close them.
            if not data:
                close_fds(fds or [])
            else:
                last = self._base + len(self._buf) + len(data) - 1
                self._fds.append((last, list(fds or []), truncated))
        self._buf += data
        out: list[Frame] = []
        try:
            while len(self._buf) >= HEADER_SIZE:
                hdr = Header.decode(self._buf)
                hdr.validate_framing(self.max_size)
                if len(self._buf) < hdr.size:
                    break
                end = self._base + hdr.size
                frame = Frame(hdr, bytes(self._buf[HEADER_SIZE:hdr.size]))
                while self._fds and self._fds[0][0] < end:
                    _, fds, trunc = self._fds.popleft()
                    frame.fds.extend(fds)
                    frame.fds_truncated |= trunc
                del self._buf[:hdr.size]
                self._base = end
                out.append(frame)
        except Exception:
            for f in out:
                f.close()
            self.close()
            raise
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def export(self) -> tuple[bytes, list[tuple[int, int, bool]], list[int]]:
        """The partial message held now, for a handover to another process.

        Returns (bytes, [(offset in those bytes, fd count, truncated)], fds): the fds
        stay ours (the caller sends copies); `adopt` rebuilds the same state.
        """
        marks = [(off - self._base, len(f), trunc) for off, f, trunc in self._fds]
        return bytes(self._buf), marks, [fd for _, f, _ in self._fds for fd in f]

    def adopt(self, data: bytes, marks: list[tuple[int, int, bool]], fds: list[int]) -> None:
        """Take over another framer's partial message (see `export`); we own the fds."""
        if self._buf or self._fds:
            raise ValueError("adopt() needs an empty framer")
        pos = 0
        for off, n, trunc in marks:
            if not 0 <= off < len(data) or pos + n > len(fds):
                close_fds(fds)
                raise ValueError("partial-message fd marks do not fit the bytes")
            self._fds.append((self._base + off, list(fds[pos:pos + n]), bool(trunc)))
            pos += n
        close_fds(fds[pos:])
        self._buf += data

    def close(self) -> None:
        """Drop buffered bytes and close every fd not yet handed out."""
        while self._fds:
            close_fds(self._fds.popleft()[1])
        self._buf.clear()
