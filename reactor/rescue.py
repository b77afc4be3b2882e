"""Front-end crash recovery, the recording side: what a restarted front-end needs, kept
outside this process while it runs (issue 12; the taking side is reactor/revive.py).

Theory of operation
-------------------
A SIGKILLed front-end loses its memory; the supervisor, its workers and the client
live on.  Two things are kept outside it, so a new front-end can carry on with the
same connection:

1. The *rescue package* (reactor/handover.py, kind "rescue"), sent to the supervisor,
   which keeps it (dups of every fd): the BAR0 memfd (the page the client maps), the
   queue-table memfd (nvme/qtable.py: every queue's live head/tail/phase and the crash
   journals), the checkpoint memfd (below), the listening socket, and - with a client -
   the connected socket, its negotiated capabilities and DMA layout, every DMA region
   with its fd and every interrupt eventfd.  It is re-sent whenever that set changes
   (accept/negotiation, DMA_MAP/UNMAP, SET_IRQS, disconnect), *before* the request that
   changed it is answered: a client that saw its DMA_MAP answered finds that region in
   any front-end that follows.  On a disconnect the supervisor drops its dup of the
   connection, so the client still sees our end close.
2. The *checkpoint*: the device state (reactor/devstate.save_state: controller model,
   PCI config, doorbell page) in a memfd only this process writes, double-buffered:
   a header of two (sequence, length, crc32) slots; a write goes to the slot holding the
   older sequence and stores its sequence last, so a crash in the middle of a write
   leaves the newer copy whole.  Written after every vfio-user request that may change
   device state (not after reads or doorbell writes) before its reply is sent, after
   every admin command before its CQE is posted, after each admin poll that did work
   (AER completions), and after management calls.  The I/O queue records in it are
   *not* used: the live ones are in the queue table.  Admin commands executed in the
   current poll are listed with their result (`applied`: SQ slot, CID, status, dw0; a
   parked command has status None), so a new front-end posts the CQE of a command whose
   effect is in the checkpoint instead of executing it a second time.

Costs: a checkpoint is one save_state (~6 KB with four I/O queues, ~0.3 ms) per
state-changing request or admin command; none on the I/O path.
"""
from __future__ import annotations

import logging
import mmap
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from reactor import devstate
from reactor.connmove import save_session
from reactor.handover import FdTable, claimed_format, send_package
from vfio_user.wire import Command, Header, MsgType

if TYPE_CHECKING:
    from reactor.frontend import FrontEnd

log = logging.getLogger("vnvmed.frontend")

AREA_BYTES = 4 * 1024 * 1024     # header page, two checkpoint slots, the request journal
HEADER = 4096
SLOT_BYTES = 1024 * 1024
INBOX_OFF = HEADER + 2 * SLOT_BYTES
INBOX_BYTES = AREA_BYTES - INBOX_OFF
DONE_WORD = 16                   # header u64: every journaled request up to this seq is answered
REC = 16                         # journal record header: u64 seq, u64 length | nfds << 32 | UNTAKEN
UNTAKEN = 1 << 63                # record flag: journaled from a peek, maybe still in the socket
# vfio-user requests that never change device state: no checkpoint after them.
READ_ONLY = frozenset({Command.REGION_READ, Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO,
                       Command.DEVICE_GET_REGION_IO_FDS, Command.DEVICE_GET_IRQ_INFO})


@dataclass
class Journaled:
    seq: int
    raw: bytes          # header + payload
    nfds: int
    off: int = 0        # journal offset of the record
    untaken: bool = False   # journaled from a peek; maybe never taken off the socket


class CheckpointArea:
    """The checkpoint memfd (writer and reader; see the module doc).

    Header words (u64): checkpoint slot i at 4*i: sequence, length, crc32 of the data;
    DONE_WORD: the request journal's answered sequence.  The journal: records of
    (seq, length | nfds << 32, bytes padded to 8) from INBOX_OFF; a record's seq is
    zeroed first and stored last, and a walk stops at a seq that does not grow."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("vnvmed-checkpoint", os.MFD_CLOEXEC)
            os.ftruncate(fd, AREA_BYTES)
        self.fd = fd
        self.map = mmap.mmap(fd, AREA_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.map).cast("Q")
        self.seq = max(self.words[0], self.words[4])

    def write(self, data: bytes) -> None:
        if len(data) > SLOT_BYTES:
            raise ValueError(f"checkpoint of {len(data)} bytes exceeds its slot ({SLOT_BYTES})")
        w = self.words
        slot = 0 if w[0] <= w[4] else 1          # the older one
        off = HEADER + slot * SLOT_BYTES
        self.map[off:off + len(data)] = data
        self.seq += 1
        w[4 * slot + 1] = len(data)
        w[4 * slot + 2] = zlib.crc32(data)
        w[4 * slot] = self.seq                     # last: this copy counts from now on

    def read(self) -> tuple[int, bytes] | None:
        """(sequence, data) of the newest whole copy, or None."""
        best: tuple[int, bytes] | None = None
        for slot in (0, 1):
            seq, n, crc = self.words[4 * slot], self.words[4 * slot + 1], self.words[4 * slot + 2]
            if not seq or n > SLOT_BYTES:
                continue
            off = HEADER + slot * SLOT_BYTES
            data = bytes(self.map[off:off + n])
            if zlib.crc32(data) != crc:
                continue
            if best is None or seq > best[0]:
                best = (seq, data)
        return best

    # -- the request journal ------------------------------------------------------
    @property
    def done(self) -> int:
        return self.words[DONE_WORD]

    def set_done(self, seq: int) -> None:
        self.words[DONE_WORD] = seq

    def append(self, off: int, seq: int, raw: bytes, nfds: int, untaken: bool = False) -> int:
        """Write a record at journal offset `off`; returns the next offset, or -1 (full)."""
        size = REC + ((len(raw) + 7) & ~7)
        if off + size > INBOX_BYTES:
            return -1
        base = INBOX_OFF + off
        w = self.words
        w[base // 8] = 0                           # not a record while half written
        if off + size + REC <= INBOX_BYTES:
            w[(base + size) // 8] = 0              # the walk ends after this record
        w[base // 8 + 1] = len(raw) | (nfds << 32) | (UNTAKEN if untaken else 0)
        self.map[base + REC:base + REC + len(raw)] = raw
        w[base // 8] = seq                         # last
        return off + size

    def mark_taken(self, off: int) -> None:
        """The record at `off` left the socket (one aligned store clears the flag)."""
        i = (INBOX_OFF + off) // 8 + 1
        self.words[i] = self.words[i] & ~UNTAKEN

    def journal(self) -> tuple[list[Journaled], int, int]:
        """(records after the answered seq, last seq seen, offset after the last record)."""
        out: list[Journaled] = []
        off, prev, done = 0, 0, self.done
        while off + REC <= INBOX_BYTES:
            base = INBOX_OFF + off
            seq, ln = self.words[base // 8], self.words[base // 8 + 1]
            n, nfds = ln & 0xFFFFFFFF, (ln & ~UNTAKEN) >> 32
            if seq <= prev or off + REC + n > INBOX_BYTES:
                break
            if seq > done:
                out.append(Journaled(seq, bytes(self.map[base + REC:base + REC + n]), nfds, off,
                                     bool(ln & UNTAKEN)))
            prev = seq
            off += REC + ((n + 7) & ~7)
        return out, max(prev, done), off

    def close(self) -> None:
        self.words.release()
        self.map.close()


class Rescue:
    """Keeps the supervisor's rescue package and the checkpoint current (front-end side)."""

    def __init__(self, fe: "FrontEnd", area: CheckpointArea | None = None) -> None:
        self.fe = fe
        self.area = area if area is not None else CheckpointArea()
        self.sig: Any = None            # the fd set last sent
        self.applied: list[list[Any]] = []
        self.head0: int | None = None   # admin SQ head published when this poll began
        self.k = 0                      # admin SQEs executed in this poll
        self.writes = 0
        self.migrating_written = False  # the last checkpoint written says "migrating"
        self.sends = 0
        self.enabled = True
        self.counts: dict[str, int] = {}  # revivals so far (carried by the checkpoint)
        # The request journal (module doc): last seq given, next offset, answered seq,
        # fds of journaled requests not answered yet (they travel in the package).
        self.in_seq = self.area.done
        self.in_off = 0
        self.done = self.area.done
        self.inbox_fds: dict[int, list[int]] = {}
        self._untaken: list[int] = []         # offsets of records peeked, not yet taken
        self.reply: list[Any] | None = None     # [seq, reply bytes] of the last state change
        self.unjournaled = 0

    # ------------------------------------------------------------ the package
    def _signature(self) -> Any:
        fn, server = self.fe.fn, self.fe.server
        assert fn is not None and server is not None
        s = server.session
        sfd = s.transport.sock.fileno() if s is not None and not s._closed and s.negotiated else None
        r = fn.irqs
        return (sfd, tuple(sorted((k, v[1]) for k, v in fn.dma_regions.items())),
                tuple(sorted(r.msix.items())), r.intx, r.intx_unmask, tuple(sorted(r.other.items())),
                r.intx_masked, s.dma_layout if s is not None else None)

    def send(self, force: bool = False) -> None:
        """Send the package if the fd set changed (the caller has not replied yet)."""
        if not self.enabled:
            return
        sig = self._signature()
        if sig == self.sig and not force:
            return
        fe = self.fe
        fn, server = fe.fn, fe.server
        assert fn is not None and server is not None
        fds = FdTable()
        sock, ino = server.listening
        s = server.session
        session = None
        if sig[0] is not None and s is not None:
            session = save_session(s, fds, pending=False)
        r = fn.irqs
        st = {"format": list(claimed_format()), "name": fe.spec.name, "bar": fds.ref(fn.bar_fd),
              "qt": fds.ref(fn.qt_fd), "ckpt": fds.ref(self.area.fd), "listen": fds.ref(sock.fileno()),
              "ino": list(ino) if ino else None, "sessions_served": server.sessions_served,
              "session": session, "reply": self.reply,
              "inbox_fds": [[seq, [fds.ref(fd) for fd in f]] for seq, f in sorted(self.inbox_fds.items())],
              "device": {"regions": [[iova, size, off, fds.ref(fd), rd, wr]
                                     for (iova, size), (off, fd, rd, wr) in fn.dma_regions.items()],
                         "irqs": {"msix": [[v, fds.ref(fd)] for v, fd in r.msix.items()],
                                  "intx": fds.ref(r.intx), "intx_unmask": fds.ref(r.intx_unmask),
                                  "other": [[k, fds.ref(fd)] for k, fd in r.other.items()],
                                  "intx_masked": r.intx_masked}}}
        send_package(fe.sup, "rescue", st, fds.fds)
        self.sig = sig
        self.sends += 1

    # ------------------------------------------------------------ the checkpoint
    def checkpoint(self) -> None:
        if not self.enabled:
            return
        fn = self.fe.fn
        assert fn is not None
        mig = fn.mig
        migrating = bool(not mig.engine.running or mig.held or mig.dirty.active)
        if migrating and self.migrating_written:
            # A take-over refuses a checkpoint taken while migrating (reactor/revive.py),
            # so once one says so, more of them change nothing - and each cost a save
            # inside the migration's blackout (median 8.2 -> 13.0 ms with 5-6 of them).
            return
        try:
            snap = devstate.save_state(fn)
        except Exception as e:          # never fail the request for it: the next one retries
            log.warning("%s: checkpoint not written: %s", fn.name, e, extra={"ratelimit": "checkpoint"})
            return
        st = {"format": list(claimed_format()), "snapshot": snap,
              "admin": {"head0": self.head0, "applied": self.applied}, "reply": self.reply,
              "fatal_reason": fn.fatal_reason, "slow_count": fn.slow.count,
              "quiesces": fn.coord.count, "revival": self.counts,
              # AERs matched with an event whose CQE is not posted yet (reactor/revive.py)
              "aer_out": [[int(c), int(d)] for c, d in fn.ctrl._aer_out],
              "migrating": migrating}
        self.area.write(msgpack.packb(st, use_bin_type=True))
        self.migrating_written = migrating
        self.writes += 1

    # ------------------------------------------------------------ the request journal
    def _record(self, raw: bytes, nfds: int, untaken: bool, msg_id: int) -> int:
        """Journal one request; its seq, or 0 when the journal is full."""
        self.in_seq += 1
        off = 0 if self.done == self.in_seq - 1 else self.in_off   # nothing pending: rewind
        nxt = self.area.append(off, self.in_seq, raw, nfds, untaken)
        if nxt < 0:
            self.unjournaled += 1
            log.warning("%s: request journal full; msg %d is not journaled", self.fe.spec.name,
                        msg_id, extra={"ratelimit": "journal full"})
            return 0
        self.in_off = nxt
        if untaken:
            self._untaken.append(off)
        return self.in_seq

    def peeked(self, raws: list[bytes], fds: list[int]) -> list[int]:
        """Whole messages seen in the socket but not taken off it yet, `fds` (peeked
        duplicates, ours now) on the last one: journal the requests among them flagged
        UNTAKEN and put the fds in the package; their seqs (0: a reply, or not
        journaled).  A take-over finds flagged records still in the socket (a crash
        before `taken`) by peeking it, and reads them from there (reactor/revive.py);
        one taken has its fds in the package, so it runs again whole."""
        if not self.enabled:
            return [0] * len(raws)
        seqs = []
        for i, raw in enumerate(raws):
            hdr = Header.decode(raw[:16])
            mine = fds if i == len(raws) - 1 else []
            seq = 0 if hdr.msg_type == MsgType.REPLY else self._record(raw, len(mine), True, hdr.msg_id)
            if seq and mine:
                self.inbox_fds[seq] = list(mine)
            seqs.append(seq)
        if fds and seqs[-1]:
            self.send(force=True)           # before the take: a taken request has its fds
        return seqs

    def taken(self) -> None:
        """The records `peeked` journaled left the socket (one recvmsg)."""
        for off in self._untaken:
            self.area.mark_taken(off)
        self._untaken.clear()

    def journal(self, frame: Any) -> None:
        """A request came off the socket (before it is queued): record it, and its fds
        in the package, so a new front-end can run it if we die before answering."""
        if not self.enabled:
            return
        seq = self._record(frame.header.encode() + frame.payload, len(frame.fds), False,
                           frame.header.msg_id)
        if not seq:
            return
        frame.seq = seq
        if frame.fds:
            self.inbox_fds[seq] = list(frame.fds)
            self.send(force=True)

    def answered(self, seq: int) -> None:
        """The reply of request `seq` went out (or it needed none)."""
        if seq > self.done:
            self.done = seq
            self.area.set_done(seq)
        for k in [k for k in self.inbox_fds if k <= seq]:
            del self.inbox_fds[k]

    def request_done(self, seq: int, command: int, doorbell_only: bool, reply: bytes | None) -> None:
        """A vfio-user request was handled; its reply is not sent yet."""
        self.inbox_fds.pop(seq, None)        # the handler took or closed them
        if command in READ_ONLY or (command == Command.REGION_WRITE and doorbell_only):
            return
        self.reply = [seq, reply] if seq and reply is not None else None
        self.send()
        self.checkpoint()

    def admin_poll_start(self) -> None:
        # `applied` only means something within one poll (a poll that raised left it)
        self.applied = []
        self.head0 = None
        self.k = 0

    def admin_executed(self, cid: int, res: tuple[int, int] | None) -> None:
        """An admin command ran; its CQE is not posted yet (or it parked)."""
        fn = self.fe.fn
        assert fn is not None
        if self.head0 is None:
            sq = fn.qtable.get_sq(0)
            self.head0 = sq.head if sq is not None else 0
            size = sq.size if sq is not None else 1
        else:
            sq = fn.qtable.get_sq(0)
            size = sq.size if sq is not None else 1
        slot = (self.head0 + self.k) % size
        self.k += 1
        self.applied.append([slot, cid, None if res is None else int(res[0]),
                             0 if res is None else int(res[1])])
        self.checkpoint()

    def admin_poll_end(self, worked: bool) -> None:
        """After a poll: its CQEs are posted and published; AER completions may have gone."""
        if worked or self.applied:
            self.applied = []
            self.head0 = None
            self.checkpoint()
