"""A throw-away single-node Ceph cluster for tests and benchmarks (Debian packages).

One monitor and one OSD on the memory object store (memstore, 512 MiB), cephx on,
pool size 1, bound to 127.0.0.1 on a free port, everything (config, keyring, mon
store, logs, admin sockets) under one temporary directory.  Both daemons run in the
foreground as our children, so `stop()` ends exactly them (by PID) and removes the
directory.  No manager daemon: RBD I/O and pool/image administration only need the
monitor and the OSD.  Measured on the 2-vCPU test VM: ~8 s from nothing to an image
that takes I/O.

    with CephCluster() as c:
        c.create_image("img", 64 << 20)        # pool "rbd"
        conf = c.conf                           # rbd:rbd/img?conf=<conf>
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

from ops import subproc

BINARIES = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd")
PACKAGES = "ceph-mon ceph-osd ceph-common python3-rados python3-rbd"
POOL = "rbd"


def missing() -> str | None:
    """None if a cluster can be started here, else what is missing."""
    gone = [b for b in BINARIES if shutil.which(b) is None]
    if gone:
        return f"Ceph binaries missing ({', '.join(gone)}): apt-get install {PACKAGES}"
    return None


def _class_dir() -> str:
    """Where the OSD finds its object classes (libcls_rbd.so), as an absolute path.

    Debian 13's Ceph 18 is built with a relative default ("lib/x86_64-linux-gnu/
    rados-classes"), which the OSD resolves against its working directory: started from a
    checkout, it loads no class and every `rbd create` fails with EOPNOTSUPP ("error adding
    image to directory").  Debian 12's Ceph 16 has the absolute /usr/lib/... path.
    """
    r = subprocess.run(["ceph-osd", "--show-config-value", "osd_class_dir"], capture_output=True,
                       text=True, timeout=30, cwd="/")
    value = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    candidates = [value] if os.path.isabs(value) else [os.path.join("/usr", value), os.path.join("/", value)]
    for d in candidates:
        if os.path.exists(os.path.join(d, "libcls_rbd.so")):
            return d
    raise RuntimeError(f"no libcls_rbd.so in {candidates} (ceph-osd osd_class_dir = {value!r})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    def __init__(self, memstore_bytes: int = 512 << 20) -> None:
        self.dir = tempfile.mkdtemp(prefix="vnvmed-ceph-")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.keyring = os.path.join(self.dir, "keyring")
        self.port = _free_port()
        self.memstore_bytes = memstore_bytes
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "CephCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-800:]}")
        return r.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", self.conf, *args, timeout=timeout)

    def _daemon(self, *args: str) -> None:
        log = open(os.path.join(self.dir, f"{args[0]}.out"), "wb")
        self.procs.append(subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL))
        log.close()

    def start(self) -> None:
        d = self.dir
        fsid = str(uuid.uuid4())
        for sub in ("mon", "osd", "run"):
            os.makedirs(os.path.join(d, sub))
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.port}
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
osd objectstore = memstore
osd class dir = {_class_dir()}
memstore device bytes = {self.memstore_bytes}
osd crush chooseleaf type = 0
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/$name.log
keyring = {self.keyring}
mon data = {d}/mon
osd data = {d}/osd
ms bind ipv6 = false
osd max object name len = 256
osd max object namespace len = 64
mon data avail crit = 1
mon data avail warn = 1
""")
        kr = self.keyring
        self._run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", kr, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                  "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        monmap = os.path.join(d, "monmap")
        self._run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{self.port}]", "--fsid", fsid, monmap)
        self._run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", kr)
        self._daemon("ceph-mon", "-f", "-c", self.conf, "-i", "a")
        osd_id = self.ceph("osd", "create", timeout=30).strip()
        if osd_id != "0":
            raise RuntimeError(f"expected osd 0, got {osd_id!r}")
        self._run("ceph-authtool", kr, "--gen-key", "-n", "osd.0", "--cap", "mon", "allow profile osd",
                  "--cap", "osd", "allow *")
        self.ceph("auth", "import", "-i", kr)
        self._run("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", str(uuid.uuid4()))
        self._daemon("ceph-osd", "-f", "-c", self.conf, "-i", "0")
        self.ceph("osd", "pool", "create", POOL, "8")
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd")
        self._wait_osd_up(30)

    def _wait_osd_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "1 up" in self.ceph("osd", "stat"):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ceph daemon (pid {p.pid}) exited with {p.returncode}; see {self.dir}")
            time.sleep(0.2)
        raise RuntimeError("osd.0 did not come up")

    def create_image(self, name: str, size: int, pool: str = POOL) -> None:
        self._run("rbd", "-c", self.conf, "create", "--size", f"{size // (1 << 20)}M", f"{pool}/{name}")

    def add_user(self, name: str, caps_osd: str = f"allow rwx pool={POOL}") -> str:
        """A client.<name> keyring file with mon 'profile rbd' and the given OSD caps."""
        path = os.path.join(self.dir, f"client.{name}.keyring")
        self.ceph("auth", "get-or-create", f"client.{name}", "mon", "profile rbd", "osd", caps_osd,
                  "-o", path)
        return path

    def target(self, image: str, pool: str = POOL) -> str:
        return f"{pool}/{image}?conf={self.conf}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()            # all at once: the daemons exit in parallel
        for p in reversed(self.procs):
            subproc.stop(p, 10)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)
