"""The management API (JSON-RPC methods served by the supervisor), as a mixin.

Every method either changes nothing and raises MgmtError (a JSON-RPC error with a
message that says what to fix), or completes.  Order of side effects: check everything
first, create resources, tell the front-end, and only then record the change in
`self.cfg` / `FrontProc`, undoing the resources if the front-end refused.
The supervisor (reactor/supervisor.py) provides the process plumbing it uses:
`fronts`, `wprocs`, `cfg`, `prefix`, `_call`, `_ping`, `_add_front`, `_stop_front`,
`_ns_wire`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

from backends.base import Backend, create_backend, parse_size
from ops import notify, schema
from ops.config import (ConfigError, NamespaceSpec, check_namespace, controller_from_options,
                            with_controller)
from ops.mgmt.jsonrpc import ErrorCode, MgmtError

if TYPE_CHECKING:
    from ops.config import DaemonConfig, ControllerSpec
    from reactor.supervisor import FrontProc, WorkerProc

log = logging.getLogger("vnvmed")


class ManagementApiMixin:
    if TYPE_CHECKING:   # what the supervisor provides (reactor/supervisor.py)
        cfg: DaemonConfig
        fronts: dict[str, FrontProc]
        wprocs: dict[int, WorkerProc]
        prefix: str

        async def _call(self, f: FrontProc, method: str, params: dict[str, Any] | None = None,
                        timeout: float = 5.0) -> Any: ...
        async def _ping(self, w: WorkerProc, timeout: float = 1.0) -> dict: ...
        async def _add_front(self, spec: ControllerSpec) -> FrontProc: ...
        async def _stop_front(self, f: FrontProc, timeout: float = 10.0) -> None: ...
        @staticmethod
        def _ns_wire(ns: NamespaceSpec, b: Backend) -> dict[str, Any]: ...

    # ------------------------------------------------------------------ management API
    # Every method either changes nothing and raises MgmtError (a JSON-RPC error with
    # a message that says what to fix), or completes.  Order of side effects: check
    # everything first, create resources, tell the front-end, and only then record
    # the change in self.cfg / FrontProc, undoing the resources if the front-end refused.
    def _front(self, name: str) -> FrontProc:
        f = self.fronts.get(name)
        if f is None:
            raise MgmtError(f"no controller named {name!r} (see: vnvmectl controller list)",
                            ErrorCode.NOT_FOUND)
        return f

    async def _mcall(self, f: FrontProc, method: str, params: dict[str, Any] | None = None,
                     timeout: float = 5.0) -> Any:
        """_call for management: a front-end that does not answer is a refusal, not our bug."""
        try:
            return await self._call(f, method, params, timeout)
        except asyncio.TimeoutError:
            raise MgmtError(f"controller {f.spec.name} did not answer {method} within {timeout:g}s; "
                            f"see the log") from None

    async def controller_list(self) -> list[dict]:
        """One ops.schema.controller_record per controller (the shape vnvmectl reads)."""
        out = []
        for f in self.fronts.values():
            running = f.ctl is not None and f.proc is not None and f.proc.is_alive()
            info, error = None, None
            if running:
                try:
                    info = await self._mcall(f, "info")
                except (MgmtError, OSError) as e:
                    error = str(e)
            out.append(schema.controller_record(
                f.spec.name, f.spec.socket, f.spec.namespaces, info, pid=f.proc.pid if f.proc else None,
                restarts=f.restarts, running=running, error=error))
        return out

    async def controller_add(self, name: str, socket: str, **opts: Any) -> dict:
        try:
            spec = controller_from_options(name, socket, opts, self.cfg.run_dir)
            cfg = with_controller(self.cfg, spec)
        except (ConfigError, ValueError) as e:
            code = ErrorCode.CONFLICT if "already" in str(e) or "duplicate" in str(e) else ErrorCode.APPLICATION
            raise MgmtError(str(e), code) from None
        if _socket_in_use(spec.socket):
            raise MgmtError(f"socket path {spec.socket} is in use by a running server; pick another path",
                            ErrorCode.CONFLICT)
        try:
            await self._add_front(spec)
        except Exception as e:
            raise MgmtError(f"controller {name} not added: {e}") from None
        self.cfg = cfg
        notify.status(f"serving {len(self.fronts)} controller(s) on {len(self.wprocs)} worker(s)")
        return {"name": name, "socket": spec.socket}

    async def controller_remove(self, name: str, force: bool = False) -> dict:
        f = self._front(name)
        if not force:
            info = await self._mcall(f, "info")
            if info.get("client_connected"):
                raise MgmtError(f"controller {name} has a client attached; use --force to remove it anyway",
                                ErrorCode.CONFLICT)
        await self._stop_front(f)
        self.fronts.pop(name, None)
        self.cfg.controllers = [c for c in self.cfg.controllers if c.name != name]
        notify.status(f"serving {len(self.fronts)} controller(s) on {len(self.wprocs)} worker(s)")
        return {"name": name, "removed": True}

    async def controller_save(self, name: str, resume: bool = False) -> dict:
        """The controller's migration snapshot (stopped first; left stopped unless resume)."""
        f = self._front(name)
        return await self._mcall(f, "save", {"resume": resume}, timeout=15.0)

    async def controller_resume(self, name: str) -> dict:
        return await self._mcall(self._front(name), "resume", {}, timeout=15.0)

    async def namespace_add(self, ctrl: str, spec: str, nsid: int | None = None, block_size: int = 512,
                            read_only: bool = False) -> dict:
        f = self._front(ctrl)
        try:
            ns = check_namespace(NamespaceSpec.parse(spec, nsid=nsid, block_size=block_size,
                                                     read_only=read_only))
        except (ConfigError, ValueError) as e:
            raise MgmtError(str(e)) from None
        used = {n.nsid for n in f.spec.namespaces}
        if ns.nsid is None:
            ns.nsid = next(i for i in itertools.count(1) if i not in used)
        elif ns.nsid in used:
            raise MgmtError(f"controller {ctrl} already has namespace {ns.nsid}; pick another nsid",
                            ErrorCode.CONFLICT)
        try:
            b = create_backend(str(ns.kind.value), ns.arg, name_prefix=f"{self.prefix}-{ctrl}",
                               read_only=ns.read_only, **ns.backend_options())
        except Exception as e:
            raise MgmtError(f"namespace not added: {e}") from None
        try:
            await self._mcall(f, "ns_add", {"ns": self._ns_wire(ns, b)})
        except Exception as e:
            b.destroy()
            raise MgmtError(f"namespace not added: {e}") from None
        f.backends[ns.nsid] = b
        f.spec.namespaces.append(ns)
        return {"controller": ctrl, "nsid": ns.nsid, "size": b.size}

    async def namespace_remove(self, ctrl: str, nsid: int) -> dict:
        f = self._front(ctrl)
        if nsid not in f.backends:
            raise MgmtError(f"controller {ctrl} has no namespace {nsid}", ErrorCode.NOT_FOUND)
        await self._mcall(f, "ns_remove", {"nsid": nsid})
        f.backends.pop(nsid).destroy()
        f.spec.namespaces = [n for n in f.spec.namespaces if n.nsid != nsid]
        return {"controller": ctrl, "nsid": nsid, "removed": True}

    async def namespace_resize(self, ctrl: str, nsid: int, size: str | int) -> dict:
        """Grow or shrink a namespace while the controller runs.

        ram: the shm object keeps the size it was created with; the namespace may use
        any block-aligned part of it (shrinking maps nothing new, growing back is free),
        never more.  null: any size.  file (regular): ftruncate — grow before the front-
        end and workers see the new size, shrink after they have all switched (the
        front-end waits for every worker's ack), so no one reads past the new end.
        Block devices are resized outside vnvmed.
        """
        f = self._front(ctrl)
        ns = next((n for n in f.spec.namespaces if n.nsid == nsid), None)
        b = f.backends.get(nsid)
        if ns is None or b is None:
            raise MgmtError(f"controller {ctrl} has no namespace {nsid}", ErrorCode.NOT_FOUND)
        try:
            new = parse_size(size)
        except ValueError as e:
            raise MgmtError(str(e)) from None
        if new % ns.block_size:
            raise MgmtError(f"{new} bytes is not a multiple of the namespace's block size {ns.block_size}")
        kind = ns.kind.value
        old_size = ns.size if ns.size is not None else b.size
        if kind == "ram":
            owner = b.inner if isinstance(b, _Shrunk) else b
            if new > owner.size:
                raise MgmtError(f"a ram namespace cannot grow beyond the {owner.size} bytes it was created "
                                f"with; add a new namespace instead")
            nb: Any = owner if new == owner.size else _Shrunk(owner, new)
            await self._resize_call(f, ns, nb, new)
            f.backends[nsid] = nb    # a restarted front-end gets blocks from nb.size
            ns.arg = str(new)
        elif kind == "null":
            nb = create_backend("null", str(new), name_prefix="", read_only=ns.read_only)
            await self._resize_call(f, ns, nb, new)
            f.backends[nsid] = nb
            b.destroy()
            ns.arg = str(new)
        elif kind in ("nbd", "rbd"):
            raise MgmtError(f"a {kind} namespace is resized on its server or cluster: resize the "
                            "export/image there, then remove and re-add the namespace")
        else:
            await self._resize_file(f, ns, b, new)
        ns.size = new
        log.info("controller %s namespace %d resized from %d to %d bytes", ctrl, nsid, old_size, new)
        return {"controller": ctrl, "nsid": nsid, "size": new, "blocks": new // ns.block_size}

    async def _resize_call(self, f: FrontProc, ns: NamespaceSpec, b: Backend, new: int) -> None:
        wire = self._ns_wire(ns, b)
        wire["blocks"] = new // ns.block_size
        try:
            await self._mcall(f, "ns_resize", {"ns": wire}, timeout=30.0)
        except MgmtError:
            raise
        except Exception as e:
            raise MgmtError(f"namespace not resized: {e}") from None

    async def _resize_file(self, f: FrontProc, ns: NamespaceSpec, b: Backend, new: int) -> None:
        path = ns.arg
        try:
            st = os.stat(path)
        except OSError as e:
            raise MgmtError(f"cannot stat backing file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise MgmtError(f"{path} is not a regular file: resize the device itself, then "
                            f"remove and re-add the namespace")
        if ns.read_only:
            raise MgmtError(f"namespace {ns.nsid} is read-only; its backing file is not resized")
        old = st.st_size
        if new > old:
            try:
                os.truncate(path, new)
            except OSError as e:
                raise MgmtError(f"cannot grow {path} to {new} bytes: {e.strerror}") from None
        try:
            await self._resize_call(f, ns, b, new)   # the front-end reopens the file itself
        except Exception:
            if new > old:
                os.truncate(path, old)
            raise
        if new < old:
            try:
                os.truncate(path, new)
            except OSError as e:   # the namespace is smaller already; the file just kept its tail
                log.error("namespace %d shrunk, but %s not truncated: %s", ns.nsid, path, e.strerror)
        # Our record must carry the new size: a restarted front-end derives blocks from it.
        try:
            nb = create_backend("file", path, name_prefix="", read_only=ns.read_only)
        except Exception as e:
            log.error("namespace %d resized, but %s cannot be reopened: %s", ns.nsid, path, e)
            return
        assert ns.nsid is not None   # a configured namespace always has its NSID
        f.backends[ns.nsid] = nb
        b.destroy()

    async def stats(self, ctrl: str | None = None) -> dict:
        fronts = [self._front(ctrl)] if ctrl else list(self.fronts.values())
        out: dict[str, Any] = {"controllers": {}, "workers": await self._worker_rows()}
        for f in fronts:
            try:
                out["controllers"][f.spec.name] = await self._mcall(f, "stats")
            except Exception as e:
                out["controllers"][f.spec.name] = {"error": str(e) or type(e).__name__}
        return out

    async def workers(self) -> list[dict]:
        return await self._worker_rows()

    async def backends(self) -> list[dict]:
        """Which namespace kinds this daemon's Python can serve, and why not."""
        import sys
        from backends.registry import availability
        return [{"kind": k, "available": v["available"], "detail": v["detail"], "python": sys.executable}
                for k, v in availability().items()]

    async def _worker_rows(self) -> list[dict]:
        out = []
        for w in self.wprocs.values():
            row: dict[str, Any] = {"id": w.wid, "core": w.core, "pid": w.proc.pid if w.proc else None,
                                   "alive": bool(w.proc and w.proc.is_alive()), "restarts": w.restarts,
                                   "datapath": getattr(self, "datapath", None)}
            try:
                pong = await self._ping(w, 1.0)
                row.update({k: pong.get(k) for k in ("polls", "idle", "sleeps", "queues", "slots")})
                row["responsive"] = True
            except Exception:
                row["responsive"] = False
            out.append(row)
        return out


def _socket_in_use(path: str) -> bool:
    """True if something accepts connections on the UNIX socket at `path`."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class _Shrunk:
    """A ram backend of which the namespace uses only the first `size` bytes.

    The shm object keeps its created size (workers attach to it by name; nothing is
    remapped), but everything that derives the namespace's capacity from the
    backend record (`_ns_wire` on a front-end restart) sees the resized one.
    """

    def __init__(self, inner: Backend, size: int) -> None:
        self.inner = inner
        self.size = size

    def __getattr__(self, name: str) -> Any:   # spec(), close(), destroy(), read_only, ...
        return getattr(self.inner, name)
