"""The vfio-user server for ONE controller on ONE listening UNIX socket.

    server = VfioUserServer(path, device, mode=0o600)
    await server.start()          # bind + listen (refuses a live listener's path)
    await server.serve_forever()  # one client at a time, reconnects welcome
    await server.close()

One client at a time.  When a client goes away its session tears down (see
session.py) and the next client is served on the same socket; the device keeps its
state across clients (spec "Client Disconnection").

Admission (DESIGN §4: a client may reconnect the instant it disconnected): a
connection that arrives while a session exists waits in a short queue instead of
being refused.  If the session's client has left (its hang-up is pending, or teardown
is running) the waiter is served as soon as teardown ends (bounded by
TEARDOWN_BOUND).  If the session's client is still connected after LIVE_GRACE, the
waiter is a genuine second client: it is closed (EOF, not a hang in the backlog), and
that log line is rate-limited, since any local user who can reach the socket can
produce it.  More than MAX_WAITING waiters are closed at once.

Live upgrade (reactor/connmove.py): `hold_accepting()` stops accepting between two
accepts (a client that connects meanwhile waits in the backlog), `adopt()` serves a
listening socket another process bound, `adopt_session()` a connection it served, and
`waiting()` / `enqueue()` move the admission queue.  Accepting is a
readiness wait plus a non-blocking accept(), so cancelling the wait can never drop a
connection the kernel already handed to us.

Device-specific behaviour lives behind `VfioDevice` (device.py); nothing here knows
about NVMe.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections import deque
from typing import TYPE_CHECKING

from .session import Session
from .transport import peer_hung_up

if TYPE_CHECKING:
    from .device import VfioDevice

log = logging.getLogger("vnvmed.vfio")

MAX_WAITING = 4          # connections queued behind a session; more are closed at once
LIVE_GRACE = 0.25        # s a waiter gives a session whose client is still connected
TEARDOWN_BOUND = 20.0    # s a waiter gives a session that is tearing down


class ServerError(Exception):
    pass


class VfioUserServer:
    def __init__(self, path: str, device: "VfioDevice", mode: int = 0o600, *,
                 dma_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.device = device
        self.mode = mode
        self.dma_timeout = dma_timeout
        self.session: Session | None = None
        self.sessions_served = 0
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._closing = False
        self._accept: asyncio.Future[None] | None = None
        self._session_done = asyncio.Event()
        self._closed = asyncio.Event()
        self._waiting: deque[tuple[socket.socket, float]] = deque()
        self._admit_task: asyncio.Task[None] | None = None
        self._accepting = asyncio.Event()
        self._accepting.set()

    async def start(self) -> None:
        self._claim_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            # chmod before listen: until then nobody can connect, so no window.
            os.chmod(self.path, self.mode)
            st = os.stat(self.path)
            self._ino = (st.st_dev, st.st_ino)
            sock.listen(8)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        log.info("vfio-user server listening on %s", self.path)

    def adopt(self, sock: socket.socket, ino: tuple[int, int] | None) -> None:
        """Serve a socket that another process bound and listens on (live upgrade).

        `ino` is the (st_dev, st_ino) of the path when it was bound: close() unlinks
        the path only if it is still that socket file.
        """
        sock.setblocking(False)
        self._sock = sock
        self._ino = ino
        log.info("vfio-user server adopted the listening socket %s", self.path)

    @property
    def listening(self) -> tuple[socket.socket, tuple[int, int] | None]:
        if self._sock is None:
            raise ServerError("not listening")
        return self._sock, self._ino

    def hold_accepting(self) -> None:
        self._accepting.clear()
        if self._accept is not None and not self._accept.done():
            self._accept.cancel()        # only ever waiting for readiness: nothing lost

    def resume_accepting(self) -> None:
        self._accepting.set()

    def waiting(self) -> list[tuple[socket.socket, float]]:
        """Accepted connections waiting for their turn, with since when (they stay queued)."""
        return list(self._waiting)

    def _claim_path(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", self.path)
            os.unlink(self.path)
            return
        except OSError as e:
            raise ServerError(f"{self.path}: cannot probe existing socket: {e}") from e
        finally:
            probe.close()
        raise ServerError(f"{self.path} is already served by a live listener")

    async def serve_forever(self) -> None:
        """Accept clients until `close()`; returns once close() has finished."""
        if self._sock is None:
            raise ServerError("start() first")
        try:
            await self._accept_loop()
        finally:
            if self._closing:
                await self._closed.wait()

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)
        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def _accept_loop(self) -> None:
        assert self._sock is not None   # listen() ran first
        try:
            while not self._closing:
                if not self._accepting.is_set():
                    await self._accepting.wait()
                    continue
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    self._accept = asyncio.ensure_future(self._readable())
                    try:
                        await self._accept
                    except asyncio.CancelledError:
                        if self._closing:
                            return
                        if not self._accepting.is_set():
                            continue     # hold_accepting() cancelled the wait
                        raise
                    continue
                except OSError as e:
                    if self._closing:
                        return
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed: %s", e)
                        await asyncio.sleep(0.1)
                        continue
                    raise
                conn.setblocking(False)
                if self.session is not None or self._waiting:
                    self.enqueue(conn)
                    continue
                self._start_session(conn)
        except asyncio.CancelledError:
            if not self._closing:
                raise

    # ------------------------------------------------------------- admission
    def _refuse(self, conn: socket.socket, reason: str) -> None:
        # Any local user who can reach the socket can trigger this: rate-limited per
        # reason (ops.logsetup.RateLimitFilter).
        log.warning("%s: %s", self.path, reason, extra={"ratelimit": "clients refused"})
        conn.close()

    def enqueue(self, conn: socket.socket, since: float | None = None) -> None:
        if len(self._waiting) >= MAX_WAITING:
            self._refuse(conn, "refusing a client: too many waiting for their turn")
            return
        self._waiting.append((conn, asyncio.get_running_loop().time() if since is None else since))
        if self._admit_task is None or self._admit_task.done():
            self._admit_task = asyncio.create_task(self._admit())

    async def _admit(self) -> None:
        """Serve the waiters in arrival order as sessions end (see the module doc)."""
        loop = asyncio.get_running_loop()
        while self._waiting and not self._closing:
            conn, since = self._waiting[0]
            session = self.session
            if session is None:
                self._waiting.popleft()
                if peer_hung_up(conn):
                    conn.close()        # gave up waiting: nothing to serve
                else:
                    self._start_session(conn)
                continue
            waited = loop.time() - since
            if waited >= TEARDOWN_BOUND or (waited >= LIVE_GRACE and not session.leaving):
                self._waiting.popleft()
                self._refuse(conn, "refusing a second client while one is served"
                             if waited < TEARDOWN_BOUND else
                             "refusing a client: the previous session did not end in time")
                continue
            try:
                await asyncio.wait_for(self._session_done.wait(), 0.02)
            except asyncio.TimeoutError:
                pass

    def _start_session(self, conn: socket.socket) -> None:
        self.sessions_served += 1
        self.adopt_session(Session(conn, self.device, dma_timeout=self.dma_timeout,
                                   name=f"{os.path.basename(self.path)}#{self.sessions_served}"))

    def adopt_session(self, session: Session) -> None:
        """Serve `session` (a new one, or one taken over from another process)."""
        self.session = session

        async def run() -> None:
            try:
                await session.run()
            except Exception:
                log.exception("%s: session failed", session.name)
            finally:
                self.session = None
                self._session_done.set()

        self._session_done.clear()
        self._session_task = asyncio.create_task(run())

    async def wait_session_end(self) -> None:
        await self._session_done.wait()

    async def close(self) -> None:
        self._closing = True
        if self._accept is not None and not self._accept.done():
            self._accept.cancel()       # also unregisters the listening fd
            try:
                await self._accept
            except (asyncio.CancelledError, OSError):
                pass
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
            self._unlink_own_path()
        if self._admit_task is not None:
            self._admit_task.cancel()
        while self._waiting:
            self._waiting.popleft()[0].close()
        task = self._session_task
        if self.session is not None:
            self.session.abort()
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._closed.set()

    def _unlink_own_path(self) -> None:
        # Only remove the socket file if it is still the one we created.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

