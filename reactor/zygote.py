"""Imported by the supervisor's forkserver, and only there: the daemon's children are forked
from one process that already holds every module they run.

Theory of operation
-------------------
A spawned child starts a fresh interpreter and imports its modules again: ~1 s of CPU on
this VM per child and ~17 MiB of private memory per front-end (the module objects, code
and interpreter heap are built anew in each).  The supervisor instead starts its children
with multiprocessing's *forkserver* context and names this module as the forkserver's
preload: the forkserver (a fresh single-threaded interpreter - no fork after threads, as
with spawn) imports the front-end and worker code once, then forks every child from that
state, so all of it is shared copy-on-write.

`gc.freeze()` moves everything imported so far to the permanent generation: the children's
cyclic GC then never walks (and never writes the GC headers of) those objects, which
would copy the pages they live on one by one.  Reference counting still dirties the pages
of objects a child actually uses; what stays shared is the rest.

Signals: `kill -- -PGID` (systemd's KillMode=control-group, a shell's job control) sends
SIGTERM to the forkserver too.  If it died, a child the supervisor restarts in that
moment (one that got the same SIGTERM a little earlier) could not be forked at all.  So
the forkserver ignores SIGTERM - it ends when the supervisor does (multiprocessing's
alive pipe) - and every child restores SIGTERM first thing (reactor/frontend.py,
workers/main.py).

Importing this module renames the process ("vnvmed: forkserver") and makes it ignore
SIGTERM: only the forkserver may import it.
"""
from __future__ import annotations

import gc
import importlib
import signal

from ops.proctitle import set_process_name

# ops.cli: bin/vnvmed, which every child re-imports as __mp_main__.
PRELOAD = ("ops.cli", "reactor.frontend", "workers.main")

set_process_name("forkserver")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _name in PRELOAD:
    importlib.import_module(_name)
gc.collect()
gc.freeze()
