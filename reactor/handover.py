"""Packages: state plus file descriptors, moved between vnvmed processes.

Theory of operation
-------------------
A live upgrade (reactor/upgrade.py) moves each controller from one daemon to the
next; front-end crash recovery (issue 12) can move one from a supervisor back into a
restarted front-end.  Both carry the same thing: a plain dict (msgpack-able) and a
list of fds the dict refers to by index (`{"fd": 3}` means `fds[3]`).

On the wire a package is a run of `reactor.ipc` control messages on a SOCK_SEQPACKET
socket, so it can share a control socket with other traffic:

    {"op": "pkg", "id": N, "kind": K, "part": i, "parts": P, "data": <bytes>}

The msgpack encoding of the dict is cut into parts of at most `PART_BYTES` (one
SEQPACKET message must fit the socket's send buffer), and the fds ride on the parts,
at most `ipc.MAX_FDS` per message (the kernel takes at most SCM_MAX_FD = 253 per
sendmsg), so any number of either is fine.  `PackageAssembler.feed()` collects the
parts of each id and returns the whole package when its last part arrived.

fd ownership: `send_package` does not close the caller's fds (the kernel dups them);
the receiver owns what `feed()` returns, and `discard()` closes whatever an
unfinished package had collected.

Versions: every package carries `FORMAT` (major, minor) of the process that wrote it.
A reader accepts its own major with any minor (newer minors only add keys, which it
ignores; older minors lack keys, which it defaults) and refuses another major
(`format_problem`).  `VNVMED_SNAPSHOT_FORMAT=MAJOR.MINOR` makes a process claim
another format as writer and reader: the version-skew tests run a real build that
says it is older or newer (see tests/integration/test_upgrade.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from reactor import ipc

log = logging.getLogger("vnvmed.handover")
FORMAT = (1, 0)
FORMAT_ENV = "VNVMED_SNAPSHOT_FORMAT"
PART_BYTES = 64 * 1024
_ids = itertools.count(1)


def claimed_format(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """FORMAT, or what VNVMED_SNAPSHOT_FORMAT says this build should claim."""
    env = os.environ if environ is None else environ
    text = env.get(FORMAT_ENV, "").strip()
    if not text:
        return FORMAT
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(f"{FORMAT_ENV}={text!r}: use MAJOR.MINOR, e.g. 1.0") from None


def format_problem(theirs: Any, mine: tuple[int, int]) -> str | None:
    """Why a package of format `theirs` cannot be read by a reader of format `mine`."""
    try:
        major, minor = int(theirs[0]), int(theirs[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return f"snapshot format {theirs!r} is not MAJOR.MINOR"
    if major > mine[0]:
        return (f"snapshot format {major}.{minor} is newer than this build's {mine[0]}.{mine[1]}; "
                f"upgrade to a build that reads it")
    if major < mine[0]:
        return f"snapshot format {major}.{minor} is older than any this build ({mine[0]}.{mine[1]}) reads"
    return None


class PackageError(Exception):
    pass


# ------------------------------------------------------------------------- sending
def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int], deadline: float) -> None:
    while True:
        try:
            ipc.send(sock, msg, fds)
            return
        except (BlockingIOError, InterruptedError):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("package: peer does not read its socket") from None
            p = select.poll()
            p.register(sock, select.POLLOUT)
            p.poll(int(left * 1000) + 1)


def send_package(sock: socket.socket, kind: str, state: dict[str, Any], fds: list[int],
                 timeout: float = 10.0, **extra: Any) -> None:
    """Send `state` and `fds` as one package of `kind`; `extra` goes into every part."""
    data = msgpack.packb(state, use_bin_type=True)
    nparts = max(1, -(-len(data) // PART_BYTES), -(-len(fds) // ipc.MAX_FDS))
    pid = next(_ids)
    deadline = time.monotonic() + timeout
    for i in range(nparts):
        msg = {"op": "pkg", "id": pid, "kind": kind, "part": i, "parts": nparts,
               "data": data[i * PART_BYTES:(i + 1) * PART_BYTES], **extra}
        _send(sock, msg, fds[i * ipc.MAX_FDS:(i + 1) * ipc.MAX_FDS], deadline)


def forward_package(sock: socket.socket, pkg: "Package", timeout: float = 10.0, **extra: Any) -> None:
    """Send a received package on (the caller still owns and closes pkg.fds)."""
    send_package(sock, pkg.kind, pkg.state, pkg.fds, timeout, **{**pkg.extra, **extra})


# ------------------------------------------------------------------------ receiving
@dataclass(slots=True)
class Package:
    kind: str
    state: dict[str, Any]
    fds: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)

    def fd(self, ref: Any) -> int | None:
        """The fd a state entry refers to (an index, or None); the package still owns it."""
        if ref is None:
            return None
        i = int(ref)
        if not 0 <= i < len(self.fds):
            raise PackageError(f"package refers to fd #{i} of {len(self.fds)}")
        return self.fds[i]

    def take(self, ref: Any) -> int | None:
        """Like fd(), but the caller now owns it (close_unused() leaves it alone)."""
        fd = self.fd(ref)
        if fd is not None:
            self.taken.add(fd)
        return fd

    def close(self) -> None:
        """Close every fd, taken or not (a package that is only passed on)."""
        ipc.close_fds(self.fds)
        self.fds = []
        self.taken = set()

    def close_unused(self) -> None:
        """Close every fd nobody took (once the package has been applied or refused)."""
        ipc.close_fds([fd for fd in self.fds if fd not in self.taken])
        self.fds = []
        self.taken = set()


class PackageAssembler:
    """Collects `pkg` messages into packages (one assembler per receiving socket)."""

    def __init__(self) -> None:
        self._parts: dict[int, tuple[list[bytes], list[int]]] = {}

    def feed(self, msg: dict[str, Any], fds: list[int]) -> Package | None:
        pid, part, parts = msg.get("id"), msg.get("part"), msg.get("parts")
        if not isinstance(pid, int) or not isinstance(part, int) or not isinstance(parts, int):
            ipc.close_fds(fds)
            raise PackageError(f"malformed package part {msg!r:.200}")
        chunks, got = self._parts.setdefault(pid, ([], []))
        if part != len(chunks) or part >= parts:
            ipc.close_fds(fds)
            self.discard(pid)
            raise PackageError(f"package {pid}: part {part} out of order")
        chunks.append(bytes(msg.get("data") or b""))
        got.extend(fds)
        if part + 1 < parts:
            return None
        del self._parts[pid]
        try:
            state = msgpack.unpackb(b"".join(chunks), raw=False, strict_map_key=False)
        except Exception as e:
            ipc.close_fds(got)
            raise PackageError(f"package {pid}: undecodable: {e}") from e
        if not isinstance(state, dict):
            ipc.close_fds(got)
            raise PackageError(f"package {pid}: not a map")
        extra = {k: v for k, v in msg.items() if k not in ("op", "id", "kind", "part", "parts", "data")}
        return Package(str(msg.get("kind")), state, got, extra)

    def discard(self, pid: int | None = None) -> None:
        """Close the fds of one unfinished package (or of all)."""
        for k in list(self._parts) if pid is None else [pid]:
            entry = self._parts.pop(k, None)
            if entry is not None:
                ipc.close_fds(entry[1])


class FdTable:
    """Builds a package's fd list: `ref(fd)` gives the index to put in the state."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._index: dict[int, int] = {}

    def ref(self, fd: int | None) -> int | None:
        if fd is None:
            return None
        i = self._index.get(fd)
        if i is None:
            i = self._index[fd] = len(self.fds)
            self.fds.append(fd)
        return i


def read_all(sock: socket.socket, on_message: Any, on_eof: Any) -> None:
    """A loop reader for a handover socket: every message waiting now goes to
    `on_message(msg, fds)` (which owns the fds); end of file (or a broken socket) stops
    the reader and calls `on_eof()`."""
    while True:
        try:
            msg, fds = ipc.recv(sock)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as e:
            log.error("handover socket: %s", e)
            msg, fds = None, []
        if msg is None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            on_eof()
            return
        on_message(msg, fds)
