"""The one memory fence of the project, and the one place that says where it holds.

Theory of operation
    Shared-memory protocols here (doorbells + EventIdx, the front-end <-> worker rings'
    "sleeping" flag, CQE DW3 published last) need two things from the CPU:

    * stores become visible to other processes in program order, and loads are not
      reordered with other loads.  x86-64 (TSO) gives both for plain aligned stores
      and loads; that is why a CQE's DW3 written last is never seen before DW0-DW2;
    * a full barrier between a store and a later load (Dekker's pattern: "store my
      flag, load yours"), the one reordering TSO allows.  Python has no fence
      instruction; acquiring and releasing an uncontended ``threading.Lock`` does it,
      because on Linux CPython's lock is a glibc semaphore whose sem_trywait/sem_post
      are ``lock``-prefixed instructions, which drain the store buffer.

    Neither holds on weakly ordered CPUs (aarch64, POWER, RISC-V: plain stores may be
    seen out of order, a lock round trip orders only what the lock protects), so the
    daemon refuses to start anywhere else (``unsupported_reason``, checked by
    ops/preflight.py): one clear line and exit 2, not silent corruption.
"""
from __future__ import annotations

import platform
import sys
import threading

SUPPORTED_MACHINES = ("x86_64", "AMD64")

_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory fence (store -> load ordering) on x86-64 CPython; see the module doc."""
    _lock.acquire()
    _lock.release()


def unsupported_reason(machine: str | None = None, lock_kind: str | None = None) -> str | None:
    """Why this machine cannot run the shared-memory data path, or None if it can."""
    machine = platform.machine() if machine is None else machine
    lock_kind = sys.thread_info.lock if lock_kind is None else lock_kind
    if machine not in SUPPORTED_MACHINES:
        return (f"unsupported CPU architecture {machine!r}: vnvmed's shared-memory queues rely on "
                f"x86-64 memory ordering (TSO); only x86_64 is supported")
    if lock_kind != "semaphore":
        return (f"this Python's locks are {lock_kind!r}, not semaphores: vnvmed's memory fence "
                f"(a lock round trip) would not be a full barrier")
    return None


FULL_BARRIER = unsupported_reason() is None
