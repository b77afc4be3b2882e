"""Verified I/O, the model: what the namespace must hold and every command in flight.

Theory of operation
-------------------
One model serves every verified-I/O driver of the tests: tests/verifyload.py (a guest
in a thread of the test, raw rings, pause/switch for migrations) and
tests/stress/client.py (a guest in its own process, through HostNvme, with faults).
The drivers own the mechanics (rings, doorbells, CIDs, buffers); `Verifier` owns the
truth:

- Blocks (`BlockModel`): every block of the namespace is *known* with a generation
  (the content of the last write that completed successfully), *zero* (never
  written, on a namespace that started zeroed) or *unknown* (a write whose outcome is
  not known: aborted by a reset or a disconnect, retried, failed).  A write fills each
  block with `pattern(seed, lba, gen)`; a read checks every known block byte for byte
  and skips unknown ones.  A block with a command in flight is *busy*: never picked
  again until that command completes, so every outcome is deterministic.
- Commands (`Cmd`, keyed by (qid, cid)): in flight from `submitted()` until exactly
  one completion takes it out (`completed()`).  A completion for a command that is not
  in flight is *doubled*; a command older than a bound without one is *lost*
  (`overdue()`, the driver decides when the controller should have answered);
  `abort_all()` forgets the in-flight ones where the spec says they are gone
  (controller reset, connection lost): their writes become unknown.
- Statuses: 0 is success; with `tolerate` on, a status with DNR clear (Command
  Interrupted after a worker was replaced: the host retries it) is *retryable* and a
  Data Transfer Error while the driver unmaps the data region on purpose (`storms`)
  is counted apart; anything else is an *error*.  A strict driver (migration: nothing
  may fail) turns tolerance off.

A driver's round: `plan(rng, nblk)` picks a free range, the direction (always a
write where a read would check nothing) and a fresh generation; the driver fills a
write's buffer with `model.data(...)`, sets qid/cid/buf, calls `submitted(cmd)`, rings;
for each CQE it calls `completed(qid, cid, status, read, sqid)` (`read(cmd)` returns the
buffer of a read that succeeded) and frees `cmd.buf`.  A "block" is whatever unit the
driver chose (tests/verifyload.py: 4 KiB of LBAs; tests/stress/client.py: one LBA).

Counters (`Verifier.c`, plain ints) and problems (`Verifier.problems`, one line each:
MISMATCH / DOUBLED / LOST / ERROR; `say` also prints them at once) are what the
drivers report.  tests/unit/test_ioverify.py checks every verdict from both sides.
"""
from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

SC_DATA_TRANSFER_ERROR = 0x04
DNR = 0x4000                  # in the 15-bit status (CQE DW3 >> 17)
COUNTERS = ("submitted", "completed", "reads", "writes", "bytes_verified", "mismatches", "lost",
            "doubled", "retryable", "errors", "storm_dte", "aborted")


def pattern(seed: int, lba: int, gen: int, size: int) -> bytes:
    """The content of block `lba` written with generation `gen` (`size` bytes)."""
    return struct.pack("<QQQQ", seed, lba, gen, (lba * 0x9E3779B1 + gen) & 0xFFFFFFFFFFFFFFFF) * (size // 32)


class BlockModel:
    def __init__(self, blocks: int, block_size: int, seed: int, zeroed: bool) -> None:
        self.blocks = blocks
        self.bs = block_size
        self.seed = seed
        self.gen: dict[int, int] = {}      # lba -> generation of its content (0: zeroes)
        self.unknown: set[int] = set()     # only used when zeroed: absent means zero
        self.zeroed = zeroed
        self.busy: set[int] = set()
        self._zero = bytes(block_size)

    def expected(self, lba: int) -> bytes | None:
        """What block `lba` must read as (None: unknown)."""
        g = self.gen.get(lba)
        if g is not None:
            return pattern(self.seed, lba, g, self.bs) if g else self._zero
        if self.zeroed and lba not in self.unknown:
            return self._zero
        return None

    def known(self, lba: int) -> bool:
        return lba in self.gen or (self.zeroed and lba not in self.unknown)

    def free(self, lba: int, nblk: int) -> bool:
        return not any(b in self.busy for b in range(lba, lba + nblk))

    def claim(self, lba: int, nblk: int) -> None:
        self.busy.update(range(lba, lba + nblk))

    def release(self, lba: int, nblk: int) -> None:
        for b in range(lba, lba + nblk):
            self.busy.discard(b)

    def data(self, lba: int, nblk: int, gen: int) -> bytes:
        return b"".join(pattern(self.seed, b, gen, self.bs) for b in range(lba, lba + nblk))

    def written(self, lba: int, nblk: int, gen: int) -> None:
        for b in range(lba, lba + nblk):
            self.gen[b] = gen
            self.unknown.discard(b)

    def unsure(self, lba: int, nblk: int) -> None:
        for b in range(lba, lba + nblk):
            self.gen.pop(b, None)
            if self.zeroed:
                self.unknown.add(b)

    def check(self, lba: int, nblk: int, got: bytes | memoryview) -> tuple[int, list[tuple[int, bytes]]]:
        """(bytes verified, [(lba, first bytes read)] of the blocks that differ)."""
        bs = self.bs
        ok, bad = 0, []
        for i, b in enumerate(range(lba, lba + nblk)):
            exp = self.expected(b)
            if exp is None:
                continue
            chunk = got[i * bs:(i + 1) * bs]
            if chunk != exp:
                bad.append((b, bytes(chunk[:32])))
            else:
                ok += bs
        return ok, bad


@dataclass(slots=True)
class Cmd:
    qid: int
    cid: int
    lba: int
    nblk: int
    write: bool
    gen: int = 0
    buf: int = 0                   # the driver's buffer (an address or an index)
    t: float = field(default_factory=time.monotonic)


class Verifier:
    """Blocks + commands + counters (see the module doc)."""

    def __init__(self, blocks: int, block_size: int, seed: int, *, zeroed: bool = False,
                 tolerate: bool = True, storms: Callable[[], bool] = lambda: False,
                 say: Callable[[str], None] | None = None) -> None:
        self.model = BlockModel(blocks, block_size, seed, zeroed)
        self.inflight: dict[tuple[int, int], Cmd] = {}
        self.c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.problems: list[str] = []
        self.tolerate = tolerate
        self.storms = storms
        self.say = say
        self._next_gen = 0

    def _problem(self, line: str) -> None:
        if len(self.problems) < 1000:
            self.problems.append(line)
        if self.say is not None:
            self.say(line)

    # -- submission ---------------------------------------------------------------
    def pick(self, rng: random.Random, nblk: int, tries: int = 8, align: int = 1) -> int | None:
        """A free range of `nblk` blocks (start a multiple of `align`), or None."""
        top = self.model.blocks - nblk
        for _ in range(tries):
            lba = rng.randrange(0, top // align + 1) * align
            if self.model.free(lba, nblk):
                return lba
        return None

    def next_gen(self) -> int:
        self._next_gen += 1
        return self._next_gen

    def wants_write(self, rng: random.Random, lba: int, nblk: int, ratio: float = 0.5) -> bool:
        """Write with probability `ratio`, and always where a read would check nothing."""
        return rng.random() < ratio or not any(self.model.known(b) for b in range(lba, lba + nblk))

    def plan(self, rng: random.Random, nblk: int, ratio: float = 0.5, align: int = 1) -> Cmd | None:
        """The next command's blocks, direction and generation (None: no free range
        found this time).  The driver fills in qid/cid/buf, writes `model.data(...)`
        into a write's buffer, and calls `submitted()` before it rings the doorbell."""
        lba = self.pick(rng, nblk, align=align)
        if lba is None:
            return None
        write = self.wants_write(rng, lba, nblk, ratio)
        return Cmd(0, 0, lba, nblk, write, self.next_gen() if write else 0)

    def submitted(self, cmd: Cmd) -> None:
        key = (cmd.qid, cmd.cid)
        if key in self.inflight:
            raise AssertionError(f"driver bug: CID {cmd.cid} reused on queue {cmd.qid} while in flight")
        self.model.claim(cmd.lba, cmd.nblk)
        self.inflight[key] = cmd
        self.c["submitted"] += 1

    def busy_cid(self, qid: int, cid: int) -> bool:
        return (qid, cid) in self.inflight

    def on_queue(self, qid: int) -> int:
        return sum(1 for k in self.inflight if k[0] == qid)

    # -- completion ---------------------------------------------------------------
    def completed(self, qid: int, cid: int, status: int,
                  read: Callable[[Cmd], bytes | memoryview] | None = None,
                  sqid: int | None = None) -> Cmd | None:
        """One CQE: returns the command it completed (None: doubled).  `read(cmd)` gives
        a read's buffer (called only for a read that succeeded: it is checked); `sqid`
        is the CQE's SQID."""
        cmd = self.inflight.pop((qid, cid), None)
        if cmd is None:
            self.c["doubled"] += 1
            self._problem(f"DOUBLED: completion for qid {qid} cid {cid} that is not in flight")
            return None
        self.c["completed"] += 1
        m = self.model
        if sqid is not None and sqid != qid:
            self.c["errors"] += 1
            self._problem(f"ERROR: queue {qid} CID {cid} completed with SQID {sqid}")
        sc = status & 0x7FF           # SCT and SC
        if status and self.tolerate and not status & DNR and sc != SC_DATA_TRANSFER_ERROR:
            self.c["retryable"] += 1  # the command did not take effect as a whole
            if cmd.write:
                m.unsure(cmd.lba, cmd.nblk)
        elif status and self.tolerate and sc == SC_DATA_TRANSFER_ERROR and self.storms():
            self.c["storm_dte"] += 1
            if cmd.write:
                m.unsure(cmd.lba, cmd.nblk)
        elif status:
            self.c["errors"] += 1
            self._problem(f"ERROR status {status:#x} qid {qid} cid {cid} lba {cmd.lba}+{cmd.nblk} "
                          f"write={cmd.write}")
            if cmd.write:
                m.unsure(cmd.lba, cmd.nblk)
        elif cmd.write:
            self.c["writes"] += 1
            m.written(cmd.lba, cmd.nblk, cmd.gen)
        else:
            self.c["reads"] += 1
            assert read is not None, "a read completion needs its data"
            ok, bad = m.check(cmd.lba, cmd.nblk, read(cmd))
            self.c["bytes_verified"] += ok
            for lba, head in bad:
                self.c["mismatches"] += 1
                self._problem(f"MISMATCH: lba {lba} gen {m.gen.get(lba, 0)} qid {qid} cid {cid}: "
                              f"{head.hex()}")
        m.release(cmd.lba, cmd.nblk)
        return cmd

    def abort_all(self, why: str = "aborted") -> list[Cmd]:
        """The in-flight commands will never complete (reset, disconnect): forgotten,
        their writes unknown; counted under `why`."""
        cmds = list(self.inflight.values())
        for cmd in cmds:
            self.model.release(cmd.lba, cmd.nblk)
            if cmd.write:
                self.model.unsure(cmd.lba, cmd.nblk)
        self.c[why] = self.c.get(why, 0) + len(cmds)
        self.inflight.clear()
        return cmds

    def overdue(self, after: float, now: float | None = None) -> list[Cmd]:
        now = time.monotonic() if now is None else now
        return [c for c in self.inflight.values() if now - c.t > after]

    def lost(self, cmds: list[Cmd], why: str) -> None:
        """The driver gave up on `cmds` (no completion in time, or none at the end):
        counted and reported; they stay in flight until `abort_all()` or a late CQE."""
        now = time.monotonic()
        for cmd in cmds:
            self.c["lost"] += 1
            self._problem(f"LOST: qid {cmd.qid} cid {cmd.cid} lba {cmd.lba}+{cmd.nblk} "
                          f"write={cmd.write} ({now - cmd.t:.0f} s, {why})")
