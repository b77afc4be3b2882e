"""Give each daemon process a name that ps/top show.

Two different kernel fields:

* ``/proc/PID/cmdline`` (what ``ps -ef``/``ps aux`` show): rewritten by
  setproctitle, which reuses the argv area. We set ``vnvmed: <name>``.
* ``/proc/PID/comm`` (what ``ps -o comm``, ``top`` and ``pgrep`` match): set
  with prctl(PR_SET_NAME) via setproctitle.setthreadtitle. The kernel limits it
  to 15 bytes (TASK_COMM_LEN 16 incl. NUL) and silently truncates, so we build
  the short form ourselves: ``vnvmed:worker2`` if it fits, else the name alone
  (``worker123``) so the role word survives truncation.
"""
from __future__ import annotations

import setproctitle as _spt

__all__ = ["set_process_name", "comm_for"]

COMM_MAX = 15  # bytes, TASK_COMM_LEN - 1


def _role(name: str) -> str:
    # Callers may pass either "worker 2" or the full "vnvmed: worker 2".
    name = name.strip()
    if name.startswith("vnvmed:"):
        name = name[len("vnvmed:"):].strip()
    return name


def comm_for(name: str) -> str:
    """The 15-byte comm used for ``name`` (spaces removed, role word kept)."""
    compact = "".join(_role(name).split())
    full = f"vnvmed:{compact}"
    if len(full.encode()) <= COMM_MAX:
        return full
    return compact.encode()[:COMM_MAX].decode(errors="ignore")


def set_process_name(name: str) -> tuple[str, str]:
    """Set cmdline to ``vnvmed: <name>`` and comm to comm_for(name).

    ``name`` may already start with ``vnvmed:``; it is not doubled.

    Call it in the main thread of the process (comm is per thread; the main
    thread's comm is the process's /proc/PID/comm). Returns (title, comm).
    """
    title = f"vnvmed: {_role(name)}"
    comm = comm_for(name)
    _spt.setproctitle(title)
    # After setproctitle: on Linux it may also set comm from the long title.
    _spt.setthreadtitle(comm)
    return title, comm
