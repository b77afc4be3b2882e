"""Single-producer / single-consumer message ring in POSIX shared memory.

Theory of operation
===================

Layout (one ``posix_ipc.SharedMemory`` segment, named ``/<prefix>-ring-<n>``)::

    offset   0  magic u32 'VNRG', version u32, capacity u64, data offset u64
    offset  64  head  u64   written only by the consumer  (own cache line)
    offset 128  tail  u64   written only by the producer  (own cache line)
    offset 192  sleeping u32  written only by the consumer (own cache line)
    offset 256  data area, ``capacity`` bytes, capacity a power of two

head and tail are free-running byte counters (they never wrap: 2**64 bytes is
centuries of traffic); ``counter & (capacity - 1)`` is the position in the data
area and ``tail - head`` is the number of used bytes. Keeping head and tail on
separate cache lines stops the two processes from bouncing one line on every
message (false sharing).

A message is a record at an 8-byte aligned position: a u32 length, then that
many bytes of msgpack, padded to the next multiple of 8. Records are never split
across the end of the data area, because msgpack wants one contiguous buffer to
decode in place: when a record does not fit in the bytes left before the end,
the producer writes the *wrap marker* (length 0xFFFFFFFF) there and the record
starts at position 0; the consumer, on reading the marker, skips to the next
multiple of capacity. Alignment guarantees at least 8 bytes are left, so the
marker always fits. A record is at most capacity/2 bytes, so one that fits
nowhere now will fit once the consumer has drained the ring.

Memory ordering
---------------
Producer: write length + payload (plain memcpy into the mapping), THEN publish
the new tail with one aligned 8-byte store through a memoryview cast to 'Q'.
Consumer: load tail (one aligned 8-byte load), THEN read length and payload,
THEN publish the new head with one aligned 8-byte store. This is enough on
x86-64 because TSO keeps stores in program order with respect to other stores,
loads in order with respect to other loads, and never moves a store before an
earlier load: a consumer that sees the new tail also sees the payload, and a
producer that sees the new head knows the consumer is done reading those bytes.
A memoryview item store of format 'Q' is a fixed-size 8-byte copy in C, which
compiles to one ``mov``; an aligned 8-byte ``mov`` is atomic, so the other side
never sees a torn counter (``struct.pack_into`` is NOT: it clears then writes).
The C compiler cannot reorder our accesses either: each one is a separate trip
through the interpreter. The GIL plays no part: it is per process. (On a weakly
ordered CPU such as aarch64 this would need explicit barriers; we target x86-64.)

Neither side trusts the other's counter: each keeps its own counter in a local
variable and only *reads* the other's, validating it (0 <= tail - head <=
capacity, lengths in range, records inside the area). A violation raises
RingCorrupt, and the ring stays corrupt: the owner of the channel must tear it
down instead of spinning on it.

Sleeping without lost wake-ups
------------------------------
Each ring has an eventfd (created by the ring creator, handed to the attacher by
fd passing). The consumer, about to block, stores sleeping=1, then re-checks the
tail, and only if still empty blocks in poll() on the eventfd (with a timeout).
The producer, after publishing tail, loads sleeping and writes the eventfd only
if it is set, so a busy consumer costs no syscalls. This is Dekker's pattern
(store A, load B on one side; store B, load A on the other), the one reordering
x86 does allow: a store can sit in the store buffer while a later load goes
ahead. Both sides therefore execute a full fence between their store and their
load. Python has no fence primitive; acquiring and releasing an uncontended
``threading.Lock`` does the job, because on Linux it is a glibc semaphore whose
sem_trywait/sem_post are ``lock``-prefixed instructions, and a locked
instruction drains the store buffer. With the fences, at least one side sees the
other's store: either the consumer sees the data and does not sleep, or the
producer sees the flag and writes the eventfd. Where that reasoning does not
hold (not x86-64, or a CPython whose locks are not semaphores), the module sets
FENCE_IS_FULL_BARRIER = False and wait() caps each blocking poll at 10 ms, so a
lost wake-up costs latency, never a hang.

Ownership
---------
Ring.create() makes the segment (O_CREX) and the eventfd; only that object
unlinks the segment (unlink()). Ring.attach() takes ownership of the eventfd fd
it is given (closes it on close()) and never unlinks. close() unmaps and closes
fds; call unlink() on the creator when the peer no longer needs to attach.
"""
from __future__ import annotations

import mmap
import os
import select
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import posix_ipc

from nvme import fence

__all__ = ["Ring", "RingCorrupt", "RingStats"]

MAGIC = 0x47524E56  # 'VNRG' little-endian
VERSION = 1
HEADER_SIZE = 256
_OFF_HEAD = 64
_OFF_TAIL = 128
_OFF_SLEEPING = 192
WRAP = 0xFFFFFFFF
MIN_CAPACITY = 64
MAX_CAPACITY = 1 << 30   # keeps every length well inside u32

# See "Sleeping without lost wake-ups" and nvme/fence.py: our fence is a lock round
# trip, a full barrier only for semaphore-based locks on x86-64 (locked instructions).
FENCE_IS_FULL_BARRIER = fence.FULL_BARRIER
_SLEEP_CAP_MS = None if FENCE_IS_FULL_BARRIER else 10


class RingCorrupt(Exception):
    """The shared header or a record is inconsistent; the ring must be discarded."""


@dataclass(frozen=True, slots=True)
class RingStats:
    """Counters of this end of the ring (observability, printed by the CLI)."""
    name: str
    capacity: int
    used_bytes: int      # tail - head as seen now
    messages_put: int
    messages_got: int
    full_events: int     # put() that returned False
    wakeups_sent: int    # eventfd writes done by put()


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One direction of a message channel: one producer process, one consumer process.

    Sleeping on several rings and sockets at once (what worker loops do)::

        if all(r.prepare_sleep() for r in rings):   # all(): stops at first False
            select.select([*rings, *socks], [], [], timeout)
        for r in rings:
            r.woke()                                # always: clears every flag

    A ring whose prepare_sleep() was not reached keeps its flag clear, so
    calling woke() on it is harmless.
    """

    name: str
    eventfd: int

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, eventfd: int,
                 creator: bool, size: int) -> None:
        # Private: use create() / attach().
        self.name = name
        self.eventfd = eventfd
        self._creator = creator
        self._closed = False
        self._corrupt: str | None = None
        self._mm = mmap.mmap(shm.fd, size)
        shm.close_fd()  # the mapping keeps the memory; the fd is no longer needed
        self._views: list[memoryview] = []
        base = self._view(memoryview(self._mm))
        self._meta32 = self._view(base[0:8].cast("I"))
        self._meta64 = self._view(base[8:24].cast("Q"))
        self._head_w = self._view(base[_OFF_HEAD:_OFF_HEAD + 8].cast("Q"))
        self._tail_w = self._view(base[_OFF_TAIL:_OFF_TAIL + 8].cast("Q"))
        self._sleep_w = self._view(base[_OFF_SLEEPING:_OFF_SLEEPING + 4].cast("I"))
        self._capacity = 0
        self._base = base
        self._puts = self._gets = self._full = self._wakes = 0

    def _view(self, mv: memoryview) -> memoryview:
        self._views.append(mv)
        return mv

    def _bind_data(self, capacity: int) -> None:
        self._capacity = capacity
        self._mask = capacity - 1
        self.max_message = capacity // 2 - 8  # payload bytes; record <= capacity/2
        self._data = self._view(self._base[HEADER_SIZE:HEADER_SIZE + capacity])
        self._words = self._view(self._data.cast("I"))
        self._head = self._head_w[0]
        self._tail = self._tail_w[0]

    # ------------------------------------------------------------------ setup

    @classmethod
    def create(cls, name: str, capacity: int = 1 << 20) -> "Ring":
        """Create the segment (fails if it exists) and a fresh eventfd.

        Raises ValueError for a capacity that is not a power of two in
        [64, 2**30], posix_ipc.ExistentialError if the name is taken.
        """
        if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity {capacity} must be a power of two in "
                             f"[{MIN_CAPACITY}, {MAX_CAPACITY}]")
        size = HEADER_SIZE + capacity
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        efd = -1
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            ring = cls(name, shm, efd, True, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            if efd >= 0:
                os.close(efd)
            raise
        ring._meta64[0] = capacity
        ring._meta64[1] = HEADER_SIZE
        ring._meta32[1] = VERSION
        ring._meta32[0] = MAGIC  # last: a half-initialised header is never valid
        ring._bind_data(capacity)
        return ring

    @classmethod
    def attach(cls, name: str, eventfd: int) -> "Ring":
        """Map an existing ring; takes ownership of ``eventfd``.

        The header comes from a process we trust less, so it is validated
        against the real segment size before anything is mapped by offset.
        Raises RingCorrupt for a bad header, posix_ipc.ExistentialError if the
        segment does not exist; on failure the caller still owns ``eventfd``.
        """
        # woke() drains with a read that must not block on an empty counter.
        os.set_blocking(eventfd, False)
        shm = posix_ipc.SharedMemory(name)
        size = os.fstat(shm.fd).st_size
        if size < HEADER_SIZE + MIN_CAPACITY:
            shm.close_fd()
            raise RingCorrupt(f"{name}: segment of {size} bytes is too small for a ring")
        ring = cls(name, shm, eventfd, False, size)
        magic, version = ring._meta32[0], ring._meta32[1]
        capacity, data_off = ring._meta64[0], ring._meta64[1]
        problem = None
        if magic != MAGIC or version != VERSION:
            problem = f"bad magic/version {magic:#x}/{version}"
        elif (capacity < MIN_CAPACITY or capacity > MAX_CAPACITY
              or capacity & (capacity - 1) or data_off != HEADER_SIZE
              or HEADER_SIZE + capacity > size):
            problem = f"bad capacity {capacity} / data offset {data_off} for size {size}"
        if problem is None:
            ring._bind_data(capacity)
            used = ring._tail - ring._head
            if used < 0 or used > capacity or (ring._head | ring._tail) & 7:
                problem = f"bad counters head={ring._head} tail={ring._tail}"
        if problem is not None:
            ring.eventfd = -1  # on failure the caller keeps ownership of the fd
            ring.close()
            raise RingCorrupt(f"{name}: {problem}")
        return ring

    @property
    def capacity(self) -> int:
        return self._capacity

    # -------------------------------------------------------------- producer

    def put(self, obj: Any) -> bool:
        """Append one msgpack-able object; False if the ring is full. Never blocks.

        Raises ValueError if the encoded message exceeds max_message
        (capacity/2 - 8 bytes), RingCorrupt if the consumer's head is invalid.
        """
        self._check_usable()
        payload = msgpack.packb(obj, use_bin_type=True)
        n = len(payload)
        if n > self.max_message:
            raise ValueError(f"{self.name}: message of {n} bytes exceeds the ring's "
                             f"limit of {self.max_message} (capacity/2)")
        cap = self._capacity
        tail = self._tail
        head = self._head_w[0]
        used = tail - head
        if used < 0 or used > cap:
            self._fail(f"consumer head {head} inconsistent with tail {tail}")
        pos = tail & self._mask
        rec = _align8(4 + n)
        room_to_end = cap - pos
        need = rec if rec <= room_to_end else room_to_end + rec
        if need > cap - used:
            self._full += 1
            return False
        if rec > room_to_end:
            self._words[pos >> 2] = WRAP
            tail += room_to_end
            pos = 0
        self._data[pos + 4:pos + 4 + n] = payload
        self._words[pos >> 2] = n
        tail += rec
        self._tail = tail
        self._tail_w[0] = tail  # publish: one aligned 8-byte store, after the payload
        self._puts += 1
        self._fence()           # order the tail store before the sleeping load
        if self._sleep_w[0]:
            self._wakes += 1
            try:
                os.eventfd_write(self.eventfd, 1)
            except BlockingIOError:  # counter saturated: a wake-up is pending anyway
                pass
        return True

    def put_wait(self, obj: Any, timeout: float) -> None:
        """put(), retrying with a short backoff until there is room.

        There is no "space available" wake-up (the consumer never writes an
        eventfd), so this polls: 50 us doubling to 2 ms. Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        delay = 50e-6
        while not self.put(obj):
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"{self.name}: ring full for {timeout} s")
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 2e-3)

    # -------------------------------------------------------------- consumer

    def get(self) -> Any | None:
        """Remove and return the oldest message, or None if the ring is empty.

        (A stored ``None`` message is indistinguishable here; get_all() keeps
        them.) Raises RingCorrupt on an inconsistent tail or record, and on
        every later call.
        """
        obj = self._take()
        return None if obj is _EMPTY else obj

    def get_all(self, limit: int = 1024) -> list[Any]:
        """Up to ``limit`` messages, oldest first (possibly empty).

        If a corrupt record follows good ones, the good ones are returned and
        the next call raises RingCorrupt.
        """
        out: list[Any] = []
        while len(out) < limit:
            try:
                obj = self._take()
            except RingCorrupt:
                if out:
                    break
                raise
            if obj is _EMPTY:
                break
            out.append(obj)
        return out

    def _take(self) -> Any:
        self._check_usable()
        cap = self._capacity
        head = self._head
        tail = self._tail_w[0]           # load tail before any payload byte
        avail = tail - head
        if avail == 0:
            return _EMPTY
        if avail < 0 or avail > cap or avail & 7:
            self._fail(f"producer tail {tail} inconsistent with head {head}")
        pos = head & self._mask
        n = self._words[pos >> 2]
        if n == WRAP:
            skip = cap - pos
            if skip + 8 > avail:
                self._fail(f"wrap marker at {pos} with only {avail} bytes published")
            head += skip
            avail -= skip
            pos = 0
            n = self._words[0]
        if n > self.max_message:
            self._fail(f"record length {n:#x} at {pos} out of range")
        rec = _align8(4 + n)
        if rec > avail or pos + rec > cap:
            self._fail(f"record of {n} bytes at {pos} runs past the published data")
        try:
            with self._data[pos + 4:pos + 4 + n] as chunk:
                obj = msgpack.unpackb(chunk, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            self._fail(f"undecodable record at {pos}: {exc!r}")
        head += rec
        self._head = head
        self._head_w[0] = head   # publish after the payload was read
        self._gets += 1
        return obj

    def is_empty(self) -> bool:
        """True if no message is published (reads the producer's tail)."""
        return self._tail_w[0] == self._head

    def prepare_sleep(self) -> bool:
        """Announce that the consumer is about to block on fileno().

        Returns False (flag cleared, do not sleep) if data is already there.
        """
        self._check_usable()
        self._sleep_w[0] = 1
        self._fence()           # order the flag store before the tail load
        if self._tail_w[0] != self._head:
            self._sleep_w[0] = 0
            return False
        return True

    def woke(self) -> None:
        """Clear the sleeping flag and drain the eventfd counter."""
        self._sleep_w[0] = 0
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None) -> bool:
        """Block until a message is available (True) or ``timeout`` s pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.eventfd, select.POLLIN)
        while True:
            if not self.is_empty():
                return True
            if self.prepare_sleep():
                if deadline is None:
                    ms = _SLEEP_CAP_MS
                else:
                    left = deadline - time.monotonic()
                    ms = max(0, int(left * 1000 + 0.999)) if left > 0 else 0
                    if _SLEEP_CAP_MS is not None:
                        ms = min(ms, _SLEEP_CAP_MS)
                try:
                    if ms != 0:
                        poller.poll(ms)
                finally:
                    self.woke()
            if not self.is_empty():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def fileno(self) -> int:
        """The eventfd: readable after a put() that found the consumer sleeping."""
        return self.eventfd

    # ------------------------------------------------------------ lifecycle

    def stats(self) -> RingStats:
        used = self._tail_w[0] - self._head_w[0] if not self._closed else 0
        return RingStats(self.name, self._capacity, used, self._puts, self._gets,
                         self._full, self._wakes)

    def close(self) -> None:
        """Unmap and close the eventfd. Idempotent. Does not unlink.

        BufferError while someone still holds a view into the ring: the mapping (and the
        descriptor mmap keeps) stays until that view goes, and a later close() tries again
        (a worker logs a dropped slot's pinned rings: workers/main.py _check_released)."""
        if self._closed:
            return
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1
        while self._views:
            self._views[-1].release()
            self._views.pop()
        self._mm.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def unlink(self) -> None:
        """Remove the segment's name (creator only). Idempotent."""
        if not self._creator:
            raise PermissionError(f"{self.name}: only the creator unlinks a ring")
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._creator:
            self.unlink()

    # -------------------------------------------------------------- helpers

    def _fence(self) -> None:
        # Full memory barrier, see "Sleeping without lost wake-ups" above.
        fence.full_barrier()

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"{self.name}: ring is closed")
        if self._corrupt is not None:
            raise RingCorrupt(self._corrupt)

    def _fail(self, why: str) -> None:
        self._corrupt = f"{self.name}: {why}"
        raise RingCorrupt(self._corrupt)


_EMPTY = object()
