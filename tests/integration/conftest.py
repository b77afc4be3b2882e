"""Fixtures that run the real daemon: `daemon`, `mdaemon`, `vnvmed`, and `host`.

Every daemon here is a `tests.daemon.Daemon` (bin/vnvmed as a child process, stopped
by PID; see that module).

`daemon` starts ``bin/vnvmed`` with a fresh run dir under /tmp (short: socket paths
must fit sun_path), waits for the ``vnvmed ready`` log line, and on teardown sends
SIGTERM to *that* PID, waits, asserts exit code 0 and that no ``/dev/shm`` object of
the instance (``reactor.shm.names.instance_prefix(run_dir, pid)``) is left behind.

Arguments are parametrizable, either with a marker::

    @pytest.mark.daemon_args(["--cores", "0", "--controller", "nvme0={run}/a.sock"])

or with indirect parametrization (``@pytest.mark.parametrize("daemon", [args], indirect=True)``).
``{run}`` in an argument is replaced by the run dir; ``{img}`` by a 16 MiB image file
created in it.  ``@pytest.mark.daemon_config("toml text")`` adds ``--config FILE``.
`mdaemon` is the default daemon once per test module (same checks at the end of the
module); `enabled_nvme` gives a test an enabled controller with I/O queues on it.

`vnvmed` is a factory for tests that start daemons with their own arguments and check
the stop themselves: ``vnvmed(run_dir, *args)`` returns a ready `Daemon`; whatever the
test did, each one it started is gone (SIGKILL by PID) after the test.

`host` is a connected, negotiated `VfioUserClient` with 64 MiB of memfd guest RAM
DMA-mapped at iova 0 and a `benchmarks.hostnvme.HostNvme` on top (not enabled yet).

Every module runs once per data path (`datapath`, autouse, module scope): the daemons
it starts get `--datapath python` or `--datapath native` (tests/daemon.DATAPATH).
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import pytest

import tests.daemon
from benchmarks.hostnvme import GuestRam, HostNvme
from tests.daemon import Daemon
from tests.unit.datapaths import PARAMS as DATAPATHS
from vfio_user.client import VfioUserClient

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


@pytest.fixture(scope="module", autouse=True, params=DATAPATHS)
def datapath(request: pytest.FixtureRequest) -> Iterator[str]:
    """The data path of every daemon this module starts (see the module doc)."""
    tests.daemon.DATAPATH = request.param
    try:
        yield request.param
    finally:
        tests.daemon.DATAPATH = None


def _expand(args: Sequence[str], run: str, img: str) -> list[str]:
    return [a.replace("{run}", run).replace("{img}", img) for a in args]


def start_daemon(args: Sequence[str] | None = None, config: str | None = None,
                 img_size: int = IMG_SIZE) -> Daemon:
    """A ready daemon in a fresh run dir with a sparse image ``{img}`` (see the module doc)."""
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
    d = Daemon(argv, run)
    d.img = img
    try:
        d.start(READY_TIMEOUT)
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)
        raise
    return d


def finish_daemon(d: Daemon) -> None:
    """Stop, then check the exit code and the shm objects; always removes the run dir."""
    try:
        rc = d.stop(STOP_TIMEOUT)
        left = d.shm_left()
        assert rc == 0, f"vnvmed exited with {rc}:\n{d.log()[-3000:]}"
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


@pytest.fixture(scope="module")
def mdaemon() -> Iterator[Daemon]:
    """The default daemon, shared by the tests of one module."""
    d = start_daemon()
    try:
        yield d
    finally:
        finish_daemon(d)


@pytest.fixture
def vnvmed() -> Iterator[Callable[..., Daemon]]:
    """Factory ``vnvmed(run_dir, *args, timeout=...)`` -> a ready Daemon; none outlives the test."""
    started: list[Daemon] = []

    def start(run_dir: str | os.PathLike[str], *args: str, timeout: float = 30.0) -> Daemon:
        d = Daemon(args, run_dir)
        started.append(d)
        return d.start(timeout)

    try:
        yield start
    finally:
        from reactor.shm.names import cleanup_stale
        for d in started:
            if d.proc is not None:
                d.stop()   # SIGTERM first: a SIGKILLed supervisor cannot unlink its RAM namespaces
            cleanup_stale(os.fspath(d.run_dir))   # whatever a killed instance still left


def _connect(sock: str, timeout: float = 5.0) -> VfioUserClient:
    """Connect and negotiate, once: no retry.

    A connection that arrives while the previous client's session is still being torn
    down is queued by the server until teardown ends (reactor/server.py), so a test that
    reconnects right after disconnecting is served; retrying here would hide a refusal.
    """
    c = VfioUserClient(sock, timeout=timeout)
    try:
        c.negotiate()
    except BaseException:
        c.close()
        raise
    return c


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
        close_guest(self.client, self.ram, self.nvme)


def close_guest(client: VfioUserClient, ram: GuestRam | None, nvme: HostNvme | None) -> None:
    """Driver, connection, then guest RAM (for the tests that hold the three separately)."""
    if nvme is not None:
        nvme.close()
    client.close()
    if ram is None:
        return
    try:
        ram.close()
    except BufferError:       # memoryviews of the RAM held by finished frames
        gc.collect()
        try:
            ram.close()
        except BufferError:   # still referenced (e.g. by pytest's assertion rewriting)
            os.close(ram.fd)


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


@contextlib.contextmanager
def enabled_nvme(sock: str, qids: Iterable[int] = (), depth: int = 32) -> Iterator[HostNvme]:
    """A fresh connection to ``sock``, controller enabled, an I/O queue pair per qid."""
    host = Host(sock)
    try:
        n = host.nvme
        assert n is not None
        n.enable()
        for qid in qids:
            n.create_io_queue(qid, depth)
        yield n
    finally:
        host.close()


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A short directory under /tmp (UNIX socket paths must fit in 108 bytes), removed after."""
    d = tempfile.mkdtemp(prefix="vnops", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
