"""Management server: newline-delimited JSON-RPC 2.0 on a UNIX socket (mode 0600).

Theory of operation
-------------------
The supervisor owns a ``ManagementApi`` object and starts ``MgmtServer(api,
path)`` inside its asyncio loop.  Each connection is read line by line; each
line goes through ``jsonrpc.decode`` -> ``bind`` against ``METHODS`` -> the
API coroutine -> a reply line.  Nothing a client sends can stop the server: a
malformed line gets -32700, a bad request -32600, an unknown method -32601,
bad params -32602, an ``MgmtError`` its own code, and any other exception
(our bug, not the client's) -32603 with the traceback in the log.

The socket is chmod'ed to 0600 between bind() and listen(): connect() checks
permissions at connect time and nobody can connect before listen(), so there
is no window where the socket is open to others.  A stale socket file left by
a crashed daemon is replaced; a live one (connect succeeds) is not - two
daemons on one run dir would fight over the same controller sockets.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
from typing import Any, Protocol

from ops.mgmt import jsonrpc as rpc
from ops.mgmt.jsonrpc import MethodSpec, MgmtError, Param

log = logging.getLogger("vnvmed.mgmt")


class ManagementApi(Protocol):
    """Implemented by the supervisor; every method may raise MgmtError(message, code=-32000)."""

    async def controller_list(self) -> list[dict]: ...
    async def controller_add(self, name: str, socket: str, **opts: Any) -> dict: ...
    async def controller_remove(self, name: str, force: bool = False) -> dict: ...
    async def controller_save(self, name: str, resume: bool = False) -> dict: ...
    async def controller_resume(self, name: str) -> dict: ...
    async def namespace_add(self, ctrl: str, spec: str, nsid: int | None = None, block_size: int = 512,
                            read_only: bool = False) -> dict: ...
    async def namespace_remove(self, ctrl: str, nsid: int) -> dict: ...
    async def namespace_resize(self, ctrl: str, nsid: int, size: str) -> dict: ...
    async def stats(self, ctrl: str | None = None) -> dict: ...
    async def workers(self) -> list[dict]: ...
    async def backends(self) -> list[dict]: ...
    async def upgrade(self, exec: str | None = None, timeout: float | None = None) -> dict: ...


_S, _I, _B, _N = (str,), (int,), (bool,), (type(None),)

# controller.add extras mirror the [[controllers]] keys of the config file, so
# the supervisor can feed them to ops.config.controller_from_options.
CONTROLLER_ADD_OPTIONS = (
    Param("serial", _S, False), Param("model", _S, False), Param("max_io_queues", _I, False),
    Param("mqes", _I, False), Param("mdts", _I, False), Param("socket_owner", _S, False),
    Param("socket_group", _S, False), Param("socket_mode", (int, str), False),
    Param("allow_world_socket", _B, False), Param("doorbells", _S, False),
    Param("message_write_windows", (str, list), False),
)

METHODS: dict[str, MethodSpec] = rpc.method_table([
    MethodSpec("controller.list", "controller_list", doc="controllers with state and namespaces"),
    MethodSpec("controller.add", "controller_add", (Param("name", _S), Param("socket", _S)),
               CONTROLLER_ADD_OPTIONS, doc="create a controller listening on a new socket"),
    MethodSpec("controller.remove", "controller_remove",
               (Param("name", _S), Param("force", _B, False, False)),
               doc="stop a controller (force: even with a client connected)"),
    MethodSpec("controller.save", "controller_save",
               (Param("name", _S), Param("resume", _B, False, False)),
               doc="the controller's state as a snapshot (base64); it stays stopped unless resume"),
    MethodSpec("controller.resume", "controller_resume", (Param("name", _S),),
               doc="run a controller that controller.save left stopped"),
    MethodSpec("namespace.add", "namespace_add",
               (Param("ctrl", _S), Param("spec", _S), Param("nsid", _I + _N, False, None),
                Param("block_size", _I, False, 512), Param("read_only", _B, False, False)),
               doc="attach KIND:ARG (ram:SIZE, null:SIZE, file:PATH[,direct], nbd:URI, rbd:POOL/IMAGE)"),
    MethodSpec("namespace.remove", "namespace_remove", (Param("ctrl", _S), Param("nsid", _I)),
               doc="detach a namespace"),
    MethodSpec("namespace.resize", "namespace_resize",
               (Param("ctrl", _S), Param("nsid", _I), Param("size", (str, int))),
               doc="change a namespace's size (SIZE like 2G)"),
    MethodSpec("stats", "stats", (Param("ctrl", _S + _N, False, None),),
               doc="per controller/queue/worker counters"),
    MethodSpec("workers", "workers", doc="worker processes, cores and queue assignments"),
    MethodSpec("backends", "backends", doc="namespace kinds this daemon can serve (nbd/rbd need Debian bindings)"),
    MethodSpec("daemon.upgrade", "upgrade",
               (Param("exec", _S + _N, False, None), Param("timeout", (int, float) + _N, False, None)),
               doc="live upgrade: hand every controller to a new daemon started from the installed "
                   "code (or exec), without disconnecting any VM"),
])


async def dispatch(api: Any, req: rpc.Request) -> dict[str, Any]:
    """Run one request against the API object; always returns a reply dict, never raises."""
    spec = METHODS.get(req.method)
    if req.method == "rpc.methods":   # self-description for humans poking with socat
        return rpc.result(req.id, {s.name: {"params": [p.name for p in (*s.params, *s.extra)], "doc": s.doc}
                                   for s in METHODS.values()})
    if spec is None:
        return rpc.error(req.id, rpc.ErrorCode.METHOD_NOT_FOUND,
                         f"unknown method {req.method!r}; available: {', '.join(METHODS)}")
    try:
        kwargs = rpc.bind(spec, req.params)
        if spec.name == "namespace.resize":
            kwargs["size"] = str(kwargs["size"])   # the API takes a size string ("2G" or "4096")
        value = await getattr(api, spec.attr)(**kwargs)
        rpc.encode(value)   # fail here (-32603) rather than mid-write if it is not JSON
        return rpc.result(req.id, value)
    except MgmtError as e:
        return rpc.error(req.id, e.code, e.message, e.data)
    except asyncio.CancelledError:
        raise
    except Exception as e:   # our bug, not the client's: say so, keep serving
        log.exception("management method %s failed", req.method)
        return rpc.error(req.id, rpc.ErrorCode.INTERNAL_ERROR, f"internal error in {req.method}: "
                         f"{type(e).__name__}: {e}")


async def handle_line(api: Any, line: bytes) -> bytes:
    incoming = rpc.decode(line)
    replies: list[dict[str, Any]] = []
    for item in incoming.items:
        if isinstance(item, dict):
            replies.append(item)
            continue
        reply = await dispatch(api, item)
        if not item.notification:
            replies.append(reply)
    return rpc.encode_replies(incoming, replies)


def _claim_path(path: str) -> None:
    """Remove a stale socket file; refuse if a live daemon answers or the path is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)   # stale: nobody listens
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another vnvmed is already serving {path}")


_KEEP_SOCKET_FILE: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}


class MgmtServer:
    """asyncio UNIX-socket JSON-RPC server; start() inside a running loop, close() to stop."""

    def __init__(self, api: Any, path: str, mode: int = 0o600) -> None:
        self.api = api
        self.path = path
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._held: socket.socket | None = None     # stop_accepting(): our listening socket

    async def _serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        # Python 3.13's asyncio unlinks a UNIX server's socket file when the server closes
        # (cleanup_socket=True by default).  Our listening socket outlives its asyncio
        # server: stop_accepting() closes the server while a live upgrade may still roll
        # back, and a handed-over daemon's close would unlink the path its successor now
        # serves.  close() unlinks the path itself, when it is ours.
        return await asyncio.start_unix_server(self._client, sock=sock, limit=rpc.MAX_LINE + 1,
                                               **_KEEP_SOCKET_FILE)

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        _claim_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, self.mode)   # before listen(): see theory of operation
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._server = await self._serve(sock)
        log.info("management socket listening on %s", self.path)

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a listening socket handed over by the daemon we replace (live upgrade)."""
        self._server = await self._serve(sock)
        log.info("management socket %s taken over", self.path)

    def listening_fd(self) -> int:
        """The listening socket, for a live upgrade (the caller sends a copy)."""
        if self._held is not None:
            return self._held.fileno()
        assert isinstance(self._server, asyncio.Server)
        return self._server.sockets[0].fileno()

    def stop_accepting(self) -> None:
        """Leave new connections to the daemon we hand over to; ours are still served."""
        if not isinstance(self._server, asyncio.Server) or self._held is not None:
            return
        self._held = socket.socket(fileno=os.dup(self._server.sockets[0].fileno()))
        self._server.close()

    async def resume_accepting(self) -> None:
        if self._held is not None:
            sock, self._held = self._held, None
            self._server = await self._serve(sock)

    async def drain(self, timeout: float) -> None:
        """Let the connections in progress finish (a handed-over daemon answers the
        `upgrade` request), then stop; the socket file now belongs to someone else."""
        if self._server is not None:
            self._server.close()
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=timeout)
        for t in list(self._conns):
            t.cancel()
        if self._held is not None:
            self._held.close()
            self._held = None

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def __aenter__(self) -> "MgmtServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial   # last line without newline, or EOF
                    if not line.strip():
                        break
                except asyncio.LimitOverrunError:
                    # Too long to be a request: answer once and drop the client,
                    # since we cannot find where its next line starts cheaply.
                    writer.write(rpc.encode(rpc.error(None, rpc.ErrorCode.PARSE_ERROR,
                                                      f"request longer than {rpc.MAX_LINE} bytes")))
                    await writer.drain()
                    break
                if line.strip():
                    out = await handle_line(self.api, line)
                    if out:
                        writer.write(out)
                        await writer.drain()
                if reader.at_eof():
                    break
        except (ConnectionError, BrokenPipeError):
            pass   # client went away mid-reply: nothing to answer
        except asyncio.CancelledError:
            pass
        except Exception:   # never let one client take the server down
            log.exception("management connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
