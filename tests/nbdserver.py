"""Real NBD servers for tests and benchmarks: nbdkit (memory plugin) and qemu-nbd.

Both run as our children on a UNIX socket (or loopback TCP for nbdkit), are stopped
by PID, and can be killed, restarted on the same address, paused (SIGSTOP) and
resumed - what the reconnect and stall tests need.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from ops import subproc

PACKAGES = "nbdkit qemu-utils python3-libnbd"


def missing(server: str = "nbdkit") -> str | None:
    if shutil.which(server) is None:
        return f"{server} not installed (apt-get install {PACKAGES})"
    try:
        import nbd  # noqa: F401
        del nbd
    except ImportError:
        return ("libnbd Python binding not importable by this interpreter: run the tests with "
                "Debian's Python (scripts/setup's .venv, --system-site-packages)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """One server process; `uri` is what an `nbd:` namespace is given."""

    def __init__(self, argv: list[str], uri: str, sock: str | None = None, port: int | None = None) -> None:
        self.argv = argv
        self.uri = uri
        self.sock = sock
        self.port = port
        self.proc: subprocess.Popen | None = None

    @classmethod
    def nbdkit_memory(cls, size: str, sock: str | None = None, port: int | None = None,
                      extra: tuple[str, ...] = ()) -> "NbdServer":
        if sock is not None:
            argv = ["nbdkit", "-f", "-U", sock, *extra, "memory", size]
            return cls(argv, f"nbd+unix:///?socket={sock}", sock=sock)
        port = port or free_port()
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *extra, "memory", size]
        return cls(argv, f"nbd://127.0.0.1:{port}/", port=port)

    @classmethod
    def qemu_nbd(cls, image: str, sock: str, export: str = "disk") -> "NbdServer":
        argv = ["qemu-nbd", "--persistent", "--shared=16", "--format=raw", "--cache=none", "--aio=threads",
                "-x", export, "-k", sock, image]
        return cls(argv, f"nbd+unix:///{export}?socket={sock}", sock=sock)

    def start(self, timeout: float = 10.0) -> "NbdServer":
        if self.sock is not None and os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}")
            if self._listening():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not listen within {timeout} s")

    def _listening(self) -> bool:
        fam, addr = ((socket.AF_UNIX, self.sock) if self.sock is not None
                     else (socket.AF_INET, ("127.0.0.1", self.port)))
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.connect(addr)
                return True
            except OSError:
                return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP, and wait until every thread of the server is stopped: kill() returns
        while a thread running on another core may still answer a request or two."""
        assert self.proc is not None
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while True:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    pass                 # a thread that ended meanwhile
            if all(st in ("T", "t") for st in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nbd server {pid} not stopped after SIGSTOP: thread states {states}")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)      # a stopped server cannot exit
        if self.proc is not None:
            subproc.stop(self.proc, 5)
        self.proc = None
        if self.sock is not None and os.path.exists(self.sock):
            os.unlink(self.sock)

    def __enter__(self) -> "NbdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
