"""Start-up checks that need the machine, run before the daemon allocates or binds anything.

ops/config.py validates what a configuration *says* (and may be meant for another
machine); this module checks that *this* machine can serve it, so that the common ways a
start goes wrong end in one line naming the cause and exit status 2 (ops/cli.py) instead
of a child's traceback, a half-started daemon or memory that runs out later:

* a controller socket whose directory does not exist;
* a controller socket, or the run dir's management socket, that a live process (another
  vnvmed) is serving already - probed by connecting, as reactor/server.py does before it
  replaces a stale socket;
* a CPU whose memory ordering the shared-memory queues cannot rely on (nvme/fence.py);
* RAM namespaces that do not fit: they live in /dev/shm (tmpfs, sparse), so an oversized
  one starts fine and kills whoever touches the missing pages with SIGBUS much later.
  The limit is the smaller of the space /dev/shm has left and the machine's memory.
"""
from __future__ import annotations

import os
import socket
import stat

from nvme import fence
from ops.config import DaemonConfig, NamespaceKind

SHM_DIR = "/dev/shm"


class StartupError(Exception):
    """This machine cannot serve the configuration; str() is the one-line reason."""


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _live(path: str) -> bool:
    """Is a process listening on the UNIX socket at path (a stale file is not)?"""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def check_sockets(cfg: DaemonConfig) -> None:
    if _live(cfg.rpc_socket):
        raise StartupError(f"run dir {cfg.run_dir} is already served by a live vnvmed "
                           f"(management socket {cfg.rpc_socket} answers); stop it or use --run-dir")
    run_dir = os.path.abspath(cfg.run_dir)
    for c in cfg.controllers:
        parent = os.path.dirname(os.path.abspath(c.socket))
        # The run dir itself is created at start-up (reactor/supervisor.make_run_dir).
        if not os.path.isdir(parent) and parent != run_dir:
            raise StartupError(f"controller {c.name}: directory {parent} of socket {c.socket} "
                               f"does not exist; create it or choose another socket path")
        if os.path.lexists(c.socket) and not stat.S_ISSOCK(os.lstat(c.socket).st_mode):
            raise StartupError(f"controller {c.name}: {c.socket} exists and is not a socket")
        if _live(c.socket):
            raise StartupError(f"controller {c.name}: socket {c.socket} is already served by a "
                               f"live process (another vnvmed?); stop it or choose another path")


def ram_limit() -> tuple[int, str]:
    """(bytes RAM namespaces may use in all, what bounds it)."""
    st = os.statvfs(SHM_DIR)
    shm_free = st.f_bavail * st.f_frsize
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if shm_free <= mem_total:
        return shm_free, f"{_gib(shm_free)} free in {SHM_DIR}"
    return mem_total, f"{_gib(mem_total)} of memory"


def check_ram(cfg: DaemonConfig, limit: tuple[int, str] | None = None) -> None:
    avail, what = limit or ram_limit()
    total = 0
    for c in cfg.controllers:
        for ns in c.namespaces:
            if ns.kind is not NamespaceKind.RAM or ns.size is None:
                continue
            if ns.size > avail:
                raise StartupError(f"controller {c.name} namespace {ns.nsid}: {ns.spec} "
                                   f"({_gib(ns.size)}) does not fit in memory: the limit is {what}")
            total += ns.size
    if total > avail:
        raise StartupError(f"RAM namespaces need {_gib(total)} together, more than memory allows: "
                           f"the limit is {what}")


def datapath(cfg: DaemonConfig) -> tuple[str, str]:
    """(the workers' data path, why): native when built unless python was asked for;
    StartupError if native was asked for and is not built."""
    from nvme import native
    if cfg.datapath is None:
        if native.available:
            return "native", "the default (built)"
        return "python", f"native {native.why_not}"
    if cfg.datapath.value == "native" and not native.available:
        raise StartupError(f"--datapath native: the native data path is {native.why_not}")
    return cfg.datapath.value, "asked for"


def check_machine() -> None:
    reason = fence.unsupported_reason()
    if reason is not None:
        raise StartupError(reason)


def check(cfg: DaemonConfig) -> None:
    """Every check, cheapest first; StartupError on the first failure."""
    check_machine()
    datapath(cfg)
    check_sockets(cfg)
    check_ram(cfg)
