"""The vfio-user server for ONE controller on ONE listening UNIX socket.

    server = VfioUserServer(path, device, mode=0o600)
    await server.start()          # bind + listen (refuses a live listener's path)
    await server.serve_forever()  # one client at a time, reconnects welcome
    await server.close()

One client at a time: a connection that arrives while a client is being served is
accepted and closed (after a grace of `TEARDOWN_GRACE_S`, see below), so the second
client sees EOF instead of hanging in the backlog.  A client may reconnect the instant
it disconnected (DESIGN §4): its new connection can be accepted before the old
session has read the EOF, so the old session gets `TEARDOWN_GRACE_S` to notice, and
once it is tearing down the new client waits until the teardown ends - never refused.  When a client goes away its session tears down (see
session.py) and the next client is accepted on the same socket; the device keeps
its state across clients (spec "Client Disconnection").

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
from typing import TYPE_CHECKING

from .session import Session

if TYPE_CHECKING:
    from .device import VfioDevice

log = logging.getLogger("vnvmed.vfio")
TEARDOWN_GRACE_S = 0.5    # how long a served session has to show it is going away


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
        self._accept: asyncio.Future[tuple[socket.socket, object]] | None = None
        self._session_done = asyncio.Event()
        self._closed = asyncio.Event()

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

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                self._accept = asyncio.ensure_future(loop.sock_accept(self._sock))
                try:
                    conn, _ = await self._accept
                except asyncio.CancelledError:
                    if self._closing:
                        return
                    raise
                except OSError as e:
                    if self._closing:
                        return
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed: %s", e)
                        await asyncio.sleep(0.1)
                        continue
                    raise
                if self.session is not None and not await self._after_teardown(self.session):
                    log.warning("%s: refusing a second client while one is served", self.path)
                    conn.close()
                    continue
                self._start_session(conn)
        except asyncio.CancelledError:
            if not self._closing:
                raise

    async def _after_teardown(self, session: Session) -> bool:
        """True once `session` (whose client disconnected) has torn down; False if its
        client is still being served after TEARDOWN_GRACE_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TEARDOWN_GRACE_S
        while not session.closing:
            if loop.time() >= deadline or self._closing:
                return False
            await asyncio.sleep(0.005)
        await self._session_done.wait()
        return not self._closing

    def _start_session(self, conn: socket.socket) -> None:
        self.sessions_served += 1
        session = Session(conn, self.device, dma_timeout=self.dma_timeout,
                          name=f"{os.path.basename(self.path)}#{self.sessions_served}")
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
