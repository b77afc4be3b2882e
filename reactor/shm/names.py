"""Names of the POSIX shared-memory objects one daemon instance creates.

Every shm segment and semaphore we create is named
``/vnvmed-<h>-<pid>-<kind>-<n>`` where ``<h>`` is 8 hex digits of a hash of
the (resolved) run directory and ``<pid>`` is the supervisor's pid. Two
daemons with different run dirs never collide, and a restarted daemon with the
same run dir can find what a crashed predecessor left behind.

Crash recovery: POSIX shm outlives its processes. On start the supervisor calls
cleanup_stale(run_dir), which scans /dev/shm (the kernel's tmpfs backing
shm_open and sem_open, which appear as ``sem.<name>``) for this run dir's
hash and unlinks the objects whose pid is dead. A pid that exists is treated
as alive even if it was recycled by an unrelated process: leaking a segment
until the next start is harmless, unlinking a live instance's ring is not.
Unlinking only removes the name; processes that still map it keep their
memory, so even a mistaken unlink would not SIGBUS anyone.

No registry file: /dev/shm itself is the registry, which also covers objects
created between a registry write and a crash.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass

__all__ = [
    "SHM_DIR", "run_dir_hash", "instance_prefix", "ring_name", "segment_name",
    "StaleEntry", "list_instance_objects", "cleanup_stale", "pid_alive",
]

SHM_DIR = "/dev/shm"
_SEM_PREFIX = "sem."  # glibc stores named semaphore "/x" as /dev/shm/sem.x


def run_dir_hash(run_dir: str) -> str:
    """8 lowercase hex digits identifying a run directory (resolved path)."""
    path = os.path.realpath(os.fspath(run_dir))
    return hashlib.sha256(path.encode()).hexdigest()[:8]


def instance_prefix(run_dir: str, pid: int | None = None) -> str:
    """``vnvmed-<hash>-<pid>``; pid defaults to the calling process (the supervisor)."""
    return f"vnvmed-{run_dir_hash(run_dir)}-{os.getpid() if pid is None else pid}"


def segment_name(prefix: str, kind: str, n: int) -> str:
    """``/<prefix>-<kind>-<n>``, a valid shm_open/sem_open name."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", kind):
        raise ValueError(f"bad segment kind {kind!r}")
    if n < 0:
        raise ValueError(f"bad segment index {n}")
    return f"/{prefix}-{kind}-{n}"


def ring_name(prefix: str, n: int) -> str:
    """``/<prefix>-ring-<n>``."""
    return segment_name(prefix, "ring", n)


@dataclass(frozen=True, slots=True)
class StaleEntry:
    """One /dev/shm object of some instance of a run dir."""
    name: str        # POSIX name with leading '/', as passed to shm_open/sem_open
    pid: int         # supervisor pid encoded in the name
    semaphore: bool  # True for sem.* entries (unlink with sem_unlink)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (even if we may not signal it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_instance_objects(run_dir: str, shm_dir: str = SHM_DIR) -> list[StaleEntry]:
    """All shm segments and semaphores named after ``run_dir``, any pid."""
    pattern = re.compile(rf"^(?:{re.escape(_SEM_PREFIX)})?vnvmed-{run_dir_hash(run_dir)}-(\d+)-")
    out: list[StaleEntry] = []
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return out
    for entry in sorted(entries):
        m = pattern.match(entry)
        if m is None:
            continue
        sem = entry.startswith(_SEM_PREFIX)
        posix = "/" + (entry[len(_SEM_PREFIX):] if sem else entry)
        out.append(StaleEntry(posix, int(m.group(1)), sem))
    return out


def cleanup_stale(run_dir: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink objects of ``run_dir`` whose supervisor pid is dead.

    Never touches objects of a live pid (including ours). Returns the POSIX
    names that were unlinked. Races with another cleaner are tolerated.
    """
    removed: list[str] = []
    for ent in list_instance_objects(run_dir, shm_dir):
        if ent.pid == os.getpid() or pid_alive(ent.pid):
            continue
        base = ent.name[1:]
        path = os.path.join(shm_dir, (_SEM_PREFIX + base) if ent.semaphore else base)
        try:
            # Same effect as shm_unlink/sem_unlink on Linux (tmpfs files), and
            # works with a non-default shm_dir in tests.
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            continue
        removed.append(ent.name)
    return removed
