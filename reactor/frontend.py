"""Front-end process: one per controller; owns its vfio-user socket and control path.

It runs an asyncio loop with: the vfio-user server (requests in order, quiesce via the
coordinator), the admin-queue poller, the worker links (rings), and the supervisor's
control socket (new/lost workers, management requests, stop, and the handover messages
of a live upgrade: reactor/connmove.py).  Started with opts["adopt"], it takes over a
running controller from another front-end instead of binding its socket.
"""
from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import signal
import socket
from typing import Any

from backends.base import open_backend
from nvme.config import ControllerConfig
from nvme.namespace import Namespace
from nvme.state import NamespaceInfo
from reactor import ipc
from reactor.channel import Channel
from reactor.connmove import Mover, die_with_parent
from reactor.nvmefn import NvmeFunction
from reactor.rescue import Rescue
from reactor.revive import revive
from ops.proctitle import set_process_name
from reactor.server import VfioUserServer
from reactor.workerlink import WorkerLink

log = logging.getLogger("vnvmed.frontend")
ASYNC_CALLS = ("save", "resume")      # management calls that wait for the quiesce barrier


def make_namespace(info: dict[str, Any]) -> Namespace:
    ni = NamespaceInfo(nsid=info["nsid"], block_size=info["block_size"], blocks=info["blocks"],
                       read_only=info.get("read_only", False), backend=info["backend"])
    return Namespace(ni, open_backend(ni.backend))


def controller_config(spec: Any) -> ControllerConfig:
    return ControllerConfig(serial=spec.serial, model=spec.model, max_io_queues=spec.max_io_queues,
                            mqes=spec.mqes + 1, mdts=spec.mdts,
                            subnqn=f"nqn.2024-01.io.vnvmed:{spec.name}")


class FrontEnd:
    def __init__(self, spec: Any, namespaces: list[dict[str, Any]],
                 worker_socks: dict[int, socket.socket], sup: socket.socket,
                 opts: dict[str, Any]) -> None:
        self.spec = spec
        self.ns_wire = namespaces
        self.worker_socks = worker_socks
        self.sup = sup
        self.opts = opts
        self.stop = asyncio.Event()
        self.fn: NvmeFunction | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: VfioUserServer | None = None
        self.mover = Mover(self)
        self.provisional = bool(opts.get("adopt"))   # adopting: nothing shared is ours yet
        self.handovers: dict[str, Any] = {}          # count, last/max blackout (stats)
        self.rescue: Rescue | None = None            # crash recovery records (reactor/rescue.py)

    def _link(self, wid: int, sock: socket.socket) -> None:
        assert self.fn is not None
        loop = asyncio.get_running_loop()
        prefix = f"/{self.opts['prefix']}-ring-{self.spec.name}-w{wid}-{os.getpid()}"
        try:
            chan = Channel.create(sock, prefix)
        except OSError as e:
            # That worker died just now: its replacement brings a new channel ("worker"
            # control message), whose queues recovery re-attaches (found by the stress
            # suite: a front-end starting while a worker dies crashed here).
            log.info("%s: worker %d gone before its channel was set up: %s", self.spec.name, wid, e)
            sock.close()
            return
        link = WorkerLink(wid, chan, self.fn.on_worker_message)
        link.start(loop)
        self.fn.add_worker(link)

    def build(self, bar_fd: int | None = None, qt_fd: int | None = None) -> None:
        """The function, its worker links and the server object (not listening yet)."""
        namespaces = {ns["nsid"]: make_namespace(ns) for ns in self.ns_wire}
        cfg = controller_config(self.spec)
        self.fn = NvmeFunction(self.spec.name, cfg, namespaces, cfg.max_transfer,
                               doorbells=str(getattr(self.spec, "doorbells", "mmap")),
                               write_windows=self.spec.message_write_windows, bar_fd=bar_fd,
                               qt_fd=qt_fd)
        self.fn.fingerprints = {ns["nsid"]: ns["fingerprint"] for ns in self.ns_wire
                                if ns.get("fingerprint")}
        for wid, sock in sorted(self.worker_socks.items()):
            self._link(wid, sock)
        restore = getattr(self.spec, "restore", "")
        if restore and not self.opts.get("adopt"):    # a taker gets the running state
            self.fn.mig.restore_from_file(restore)
        self.server = VfioUserServer(self.spec.socket, self.fn, mode=self.spec.socket_mode)

    def tell(self, msg: dict[str, Any]) -> None:
        ipc.send(self.sup, msg)

    async def _adopt(self) -> None:
        """Take the controller over from the old front-end, in the supervisor's steps."""
        t = self.mover.taker
        die_with_parent(True)
        try:
            await t.prepare()
            self.tell({"op": "handover_prepared", "name": self.spec.name})
            await t.restore()
            self.tell({"op": "handover_restored", "name": self.spec.name})
            await t.go.wait()
            self.provisional = False
            die_with_parent(False)
            phases = await t.resume()
        except Exception as e:
            log.error("%s: taking over the controller failed: %s", self.spec.name, e)
            self.tell({"op": "handover_failed", "name": self.spec.name, "reason": str(e)})
            self.exit_quietly()
        ms = phases["blackout_ms"]
        h = self.handovers
        h.update(count=int(h.get("count", 0)) + 1, last_blackout_ms=ms,
                 max_blackout_ms=max(ms, float(h.get("max_blackout_ms", 0.0))))
        log.info("%s: handover done, front-end %d serves; blackout %.2f ms (%s)", self.spec.name,
                 os.getpid(), ms, ", ".join(f"{k[:-3]} {v:.1f}" for k, v in phases.items() if k != "blackout_ms"))
        self.tell({"op": "handover_resumed", "name": self.spec.name, "phases": phases})

    def attach_rescue(self, rescue: Rescue | None = None) -> None:
        """Keep the supervisor's rescue package and the checkpoint current from now on
        (reactor/rescue.py); off with VNVMED_FRONTEND_RECOVERY=0 (opts["rescue"])."""
        fn = self.fn
        assert fn is not None
        if not self.opts.get("rescue", True):
            return
        r = self.rescue = rescue if rescue is not None else Rescue(self)
        fn.rescue = r
        fn.ctrl.admin_note = r.admin_executed
        r.send(force=True)
        r.checkpoint()

    async def _revive(self) -> None:
        """Carry on a crashed front-end's controller and connection (reactor/revive.py);
        on failure the supervisor starts a fresh front-end instead."""
        try:
            figures = await revive(self)
        except Exception as e:
            log.error("%s: front-end recovery failed, a fresh front-end follows: %s", self.spec.name, e)
            self.tell({"op": "rescue_failed", "name": self.spec.name, "reason": str(e)})
            self.exit_quietly()
        self.provisional = False
        log.warning("%s: front-end recovered on the same connection in %.1f ms (checkpoint %d, "
                    "%d I/O queue(s), %d command(s) to retry, %d admin completion(s) posted, %d admin "
                    "command(s) to run again; vfio-user requests: %d replies sent again, %d run again, "
                    "%d refused)", self.spec.name, figures["ms"], figures["checkpoint"],
                    figures["queues"], figures["retried"], figures["admin_completed"],
                    figures["admin_reexecute"], figures["replies_resent"], figures["requests_rerun"],
                    figures["requests_refused"])
        self.tell({"op": "rescue_done", "name": self.spec.name, "figures": figures})

    def _listen_control(self, loop: asyncio.AbstractEventLoop) -> None:
        """The supervisor's messages, and SIGTERM (a provisional front-end just leaves)."""
        self.sup.setblocking(False)
        loop.add_reader(self.sup.fileno(), self._control)
        loop.add_signal_handler(signal.SIGTERM,
                                lambda: self.exit_quietly() if self.provisional else self.stop.set())

    def exit_quietly(self) -> None:
        """Leave without touching what another process now runs (or still runs): only our
        own ring names are unlinked; the kernel closes every fd."""
        for link in list(self.fn.links.values()) if self.fn is not None else []:
            link.chan.close(unlink=True)
        logging.shutdown()
        os._exit(0)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        if self.provisional:
            self._listen_control(loop)
            if self.opts.get("adopt") == "rescue":
                await self._revive()
            else:
                await self._adopt()
                self.attach_rescue()
        else:
            self.build()
            assert self.server is not None
            await self.server.start()
            self._chown(self.spec.socket)
            if self.spec.socket_mode & 0o007:   # only with allow_world_socket (ops.config)
                log.warning("%s: socket %s is world-connectable (mode %04o, allow_world_socket): any "
                            "local user can attach to this controller's disks", self.spec.name,
                            self.spec.socket, self.spec.socket_mode)
            self._listen_control(loop)
            self.attach_rescue()
            self.tell({"op": "listening", "name": self.spec.name})
        assert self.fn is not None and self.server is not None
        namespaces = self.fn.namespaces
        tasks = [asyncio.ensure_future(self.server.serve_forever()),
                 asyncio.ensure_future(self.fn.admin_loop())]
        await self.stop.wait()
        for t in tasks:
            t.cancel()
        try:  # bounded: a stuck teardown must not keep a stopping front-end alive
            await asyncio.wait_for(self.server.close(), 10)
        except (asyncio.TimeoutError, Exception):
            log.exception("%s: closing the vfio-user server", self.spec.name)
        self.fn.close()
        for link in list(self.fn.links.values()):
            link.stop(loop)
            link.chan.close(unlink=True)
        for ns in list(namespaces.values()):
            ns.backend.close()

    def _chown(self, path: str) -> None:
        uid = pwd.getpwnam(self.spec.socket_owner).pw_uid if self.spec.socket_owner else -1
        gid = grp.getgrnam(self.spec.socket_group).gr_gid if self.spec.socket_group else -1
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)

    def _control(self) -> None:
        while True:
            try:
                msg, fds = ipc.recv(self.sup)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ValueError) as e:
                msg, fds = None, []
                log.error("%s: supervisor socket: %s", self.spec.name, e)
            if msg is None:
                # Supervisor gone (or it closed our socket at shutdown): stop.  The reader
                # must go too, or end-of-file keeps it firing and the loop spins at 100 %.
                asyncio.get_running_loop().remove_reader(self.sup.fileno())
                if self.provisional:
                    self.exit_quietly()
                self.stop.set()
                return
            try:
                self._handle(msg, fds)
            except Exception as e:
                log.exception("%s: control message %r", self.spec.name, msg.get("op"))
                if "id" in msg:
                    ipc.send(self.sup, {"op": "reply", "id": msg["id"], "error": str(e)})

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "pkg" or str(op).startswith("handover_"):
            self.mover.handle(msg, fds)
            return
        if op == "stop" and self.provisional:
            self.exit_quietly()
        if op == "worker" and self.fn is None:
            # A worker was replaced while we are still taking over (nothing built yet):
            # build() links the new channel instead of the dead one.
            wid = int(msg["wid"])
            old_sock = self.worker_socks.pop(wid, None)
            if old_sock is not None:
                old_sock.close()
            self.worker_socks[wid] = socket.socket(fileno=fds[0])
            return
        assert self.fn is not None
        if op == "worker":  # a (re)started worker: a new channel to it
            wid = int(msg["wid"])
            old = self.fn.links.get(wid)
            if old is not None:
                old.stop(asyncio.get_running_loop())
                old.chan.close(unlink=True)
            self.fn.worker_lost(wid)
            self._link(wid, socket.socket(fileno=fds[0]))
        elif op == "stop":
            self.stop.set()
        elif op == "call" and msg.get("method") in ASYNC_CALLS:
            # Calls that wait for the quiesce barrier: answered when done (the loop runs on).
            task = asyncio.ensure_future(self._async_call(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif op == "call":
            result = self._call(msg["method"], msg.get("params") or {})
            if self.rescue is not None and msg["method"] != "stats" and msg["method"] != "info":
                self.rescue.checkpoint()       # namespace changes, before the answer
            ipc.send(self.sup, {"op": "reply", "id": msg["id"], "result": result})
        else:
            ipc.close_fds(fds)
            log.error("%s: unexpected control message %r", self.spec.name, op)

    async def _async_call(self, msg: dict[str, Any]) -> None:
        fn = self.fn
        assert fn is not None
        p = msg.get("params") or {}
        try:
            if msg["method"] == "save":
                result = await fn.mig.save_for_operator(resume=bool(p.get("resume")))
            else:   # "resume"
                result = await fn.mig.resume_for_operator()
            reply: dict[str, Any] = {"op": "reply", "id": msg["id"], "result": result}
        except Exception as e:
            log.warning("%s: %s failed: %s", self.spec.name, msg["method"], e)
            reply = {"op": "reply", "id": msg["id"], "error": str(e)}
        ipc.send(self.sup, reply)

    def _call(self, method: str, p: dict[str, Any]) -> Any:
        fn = self.fn
        assert fn is not None
        if method == "info":
            return fn.info()
        if method == "ns_add":
            ns = make_namespace(p["ns"])
            if p["ns"].get("fingerprint"):
                fn.fingerprints[ns.info.nsid] = p["ns"]["fingerprint"]
            fn.add_namespace(ns)
            return {"nsid": ns.info.nsid}
        if method == "ns_remove":
            fn.remove_namespace(int(p["nsid"]))
            return {"nsid": p["nsid"]}
        if method == "ns_resize":
            # The supervisor sends the whole new record (backend spec included: a grown
            # file must be reopened to see its new size).
            ns = make_namespace(p["ns"])
            try:
                fn.resize_namespace(ns)
            except Exception:
                ns.backend.close()
                raise
            return {"nsid": ns.info.nsid, "blocks": ns.info.blocks}
        if method == "stats":
            rec = dict(self.rescue.counts) if self.rescue is not None else {}
            return dict(fn.stats(), handover=self.handovers, frontend_recovery=rec)
        raise ValueError(f"unknown front-end call {method!r}")


def run(spec: Any, namespaces: list[dict[str, Any]], worker_socks: dict[int, socket.socket],
        sup: socket.socket, opts: dict[str, Any]) -> None:
    """multiprocessing entry point (forked by the forkserver, see reactor/zygote.py)."""
    set_process_name(f"vnvmed: frontend {spec.name}")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the forkserver ignores it (reactor/zygote.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ops.logsetup import setup_logging
    setup_logging(opts.get("log_level", "info"))
    asyncio.run(FrontEnd(spec, namespaces, worker_socks, sup, opts).main())
