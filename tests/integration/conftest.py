"""Fixtures that run the real daemon: `daemon` (bin/vnvmed as a subprocess) and `host`.

`daemon` starts ``bin/vnvmed`` with a fresh run dir under /tmp (short: socket paths
must fit sun_path), waits for the ``ready`` log line, and on teardown sends SIGTERM to
*that* PID, waits, asserts exit code 0 and that no ``/dev/shm`` object of the instance
(``reactor.shm.names.instance_prefix(run_dir, pid)``) is left behind.

Arguments are parametrizable, either with a marker::

    @pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/a.sock"])

or with indirect parametrization (``@pytest.mark.parametrize("daemon", [args], indirect=True)``).
``{run}`` in an argument is replaced by the run dir; ``{img}`` by a 16 MiB image file
created in it.  ``@pytest.mark.daemon_config("toml text")`` adds ``--config FILE``.
Modules that want one daemon for all their tests can call `start_daemon` from a
module-scoped fixture of their own (see test_nvme_status.py).

`host` is a connected, negotiated `VfioUserClient` with 64 MiB of memfd guest RAM
DMA-mapped at iova 0 and a `benchmarks.hostnvme.HostNvme` on top (not enabled yet).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from benchmarks.hostnvme import GuestRam, HostNvme
from reactor.shm.names import SHM_DIR, instance_prefix
from vfio_user.client import VfioUserClient

ROOT = Path(__file__).resolve().parents[2]
VNVMED = str(ROOT / "bin" / "vnvmed")
IMG_SIZE = 16 << 20
RAM_SIZE = 64 << 20
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# The default daemon: the CLI example plus a null namespace.
#   nsid 1 = ram:64M, nsid 2 = file:IMG (16 MiB), nsid 3 = null:32M
DEFAULT_ARGS = ["--cores", "0", "--controller", "nvme0={run}/nvme0.sock",
                "--namespace", "nvme0=ram:64M", "--namespace", "nvme0=file:{img}",
                "--namespace", "nvme0=null:32M"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "daemon_args(args): command line for the daemon fixture")
    config.addinivalue_line("markers", "daemon_config(text): TOML config for the daemon fixture")


@dataclass
class Daemon:
    """A running bin/vnvmed: where it lives and what it said."""
    proc: subprocess.Popen
    run_dir: str
    log_path: str
    args: list[str]
    sockets: dict[str, str] = field(default_factory=dict)   # controller name -> socket path
    img: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> str:
        """The first controller's socket."""
        return next(iter(self.sockets.values()))

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def shm_leftovers(self) -> list[str]:
        prefix = instance_prefix(self.run_dir, self.pid)
        try:
            names = os.listdir(SHM_DIR)
        except FileNotFoundError:
            return []
        return [n for n in names if n.startswith(prefix) or n.startswith("sem." + prefix)]

    def stop(self) -> int:
        """SIGTERM by PID, wait; SIGKILL (and fail later) if it does not stop."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return -signal.SIGKILL
        return self.proc.returncode


def _expand(args: Sequence[str], run: str, img: str) -> list[str]:
    return [a.replace("{run}", run).replace("{img}", img) for a in args]


def start_daemon(args: Sequence[str] | None = None, config: str | None = None,
                 img_size: int = IMG_SIZE) -> Daemon:
    run = tempfile.mkdtemp(prefix="vnvt-", dir="/tmp")
    img = os.path.join(run, "disk.img")
    with open(img, "wb") as f:
        f.truncate(img_size)
    argv = _expand(DEFAULT_ARGS if args is None else args, run, img)
    if config is not None:
        cfg = os.path.join(run, "vnvmed.toml")
        with open(cfg, "w") as f:
            f.write(config.replace("{run}", run).replace("{img}", img))
        argv = ["--config", cfg] + argv
    log_path = os.path.join(run, "vnvmed.log")
    env = dict(os.environ, VNVMED_RUN_DIR=run, PYTHONPATH=str(ROOT))
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, VNVMED, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, cwd=str(ROOT))
    d = Daemon(proc, run, log_path, argv, img=img)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        text = d.log
        if "ready" in text:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            d.stop()
            shutil.rmtree(run, ignore_errors=True)
            raise RuntimeError(f"vnvmed did not become ready (rc={proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.05)
    for i, a in enumerate(argv):
        if a == "--controller" and i + 1 < len(argv):
            name, _, sock = argv[i + 1].partition("=")
            d.sockets[name] = sock if os.path.isabs(sock) else os.path.join(run, sock)
    if not d.sockets and "nvme0.sock" in text:
        d.sockets["nvme0"] = os.path.join(run, "nvme0.sock")
    return d


def finish_daemon(d: Daemon) -> None:
    """Stop, then check the exit code and the shm objects; always removes the run dir."""
    try:
        rc = d.stop()
        left = d.shm_leftovers()
        assert rc == 0, f"vnvmed exited with {rc}:\n{d.log[-3000:]}"
        assert not left, f"shared memory left behind: {left}"
    finally:
        shutil.rmtree(d.run_dir, ignore_errors=True)


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    args = getattr(request, "param", None)
    m = request.node.get_closest_marker("daemon_args")
    if m is not None:
        args = m.args[0]
    c = request.node.get_closest_marker("daemon_config")
    d = start_daemon(args, c.args[0] if c is not None else None)
    try:
        yield d
    finally:
        finish_daemon(d)


def _connect(sock: str, timeout: float = 5.0) -> VfioUserClient:
    """Connect and negotiate; retry while the previous client is still being torn down.

    The server serves one client at a time and closes a connection that arrives while
    it is busy, so right after a test disconnects, the next connect may see EOF.
    """
    deadline = time.monotonic() + timeout
    while True:
        c = VfioUserClient(sock)
        try:
            c.negotiate()
            return c
        except ConnectionError:
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            c.close()
            raise


class Host:
    """A connected client, its guest RAM and the NVMe driver on top (one per test)."""

    def __init__(self, sock: str, ram_size: int = RAM_SIZE) -> None:
        self.client = _connect(sock)
        self.ram: GuestRam | None = None
        self.nvme: HostNvme | None = None
        try:
            self.ram = GuestRam(ram_size)
            self.client.dma_map(0, ram_size, self.ram.fd, 0)
            self.nvme = HostNvme(self.client, self.ram)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.nvme is not None:
            self.nvme.close()
        self.client.close()
        if self.ram is not None:
            self.ram.close()


def connect_host(sock: str, ram_size: int = RAM_SIZE) -> Host:
    return Host(sock, ram_size)


@pytest.fixture
def host(daemon: Daemon) -> Iterator[HostNvme]:
    """HostNvme on a fresh connection to `daemon` (disconnect resets the controller)."""
    h = Host(daemon.socket)
    try:
        assert h.nvme is not None
        yield h.nvme
    finally:
        h.close()
