"""Worker process: pinned to one core, polls the queue pairs it was given, sleeps when idle.

Theory of operation (adaptive polling)
--------------------------------------
The guest rings doorbells by storing into the mmapped doorbell page: nothing traps,
so the only way to see new work is to look.  A worker therefore busy-polls while
there is work, keeps spinning for `spin_polls` empty rounds (cheap, catches the next
request of a QD1 stream), then sleeps in `epoll.poll()` with a timeout that doubles from
`idle_min_us` to `idle_max_us` (and to `deep_idle_us` once nothing happened for
`deep_idle_after_s`).  Any ring message (the front-end writes the ring's
eventfd when we announced sleep) or a kick (a trapped doorbell write seen by the
front-end) ends the sleep at once.  A sleeping worker never misses work: the worst
case is one `deep_idle_us` of extra latency for the first request after a long idle
period, which is also the bound on how stale our view of a mmapped doorbell can get.  `polling="busy"` never
sleeps (lowest latency, one core at 100 %).

Deep idle with guests attached: a slot whose doorbell words have not changed since its
last deep-idle poll found nothing is not polled again (`Slot.idle_poll`, the probe; see
workers/slot.py), so a 40 ms wake-up costs one comparison per controller.

Trapped doorbells: when every slot that holds queues belongs to a controller in
"trapped" doorbell mode, each guest doorbell write reaches the front-end as a message
and kicks us through the slot's ring eventfd, so after the spin the worker sleeps
`trapped_sleep_us` (1 s, only a safety net) right away - no spin (`trapped_spin_polls`,
0) and no stepping up from `idle_min_us`.  Before that sleep each slot's `prepare_sleep()` arms EventIdx for
shadow doorbells and re-checks the tails (nvme.qpair); if work turned up we poll
again instead.  The sleep is cut short for a coalesced interrupt that is due.

Cost of an idle wake-up: an idle daemon wakes ~1000 times in its first second and 25
times a second after that, and on the 2-vCPU VM one wake-up of a cold process costs
~70 us of CPU in the kernel alone, so every syscall and exception in it counts.  The
sleep is one `epoll.poll()` on an epoll set built once (rebuilt only when the set of
slots/pending channels changes, `_ep_dirty`), not a `select()` that re-copies the fd
list each time, and the control socket is read only when the poll says it is readable
(a non-blocking recvmsg that fails costs a cold BlockingIOError, ~30 us here).  The
rounds&1023 `_control()` call in the busy loop still catches anything the poll did not
report.  Likewise `Ring.woke()` (clear the sleeping flag, drain the eventfd: a failing
read) runs after a sleep only for rings whose eventfd fired; the other rings keep the
flag set while the worker stays idle - it is about to sleep again anyway, and a
producer that sees the flag just writes the eventfd, which ends the next sleep at once
and is drained then.  The first round that finds work calls woke() on every ring
(`_flagged`), so a busy worker's producers still make no syscalls.

Backend I/O (workers/aio.py): while requests on file/nbd/rbd backends are out and
completing, an idle period spins only `backend_spin_polls` rounds (32; enough for another
guest's next doorbell after its completion), then the worker sleeps (idle_min steps,
1 ms in practice: epoll counts milliseconds) and the next completion's eventfd/socket,
which is in the sleep set, wakes it; each wake also polls the queues, so SQEs the guest
added meanwhile go out with it.  A spinning worker counts as a CPU hog to the
scheduler: on a shared core (the 2-vCPU VM at load 12-18) it spent 60-80 % of a file
QD32 run runnable but not running, and ~30 us of CPU per I/O, ~20 after.  A stalled
backend (no completion for 64 rounds) leaves the normal spin-then-sleep in charge,
since nothing would wake the worker for its neighbours' doorbells.  The native data
path's own io_uring rings (file:) differ: the C poll spins in slices of 20 us for up
to 2 ms after the last completion or new command while ring requests are out
(nvme/native/fastpath.c vn_poll; each slice ends with a sched_yield() for a front-end
that woke on this core), so Python's rounds seldom reach that sleep while a stream flows - the ~40 us wake-up per completion burst kept the disk at ~10 of 32 reads
in flight, not the ~20 fio keeps, and the file stream at 0.78x of fio.

Control: the supervisor talks to the worker over a SOCK_SEQPACKET socket (`ctl`):
`channel` hands over a new front-end channel, `stop` ends the process.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from typing import Any

from reactor import ipc
from reactor.channel import Channel
from ops.proctitle import set_process_name
from workers.slot import Slot

log = logging.getLogger("vnvmed.worker")


class Worker:
    def __init__(self, wid: int, ctl: socket.socket, opts: dict[str, Any]) -> None:
        self.wid = wid
        self.ctl = ctl
        self.slots: list[Slot] = []
        self.busy = opts.get("polling", "adaptive") == "busy"
        self.datapath = str(opts.get("datapath", "python"))   # nvme.native or nvme.qpair
        self.spin_polls = int(opts.get("spin_polls", 200))
        self.idle_min = int(opts.get("idle_min_us", 50)) / 1e6
        self.idle_max = int(opts.get("idle_max_us", 1000)) / 1e6
        # After `deep_after` s without work the sleep grows to `deep_max`: an idle VM
        # costs ~nothing, and the first request after a long pause waits at most that.
        self.deep_after = float(opts.get("deep_idle_after_s", 1.0))
        self.deep_max = int(opts.get("deep_idle_us", 40000)) / 1e6
        # Only trapped-doorbell queues (or none): kicks wake us, this is a safety net.
        self.trapped_max = int(opts.get("trapped_sleep_us", 1_000_000)) / 1e6
        # No spin before such a sleep by default: the kick that wakes us comes from the
        # front-end, which often shares our core - spinning would delay the very
        # REGION_WRITE that carries the next doorbell (QD1 p50 1.2 ms with 200 rounds).
        self.trapped_spin = int(opts.get("trapped_spin_polls", 0))
        # While backend completions flow (see "Backend I/O"): spin this much, not spin_polls.
        # 0 cost a QD1 ram neighbour of a QD32 file stream its p50: 30 -> 300 us (load ~14).
        self.backend_spin = int(opts.get("backend_spin_polls", 32))
        self.stop = False
        self.pending: list[tuple[str, socket.socket]] = []
        self._ep: select.epoll | None = None
        self._ep_dirty = True      # slots/pending changed: rebuild the epoll set before sleeping
        self._rings: list[Any] = []
        self._ring_by_fd: dict[int, Any] = {}
        self._aio_by_fd: dict[int, Slot] = {}
        # Slots with asynchronous namespaces (their BackendIo settles before a sleep) and
        # "only trapped-doorbell queues here": both change only with a message or the slot
        # set, so they are recomputed after those, not on every idle wake-up (~30 us of
        # cold cache lines with 32 slots).
        self._aio_sleepers: list[Slot] | None = None
        self._trapped: bool | None = None
        # Slots a deep-idle round visits: those with queues, an admin watch or async
        # namespaces.  A slot of a controller whose queues all run on the other worker
        # has nothing to poll here (64 guests: half of each worker's slots).
        self._deep_slots: list[Slot] | None = None
        # Every deep slot's probe in one list, while all of them hold one: a quiet
        # deep-idle wake-up is then one loop over (view, copy) pairs, no slot touched.
        self._flat: list[tuple[memoryview, memoryview]] | None = None
        self._flagged = False      # some ring may still say "sleeping" (see theory above)
        self._quiet_wake = False   # the last sleep ended with no ring event
        self._armed: set[Any] = set()   # rings whose "sleeping" flag is set and unseen
        self._deep = False         # the last sleep was a deep-idle one (slots leave probes)
        self._probing = False      # some slot may hold a probe
        self.polls = 0
        self.idle_polls = 0
        self.sleeps = 0

    # --- supervisor control ---------------------------------------------------------
    def _control(self) -> None:
        while True:
            try:
                msg, fds = ipc.recv(self.ctl)
            except (BlockingIOError, InterruptedError):
                return
            if msg is None:  # supervisor gone: nothing left to serve
                self.stop = True
                return
            op = msg.get("op")
            if op == "channel" and len(fds) == 1:
                self.pending.append((str(msg.get("name")), socket.socket(fileno=fds[0])))
                self._ep_dirty = True
                self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
            elif op == "drop":
                for slot in self.slots:
                    if slot.name == msg.get("name"):
                        slot.close()
                        self._check_released(slot)
                self.slots = [s for s in self.slots if not s.dead]
                # A channel of that front-end not attached yet (it died while setting up)
                # would become a slot nobody drops; the next front-end's channel comes
                # after this message.
                for name, sock in [p for p in self.pending if p[0] == msg.get("name")]:
                    sock.close()
                self.pending = [p for p in self.pending if p[0] != msg.get("name")]
                self._ep_dirty = True
                self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
            elif op == "stop":
                self.stop = True
            elif op == "ping":
                ipc.send(self.ctl, {"op": "pong", "polls": self.polls, "idle": self.idle_polls,
                                    "sleeps": self.sleeps,
                                    "queues": sum(s.nqueues for s in self.slots),
                                    "slots": {s.name: dict(s.stats, nqueues=s.nqueues) for s in self.slots}})
            else:
                ipc.close_fds(fds)
                log.error("worker %d: unexpected control message %r", self.wid, op)

    def _check_released(self, slot: Slot) -> None:
        """A dropped slot must leave no guest mapping or ring behind (Slot.close unmaps
        them all).  One that a live view still pins is freed by CPython when that view
        goes (the slot is dropped, so the mmap dies with its last export); until then
        it holds a descriptor and pages, so say so: that is a leak to find, not to retry
        (issue 12: liburing's Iovec leaked a view per I/O, backends/uring.py)."""
        left = slot.pinned()
        if left:
            log.warning("worker %d: dropped controller %s: %d guest mapping(s)/ring(s) still "
                        "pinned by a live view", self.wid, slot.name, left)

    def _queues(self) -> int:
        return sum(s.nqueues for s in self.slots)

    def _attach_pending(self) -> None:
        still = []
        for name, sock in self.pending:
            try:
                chan = Channel.try_attach(sock)
            except Exception as e:
                log.error("worker %d: channel from %s failed: %s", self.wid, name, e)
                sock.close()
                continue
            if chan is None:
                still.append((name, sock))
            else:
                self.slots.append(Slot(name, chan, self._queues, datapath=self.datapath))
        self.pending = still
        self._ep_dirty = True
        self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
    # --- the loop ---------------------------------------------------------------------
    def _ring_waiting(self) -> bool:
        for slot in self.slots:
            if not slot.dead and not slot.chan.rx.is_empty():
                return True
        return False

    def _messages(self) -> int:
        n = 0
        for slot in self.slots:
            try:
                msgs = slot.chan.recv_all()
                if msgs:
                    self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
                for m in msgs:
                    try:
                        slot.handle(m)
                    except (ConnectionError, OSError):
                        raise
                    except Exception as e:
                        # One bad request (our bug or a stale queue id) fails that request only.
                        log.exception("worker %d: %s: %r failed", self.wid, slot.name, m.get("op"))
                        if "seq" in m:
                            slot.chan.send({"op": "ack", "seq": m["seq"], "error": str(e)})
                # A front-end's admin_watch (re-armed every few seconds by an idle one) is
                # not work: counted, it would drop the worker from deep idle into 1 ms
                # sleeps for a second each time (64 idle guests: 550 wake-ups a second).
                n += sum(1 for m in msgs if m.get("op") != "admin_watch")
                slot.check_quiesced()
            except Exception:
                # A front-end died or sent something we cannot process: drop its slot,
                # the others keep running (the supervisor restarts the front-end).
                log.exception("worker %d: dropping controller %s", self.wid, slot.name)
                slot.close()
                self._check_released(slot)
        if any(s.dead for s in self.slots):
            self.slots = [s for s in self.slots if not s.dead]
            self._ep_dirty = True
            self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
        return n

    def _rebuild_ep(self) -> None:
        """A fresh epoll set for ctl, every slot's rx ring and every pending channel.

        Rebuilt rather than edited: a closed ring's eventfd number may already be
        reused by a new one, and a fresh set cannot hold a stale registration.
        """
        if self._ep is not None:
            self._ep.close()
        ep = select.epoll()
        ep.register(self.ctl.fileno(), select.EPOLLIN)
        if self._flagged:
            self._wake_rings()     # the old set's rings: none may stay flagged unseen
        self._rings = [s.chan.rx for s in self.slots if not s.dead]
        self._ring_by_fd = {r.fileno(): r for r in self._rings}
        for r in self._rings:
            ep.register(r.fileno(), select.EPOLLIN)
        # Backend completion sources (workers/aio.py): one epoll fd per slot with async namespaces.
        self._aio_by_fd = {s.aio.fileno(): s for s in self.slots if not s.dead and s.aio is not None}
        self._aio_sleepers = self._trapped = self._deep_slots = self._flat = None
        for fd in self._aio_by_fd:
            ep.register(fd, select.EPOLLIN)
        for _, sock in self.pending:
            ep.register(sock.fileno(), select.EPOLLIN)
        self._ep = ep
        self._ep_dirty = False

    def _sleep(self, timeout: float) -> bool:
        """Sleep until a ring/ctl/pending fd is readable or timeout; True if ctl or a
        pending channel may have something to read (the caller then reads them)."""
        if self._ep_dirty or self._ep is None:
            self._rebuild_ep()
        assert self._ep is not None
        # A ring still armed from the last sleep (flag set, its eventfd did not fire)
        # needs no new flag store and fence: a producer that published since saw the
        # flag and wrote the eventfd, which ends this sleep at once.
        armed = self._armed
        ready = True
        for r in self._rings:
            if r not in armed:
                if r.prepare_sleep():
                    armed.add(r)
                else:
                    ready = False
        sleepers = self._aio_sleepers
        if sleepers is None:
            sleepers = self._aio_sleepers = [s for s in self._aio_by_fd.values()
                                             if s.aio is not None and s.aio.queues]
        for slot in sleepers:
            aio = slot.aio
            if aio is not None and not aio.prepare_sleep():
                slot.aio_woke = True     # completions ready: reap them now, no sleep
                ready = False
        if not ready:
            self._wake_rings()
            return False
        self.sleeps += 1
        self._flagged = True
        try:
            events = self._ep.poll(timeout)
        except InterruptedError:
            return False
        other = False
        fired = False
        by_fd = self._ring_by_fd
        for fd, _ in events:
            r = by_fd.get(fd)
            if r is not None:
                r.woke()
                armed.discard(r)
                fired = True
            elif fd in self._aio_by_fd:
                self._aio_by_fd[fd].aio_woke = True
                self._flat = None
            else:
                other = True
        # No ring fired while every ring said "sleeping": none holds a message (a producer
        # that sees the flag writes the eventfd), so the next round need not read them.
        self._quiet_wake = not fired
        return other

    def _wake_rings(self) -> None:
        for r in self._rings:
            try:
                r.woke()
            except ValueError:
                pass           # the ring of a slot closed since the set was built
        self._flagged = False
        self._armed.clear()

    def _backend_flowing(self) -> bool:
        """Some slot has backend requests out that are completing (not a stalled server)."""
        for s in self.slots:
            a = s.aio
            if a is not None and a.outstanding and a.flowing():
                return True
        return False

    def _trapped_only(self) -> bool:
        """True if nothing here needs polling: every slot with queues is in trapped mode."""
        t = self._trapped
        if t is None:
            t = self._trapped = all(s.trapped for s in self.slots if s.nqueues)
        return t

    def _trapped_timeout(self) -> float | None:
        """Arm every slot for a kick-driven sleep; its timeout, or None to poll again."""
        timeout = self.trapped_max
        for s in self.slots:
            if not s.nqueues:
                continue
            if not s.prepare_sleep():
                return None
            due = s.sleep_deadline()
            if due is not None:
                timeout = min(timeout, max(0.0, (due - time.monotonic_ns()) / 1e9))
        return timeout

    @staticmethod
    def _flatten(slots: list[Slot]) -> list[tuple[memoryview, memoryview]] | None:
        flat: list[tuple[memoryview, memoryview]] = []
        for s in slots:
            p = s.probe
            if p is None or s.aio_woke:
                return None
            flat.extend(p)
        return flat

    def _poll_slots(self, deep: bool) -> int:
        work = 0
        slots = self.slots
        if deep:
            slots = self._deep_slots      # type: ignore[assignment]
            if slots is None:
                slots = self._deep_slots = [s for s in self.slots if s.needs_idle_poll()]
        for slot in slots:
            try:
                work += slot.idle_poll() if deep else slot.poll()
            except Exception:
                self._poll_failed(slot)
        return work

    def _poll_failed(self, slot: Slot) -> None:
        log.exception("worker %d: controller %s failed in poll", self.wid, slot.name)
        slot.chan.send({"op": "fault", "reason": "worker poll failed"})
        slot.paused = True

    def run(self) -> None:
        idle = 0
        rounds = 0
        last_work = time.monotonic()
        self.ctl.setblocking(False)
        while not self.stop:
            if self._deep:
                # Deep idle: slots whose probe holds skip their poll (workers/slot.py).
                self._deep = False
                self._probing = True
                work = -1
                flat = self._flat
                if flat is not None and self._quiet_wake:
                    for view, copy in flat:
                        if view != copy:
                            break
                    else:
                        work = 0         # no doorbell any slot reads has changed
                if work < 0:
                    self._flat = None
                    work = self._poll_slots(True)
                if rounds & 31 == 0:     # about once a second in deep idle
                    for slot in self.slots:
                        slot.check_absent()     # admin watch: doorbells of absent queues
            else:
                if self._probing:        # a probe holds only from one deep round to the next
                    self._probing = False
                    self._flat = None
                    for slot in self.slots:
                        slot.drop_probe()
                work = 0                 # the busy path: inline, no call per round
                for slot in self.slots:
                    try:
                        work += slot.poll()
                    except Exception:
                        self._poll_failed(slot)
            # While queues are busy the rings are read (recv_all) only when one holds a
            # message - one shared-word load per ring per round - or every 16th round
            # (reading them was ~12 % of a busy worker's profile).  Waiting for the 16th
            # round cost a quiesce up to 16 full native batches (~4 ms at QD 32x4): the
            # migration stop arc and a live upgrade's freeze wait on exactly that ack.
            if self._quiet_wake:
                self._quiet_wake = False     # see _sleep: skip reading every ring once
            elif not work or rounds & 15 == 0 or self._ring_waiting():
                work += self._messages()
            self.polls += 1
            rounds += 1
            if rounds & 1023 == 0:
                self._control()
                if self.pending:
                    self._attach_pending()
            if rounds & 1023 == 0:
                for slot in self.slots:
                    slot.check_absent()
            if work:
                idle = 0
                if self._flagged:
                    self._wake_rings()
                continue
            self.idle_polls += 1
            idle += 1
            if self.busy:
                continue
            trapped = self._trapped_only()
            spin = self.trapped_spin if trapped else self.spin_polls
            if idle < spin:
                if idle < self.backend_spin or not self._backend_flowing():
                    continue
                # Backend completions are arriving: the next one wakes us (its eventfd or
                # socket is in the sleep set), so after a short spin (a neighbour's next
                # doorbell) wait for it asleep, in idle_min steps.  See "Backend I/O" above.
                spin = idle
            if idle == spin:
                last_work = time.monotonic()
            if trapped:
                timeout = self._trapped_timeout()
                if timeout is None:
                    continue       # EventIdx armed but a tail moved meanwhile: poll again
            else:
                k = min(idle - spin, 16)
                cap = self.deep_max if time.monotonic() - last_work > self.deep_after else self.idle_max
                timeout = min(cap, self.idle_min * (1 << k))
                self._deep = timeout == self.deep_max
                if self._deep and self._flat is None and self._deep_slots is not None:
                    self._flat = self._flatten(self._deep_slots)
            if self._sleep(timeout):
                self._control()
                if self.pending:
                    self._attach_pending()
        for slot in self.slots:
            slot.close()
        if self._ep is not None:
            self._ep.close()


def run(wid: int, core: int, ctl: socket.socket, opts: dict[str, Any]) -> None:
    """multiprocessing entry point (forked by the forkserver, see reactor/zygote.py)."""
    set_process_name(f"vnvmed: worker {wid}")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the forkserver ignores it (reactor/zygote.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ops.logsetup import setup_logging
    setup_logging(opts.get("log_level", "info"))
    try:
        os.sched_setaffinity(0, {core})
    except OSError as e:
        log.error("worker %d: cannot pin to core %d: %s", wid, core, e)
        raise SystemExit(2)
    w = Worker(wid, ctl, opts)
    signal.signal(signal.SIGTERM, lambda *_: setattr(w, "stop", True))
    w.run()
