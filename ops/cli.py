"""`vnvmed` command line: parse the config (file + flags), run the supervisor."""
from __future__ import annotations

import asyncio
import sys
from typing import Sequence

from ops import preflight
from ops.cmdline import from_args
from ops.config import ConfigError
from ops.logsetup import setup_logging
from ops.proctitle import set_process_name


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = from_args(argv)
    except ConfigError as e:
        print(f"vnvmed: {e}", file=sys.stderr)
        return 2
    from reactor.takeover import handover_fd
    try:
        # A live upgrade's new daemon takes over sockets and RAM namespaces that exist
        # and are served (by the daemon it replaces): nothing here applies to it.
        if handover_fd() is None:
            preflight.check(cfg)
    except preflight.StartupError as e:
        print(f"vnvmed: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    set_process_name("supervisor")
    from reactor.supervisor import Supervisor
    try:
        return asyncio.run(Supervisor(cfg).run())
    except ValueError as e:  # e.g. an unavailable core list
        print(f"vnvmed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
