"""Live migration between two vnvmed daemons, as between two hosts: the test rig.

Theory of operation
-------------------
Each "host" is a separate `bin/vnvmed` (its own run dir, workers, front-end) serving a
controller `nvme0` whose namespace is the same image file (shared storage).  The
"guest" is this process: guest RAM is one memfd, DMA-mapped into whichever daemon
serves it (on real hosts the RAM would be copied; sharing it is the perfectly copied
case - `tests/integration/test_migration_dirty.py` checks what copying needs, the
dirty-page log), a `HostNvme` drives the controller and a `VerifiedLoad` keeps 4 I/O
queues at QD 32 busy through shared memory while the main thread migrates.

`migrate(guest, dst_daemon, scheme)` does what QEMU would (the drivers in
vfio_user/migdriver.py): connect to the destination and map guest RAM there (the
destination QEMU starts first), pre-copy, stop the guest (the load pauses), the stop
arc on the source, the device data moved to the destination, the guest moved to the
destination's BAR0 and resumed *before* the destination's RUNNING arc (its doorbell
writes land in a stopped controller: the resume must find them), RUNNING, then - as
QEMU's migration cleanup does, after the stream is complete - dirty logging stopped on
the source, and the source connection closed (the source QEMU exits).  Blackout = from
sending the stop arc to the RUNNING reply; it includes the final dirty-bitmap report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.hostnvme import GuestRam, HostNvme
from migration.trace import GcWatch, PhaseTrace
from tests.daemon import ROOT, Daemon
from tests.verifyload import VerifiedLoad
from vfio_user.client import VfioUserClient
from vfio_user.migdriver import V1Driver, V2Driver

RAM_SIZE = 64 << 20
IMG_SIZE = 64 << 20


def start_hosts(n: int = 2, img_size: int = IMG_SIZE, cores: str = "0",
                extra: tuple[str, ...] = (), namespace: str | None = None) -> tuple[list[Daemon], str]:
    """n daemons ("hosts") each serving nvme0 on the same image file; (daemons, image).

    `namespace` (e.g. ``nbd:URI`` or ``rbd:POOL/IMAGE``) replaces the file: storage every
    host reaches over the network, as across real hosts (issue 15)."""
    shared = tempfile.mkdtemp(prefix="vnvmig-", dir="/tmp")
    img = os.path.join(shared, "shared.img")
    with open(img, "wb") as f:
        f.truncate(img_size)
    daemons: list[Daemon] = []
    try:
        for _ in range(n):
            daemons.append(start_host(img, cores, extra, namespace))
    except BaseException:
        stop_hosts(daemons, img)
        raise
    return daemons, img


def start_host(img: str, cores: str = "0", extra: tuple[str, ...] = (),
               namespace: str | None = None) -> Daemon:
    """One more "host" serving nvme0 on the shared image, or on `namespace` if given (its
    run dir next to the image)."""
    run = tempfile.mkdtemp(prefix="h", dir=os.path.dirname(img))
    d = Daemon(["--cores", cores, "--controller", f"nvme0={run}/nvme0.sock",
                "--namespace", f"nvme0={namespace or 'file:' + img}", *extra], run)
    d.start(30)
    return d


def stop_hosts(daemons: list[Daemon], img: str) -> list[int]:
    rcs = []
    for d in daemons:
        if d.proc is not None:
            rcs.append(d.stop())
    shutil.rmtree(os.path.dirname(img), ignore_errors=True)
    return rcs


def connect(sock: str, ram: GuestRam, timeout: float = 10.0) -> VfioUserClient:
    """A QEMU-like client: negotiate (QEMU's VERSION JSON, migration cap included), map RAM."""
    deadline = time.monotonic() + timeout
    while True:
        c = VfioUserClient(sock, timeout=10.0)
        try:
            c.negotiate()
            break
        except ConnectionError:
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    c.dma_map(0, ram.size, ram.fd, 0)
    return c


def moved(old: HostNvme, client: VfioUserClient) -> HostNvme:
    """The guest's driver state (queues, CIDs) on top of another device's BAR0."""
    new = HostNvme(client, old.ram)
    new.trapped = old.trapped
    new.queues = old.queues
    new._cid = old._cid
    new.stray = old.stray
    return new


@dataclass
class Guest:
    ram: GuestRam
    client: VfioUserClient
    nvme: HostNvme
    load: VerifiedLoad | None = None
    daemon: Daemon | None = None

    @classmethod
    def boot(cls, daemon: Daemon, nqueues: int = 4, qd: int = 32, seed: int = 1,
             trapped: bool = False) -> "Guest":
        ram = GuestRam(RAM_SIZE)
        client = connect(daemon.socket, ram)
        nvme = HostNvme(client, ram)
        nvme.trapped = trapped          # every doorbell a REGION_WRITE (QEMU without the mmap)
        nvme.enable()
        ns = nvme.identify(0, 1)
        nsze = int.from_bytes(ns[0:8], "little")
        lbaf = ns[128 + 4 * (ns[26] & 0xF) + 2]
        g = cls(ram, client, nvme, daemon=daemon)
        g.load = VerifiedLoad(nvme, 1, nsze << lbaf, 1 << lbaf, nqueues, qd, seed)
        g.load.create_queues()
        return g

    def close(self) -> None:
        if self.load is not None and self.load._thread is not None and self.load._thread.is_alive():
            self.load.stop()
        self.nvme.close()
        self.client.close()
        try:
            self.ram.close()
        except BufferError:
            os.close(self.ram.fd)


@dataclass
class Figures:
    scheme: str
    blackout_ms: float
    stream_bytes: int
    precopy_bytes: int
    steps: dict[str, float]            # ms per step of the blackout, in order
    # The client's marks (migration/trace.py: name, CLOCK_MONOTONIC ns): the first is
    # the stop arc sent, the last the destination's RUNNING reply.
    marks: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def _regs(nvme: HostNvme) -> dict[str, int]:
    return {name: nvme.reg_read(off, size) for name, off, size in
            (("cap", 0, 8), ("vs", 8, 4), ("intms", 0xC, 4), ("cc", 0x14, 4), ("csts", 0x1C, 4),
             ("aqa", 0x24, 4), ("asq", 0x28, 8), ("acq", 0x30, 8))}


# The guest's load is a Python thread sharing the GIL with the migration driver; QEMU's
# vCPU threads and its migration thread run truly in parallel.  Resumed before the
# destination runs, the load reaps and verifies a burst of completions, and with
# CPython's 5 ms switch interval the driver's next message (the RUNNING arc) waited
# for the GIL: 0.9-1.4 ms of every blackout was this client's, not the device's.
DRIVER_SWITCH_S = 0.0001


def migrate(g: Guest, dst: Daemon, scheme: str = "v2", precopy: bool = True,
            dirty_log: bool = True, check_regs: bool = True,
            log_stop_inside: bool = False) -> Figures:
    """Move the guest's controller from g.daemon to dst (see the module doc)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, DRIVER_SWITCH_S))
    try:
        return _migrate(g, dst, scheme, precopy, dirty_log, check_regs, log_stop_inside)
    finally:
        sys.setswitchinterval(old)


def _migrate(g: Guest, dst: Daemon, scheme: str, precopy: bool, dirty_log: bool,
             check_regs: bool, log_stop_inside: bool) -> Figures:
    """Move the guest's controller from g.daemon to dst (see the module doc).

    `log_stop_inside`: stop dirty logging inside the blackout, right after the final
    report (how this rig measured before 2026-12-06; QEMU does it after)."""
    assert g.load is not None
    src_c = g.client
    dst_c = connect(dst.socket, g.ram)
    new = moved(g.nvme, dst_c)          # the destination's BAR0 is mapped before the blackout
    pre = b""
    steps: dict[str, float] = {}
    marks: list[tuple[str, int]] = []

    gct = PhaseTrace()
    gcw = GcWatch(gct, min_ns=100_000)      # the client's own GC pauses (QEMU has none)

    def mark() -> int:
        t = time.monotonic_ns()
        marks.append(("client stop arc sent", t))
        gcw.install()
        return t

    def step(name: str, t: int) -> int:
        now = time.monotonic_ns()
        steps[name] = (now - t) / 1e6
        marks.append(("client " + name, now))
        return now
    try:
        if scheme == "v2":
            s2, d2 = V2Driver(src_c), V2Driver(dst_c)
            if dirty_log:
                s2.log_start(4096)
            if precopy:
                pre = s2.precopy()
                d2.resume_begin()
                d2.write(pre)
                if dirty_log:
                    s2.log_report(0, g.ram.size)
            else:
                d2.resume_begin()
            g.load.pause()
            regs = _regs(g.nvme) if check_regs else {}
            t0 = t = mark()
            s2.set_state(3)                        # STOP_COPY
            t = step("src stop_copy", t)
            data = s2.read_until_zero()
            t = step("src read", t)
            s2.set_state(1)                        # STOP
            t = step("src stop", t)
            if dirty_log:
                s2.log_report(0, g.ram.size)       # the final dirty sync (QEMU: ram_save_complete)
                if log_stop_inside:
                    s2.log_stop()
                t = step("src dirty report", t)
            d2.write(data)
            t = step("dst write (load)", t)
            d2.set_state(1)                        # RESUMING -> STOP (loaded already)
            t = step("dst stop", t)
        else:
            s1, d1 = V1Driver(src_c), V1Driver(dst_c)
            d1.load_setup()
            if dirty_log:
                s1.dirty(1)                        # DIRTY_PAGES START
            if precopy:
                s1.save_setup()
                chunks = s1.save_iterate()
                pre = b"".join(chunks)
                for c in chunks:
                    d1.load_buffer(c)
            g.load.pause()
            regs = _regs(g.nvme) if check_regs else {}
            t0 = t = mark()
            if precopy:
                s1.vm_stopped()
                t = step("src vm stopped", t)
            chunks = s1.save_complete()
            t = step("src save", t)
            if dirty_log:
                s1.dirty_bitmap(0, g.ram.size)     # the final dirty sync
                if log_stop_inside:
                    s1.dirty(2)
                t = step("src dirty bitmap", t)
            data = b"".join(chunks)
            for c in chunks:
                d1.load_buffer(c)
            t = step("dst load", t)
            s1.close()
        g.load.switch(new)
        g.load.resume()                            # doorbells land in a stopped destination
        t = step("guest moved", t)
        if scheme == "v2":
            d2.set_state(2)
        else:
            d1.vm_started()
            d1.close()
        t = step("dst running", t)
        blackout = (t - t0) / 1e6
        gcw.remove()
        marks[1:-1] = sorted(marks[1:-1] + [("client " + n, int(ts)) for n, ts in gct.marks()
                                            if t0 <= ts <= t], key=lambda m: m[1])
    except BaseException:
        gcw.remove()
        new.close()
        dst_c.close()
        raise
    if check_regs:
        after = _regs(new)
        if after != regs:
            raise AssertionError(f"registers differ after migration: {regs} -> {after}")
    if dirty_log and not log_stop_inside:
        # QEMU stops dirty logging in its migration cleanup on the source, after the
        # stream is complete (ram_save_cleanup -> log_global_stop): not in the blackout.
        if scheme == "v2":
            s2.log_stop()
        else:
            s1.dirty(2)                            # DIRTY_PAGES STOP
    old = g.nvme
    g.nvme, g.client, g.daemon = new, dst_c, dst
    old.close()
    src_c.close()                                  # the source QEMU exits
    return Figures(scheme, blackout, len(data), len(pre), steps, marks)


def controller_info(d: Daemon, name: str = "nvme0") -> dict[str, Any]:
    """The controller's record from `vnvmectl --json controller list` (the operator's view)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "vnvmectl"), "--json",
                          "--rpc", d.rpc, "controller", "list"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    recs = json.loads(out)
    recs = recs.get("controllers", recs) if isinstance(recs, dict) else recs
    return next(r for r in recs if r["name"] == name)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]
