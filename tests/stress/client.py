"""One stress "guest": verified random I/O on one controller, as a separate process.

    python -m tests.stress.client SOCKET --seed N [--queues 2 --depth 16 ...]

Theory of operation
-------------------
The process owns namespace 1 of its controller.  It keeps every I/O queue `depth`
commands deep with random reads and writes of 1..8 blocks.  The truth (block contents
with generations, unknown blocks, every command tracked exactly once: MISMATCH /
DOUBLED / LOST / ERROR, retryable and storm statuses, the counters) is
tests/ioverify.py's `Verifier`; this module keeps the mechanics (HostNvme session,
buffers, CIDs) and the faults.  The namespace may hold anything when we start (an
earlier client wrote it): a block is known only once we wrote it.  A command older
than LOST_AFTER without a CQE while the controller is neither failed nor resetting is
**lost**.

Faults done here, with the daemon's I/O in flight (rates from the command line):
DMA storms (unmap + remap the data region the in-flight commands use; commands the
worker fetches in between may fail with Data Transfer Error, which is counted, not a
mismatch), CC.EN 1->0 resets and DEVICE_RESET (in-flight commands are aborted by the
spec: counted).  Faults done to us from outside: SIGKILL (the harness starts a new
client at once), a dead front-end (EOF: reconnect), a dead worker (either transparent
or CSTS.CFS -> reset, counted as `cfs_resets`).  Retryable statuses (DNR clear) are
counted (not resubmitted: the command did not take effect, a write's blocks become
unknown).

Reports: one JSON line of cumulative counters on stdout every REPORT_EVERY seconds and
at exit (SIGTERM); mismatch/lost/doubled details go to stderr at once.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import struct
import sys
import time
from typing import Any

from benchmarks.hostnvme import HostNvme
from tests.ioverify import COUNTERS, Cmd, Verifier
from vfio_user.client import GuestRam, VfioUserClient
from vfio_user.errors import ProtocolError
from vfio_user.wire import DmaMapFlag

BS = 512
RING_RAM = 4 << 20            # rings + admin buffers (never unmapped)
DATA_BASE = 1 << 32           # data buffers: a region of their own (DMA storms unmap it)
LOST_AFTER = 20.0
REPORT_EVERY = 1.0
FAULT_COUNTERS = ("storms", "cc_resets", "device_resets", "reconnects", "cfs_resets", "sessions")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Client:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.c: dict[str, int] = dict.fromkeys(FAULT_COUNTERS, 0)   # the mechanics' own counters
        self.v: Verifier | None = None          # made once the namespace size is known
        self.n: HostNvme | None = None
        self.cl: VfioUserClient | None = None
        self.ram: GuestRam | None = None
        self.data: GuestRam | None = None
        self.bufs: list[int] = []
        self.free_bufs: list[int] = []
        self.blocks = 0
        self.stop = False
        self.last_report = 0.0

    # -- session ---------------------------------------------------------------
    def connect(self) -> None:
        """Connect, map, enable; the whole sequence again if the connection drops on
        the way (a front-end killed while we set up: its replacement serves us)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.cl = VfioUserClient(self.a.socket, timeout=10.0)
                self.cl.negotiate()
                self.c["sessions"] += 1
                self._setup()
                return
            except (OSError, ConnectionError, ProtocolError, TimeoutError) as e:
                if isinstance(e, TimeoutError) and self.connection_alive():
                    raise           # the daemon answers but did not do its part: a finding
                self.close_session()
                if time.monotonic() > deadline or self.stop:
                    raise
                time.sleep(0.05)

    def connection_alive(self) -> bool:
        """False if the server closed our connection (a dead front-end)."""
        if self.cl is None:
            return False
        try:
            self.cl.region_read(0, 0x1C, 4)
            return True
        except (OSError, ConnectionError, TimeoutError):
            return False

    def peer_closed(self) -> bool:
        """True once the server closed our connection, seen without sending anything: a
        connection kept open for a front-end's successor stays 'not closed' however long
        that one takes (a request would time out and abandon a rescue)."""
        if self.cl is None or self.cl.sock is None:
            return True
        p = select.poll()
        p.register(self.cl.sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    def _setup(self) -> None:
        assert self.cl is not None
        self.ram = GuestRam(RING_RAM)
        self.data = GuestRam(self.a.queues * self.a.depth * 8 * BS * 2 + (1 << 20), base=DATA_BASE)
        self.cl.dma_map(0, RING_RAM, self.ram.fd, 0)
        self.cl.dma_map(DATA_BASE, self.data.size, self.data.fd, 0)
        self.n = HostNvme(self.cl, self.ram)
        self.n.trapped = self.a.trapped
        # Linux's admin timeout (nvme_core admin_timeout = 60 s): an admin command that is
        # slow on a machine at load 15+ while workers are killed is not a failure; one the
        # controller never completes still is (the run's deaths at 5 s were the former).
        self.n.admin_timeout = 60.0
        # ... but a front-end killed while we wait, before the supervisor could keep the
        # connection for its successor (reactor/revive.py), closes the socket: reconnect
        # then, not after 60 s (test_fd_settle kills front-ends during enable/identify).
        self.n.alive = lambda: not self.peer_closed()
        self.enable()

    def enable(self) -> None:
        n = self.n
        assert n is not None and self.data is not None and self.ram is not None
        # A fresh layout of the ring RAM at every (re-)enable: zeroed (no stale phase
        # bits in the new CQs) and allocated from the start again (resets repeat).
        self.ram.mm[:] = bytes(RING_RAM)
        self.ram._next = 4096
        n.enable()
        ident = n.identify(0, 1)
        self.blocks = struct.unpack_from("<Q", ident, 0)[0]
        if self.v is None:
            self.v = Verifier(self.blocks, BS, self.a.seed, storms=lambda: self.c["storms"] > 0,
                              say=_say)
        assert self.v.model.blocks == self.blocks, "namespace 1 changed size"
        for q in range(1, self.a.queues + 1):
            n.create_io_queue(q, self.a.depth)
        per = 8 * BS
        self.bufs = [DATA_BASE + i * per for i in range(self.a.queues * self.a.depth)]
        self.free_bufs = list(self.bufs)

    def close_session(self) -> None:
        if self.n is not None:
            self.n.close()
        if self.cl is not None:
            self.cl.close()
        for r in (self.ram, self.data):
            if r is not None:
                try:
                    r.close()
                except BufferError:
                    os.close(r.fd)
        self.n = self.cl = self.ram = self.data = None

    def abort_inflight(self) -> None:
        """In-flight commands will never complete (reset, disconnect): the buffers are free."""
        if self.v is not None:
            self.v.abort_all("aborted")
        self.free_bufs = list(self.bufs)

    # -- I/O ----------------------------------------------------------------------
    def submit_one(self, qid: int) -> bool:
        n, v = self.n, self.v
        assert n is not None and v is not None and self.data is not None
        if not self.free_bufs:
            return False
        cmd = v.plan(self.rng, self.rng.randint(1, 8))
        if cmd is None:
            return False
        nbytes = cmd.nblk * BS
        buf = self.free_bufs.pop()
        self.data.view(buf, nbytes)[:] = (v.model.data(cmd.lba, cmd.nblk, cmd.gen) if cmd.write
                                          else b"\xee" * nbytes)
        cid = n.next_cid()
        while v.busy_cid(qid, cid):
            cid = n.next_cid()
        prp1, prp2 = n.prps(buf, nbytes, self.data)
        cmd.qid, cmd.cid, cmd.buf = qid, cid, buf
        v.submitted(cmd)
        n.submit(qid, n.sqe(0x01 if cmd.write else 0x02, cid, 1, prp1, prp2,
                            (cmd.lba & 0xFFFFFFFF, cmd.lba >> 32, cmd.nblk - 1)))
        return True

    def _read(self, cmd: Cmd) -> bytes:
        assert self.data is not None
        off = cmd.buf - self.data.base
        return self.data.mm[off:off + cmd.nblk * BS]

    def reap(self) -> int:
        n, v = self.n, self.v
        assert n is not None and v is not None
        got = 0
        for qid in range(1, self.a.queues + 1):
            while True:
                e = n.poll_cqe(qid)
                if e is None:
                    break
                cmd = v.completed(qid, e.cid, e.status, self._read, sqid=e.sqid)
                if cmd is not None:
                    self.free_bufs.append(cmd.buf)
                got += 1
        return got

    # -- faults we do ourselves ---------------------------------------------------------
    def storm(self) -> None:
        """Unmap and remap the data region with commands in flight on it."""
        assert self.cl is not None and self.data is not None
        self.c["storms"] += 1
        for _ in range(self.rng.randint(1, 4)):
            self.cl.dma_unmap(DATA_BASE, self.data.size)
            self.cl.dma_map(DATA_BASE, self.data.size, self.data.fd, 0,
                            flags=DmaMapFlag.READ | DmaMapFlag.WRITE)

    def reset(self, device: bool) -> None:
        n = self.n
        assert n is not None and self.cl is not None
        if device:
            self.cl.reset()
            self.c["device_resets"] += 1
        else:
            n.disable()
            self.c["cc_resets"] += 1
        n.queues.clear()
        n.stray.clear()
        self.abort_inflight()
        self.enable()

    # -- the loop ---------------------------------------------------------------------
    def report(self, final: bool = False) -> None:
        v = self.v
        rec: dict[str, Any] = dict(v.c if v is not None else dict.fromkeys(COUNTERS, 0), **self.c)
        rec.update(inflight=len(v.inflight) if v else 0, known_blocks=len(v.model.gen) if v else 0,
                   final=final)
        print(json.dumps(rec), flush=True)
        self.last_report = time.monotonic()

    def run(self) -> None:
        self.connect()
        a = self.a
        next_storm = time.monotonic() + self._period(a.storm_every)
        next_reset = time.monotonic() + self._period(a.reset_every)
        stalled_since = None
        t_start = time.monotonic()
        while not self.stop:
            try:
                v = self.v
                assert v is not None
                if a.max_iops and v.c["submitted"] > a.max_iops * (time.monotonic() - t_start):
                    self.reap()
                    time.sleep(0.002)
                    continue
                for qid in range(1, a.queues + 1):
                    while v.on_queue(qid) < a.depth - 1:
                        if not self.submit_one(qid):
                            break
                got = self.reap()
                now = time.monotonic()
                if got:
                    stalled_since = None
                elif v.inflight:
                    stalled_since = stalled_since or now
                    if now - stalled_since > 2.0:
                        self.check_controller(now - stalled_since)
                    time.sleep(0.0002)
                if now > next_storm and v.inflight:
                    self.storm()
                    next_storm = now + self._period(a.storm_every)
                if now > next_reset:
                    self.reset(device=self.rng.random() < 0.5)
                    next_reset = now + self._period(a.reset_every)
                    stalled_since = None
                if now - self.last_report > REPORT_EVERY:
                    self.report()
            except (ConnectionError, BrokenPipeError, ConnectionResetError, TimeoutError) as e:
                if self.stop:
                    break
                # An admin command waits for its CQE in our memory: with the front-end
                # dead that is a timeout, not an EOF.  On a live connection it is a finding.
                if isinstance(e, TimeoutError) and self.connection_alive():
                    raise
                print(f"connection lost ({e}): reconnecting", file=sys.stderr, flush=True)
                self.abort_inflight()
                self.close_session()
                self.c["reconnects"] += 1
                self.connect()
                stalled_since = None
        self.report(final=True)

    def check_controller(self, stalled: float) -> None:
        n, v = self.n, self.v
        assert n is not None and v is not None
        csts = n.reg_read(0x1C)
        if csts & 2:
            self.c["cfs_resets"] += 1
            print(f"controller fatal (CSTS {csts:#x}) with {len(v.inflight)} in flight: reset",
                  file=sys.stderr, flush=True)
            self.abort_inflight()
            n.disable()
            n.queues.clear()
            n.stray.clear()
            self.enable()
            return
        if stalled > LOST_AFTER:
            v.lost(v.overdue(LOST_AFTER), f"CSTS {csts:#x}")
            # Start over on a clean controller so the run goes on (and counts the loss).
            self.reset(device=True)

    def _period(self, mean: float) -> float:
        return self.rng.expovariate(1.0 / mean) if mean > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--storm-every", type=float, default=0.0, help="mean seconds between DMA storms")
    p.add_argument("--reset-every", type=float, default=0.0, help="mean seconds between resets")
    p.add_argument("--trapped", action="store_true")
    p.add_argument("--max-iops", type=float, default=0.0, help="throttle submissions (0: as fast as possible)")
    a = p.parse_args(argv)
    cl = Client(a)

    def on_term(_sig: int, _frame: Any) -> None:
        cl.stop = True
    signal.signal(signal.SIGTERM, on_term)
    try:
        cl.run()
    finally:
        cl.close_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
