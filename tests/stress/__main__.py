"""scripts/stress: a long stress run that prints a summary table (see harness.py)."""
from __future__ import annotations

import argparse
import json
import sys

from tests.stress.harness import Stress, StressConfig, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/stress", description="vnvmed stress run (tests/stress/harness.py)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--controllers", type=int, default=2)
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--max-iops", type=float, default=0.0, help="per client (0: unthrottled)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trapped", action="store_true", help="every other controller with trapped doorbells")
    p.add_argument("--ns-kind", choices=("ram", "file"), default="ram",
                   help="file: an asynchronous engine, so commands park (crash journal)")
    p.add_argument("--faults", help="comma-separated subset of client_kill,worker_kill,frontend_kill,ns_churn")
    p.add_argument("--no-faults", action="store_true", help="verified I/O only")
    p.add_argument("--transparent-worker-kills", action="store_true",
                   help="a worker kill must not make a controller fatal")
    p.add_argument("--no-frontend-recovery", action="store_true",
                   help="VNVMED_FRONTEND_RECOVERY=0: a killed front-end's client reconnects")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    a = p.parse_args(argv)
    cfg = StressConfig(controllers=a.controllers, queues=a.queues, depth=a.depth, seed=a.seed,
                       trapped=a.trapped, max_iops=a.max_iops, ns_kind=a.ns_kind,
                       worker_kill_transparent=a.transparent_worker_kills,
                       frontend_recovery=not a.no_frontend_recovery)
    if a.faults:
        cfg.faults = {k: v for k, v in cfg.faults.items() if k in a.faults.split(",")}
    if a.no_faults:
        cfg.faults, cfg.storm_every, cfg.reset_every = {}, 0.0, 0.0
    s = Stress(cfg)
    try:
        s.start()
        s.run(a.minutes * 60)
        summ = s.finish()
    finally:
        s.close()
    print(table(summ))
    probs = s.problems(summ)
    for x in probs + summ["client_errors"][:20]:
        print("PROBLEM:", x)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summ, f, indent=1, default=str)
    print("stress:", "FAILED" if probs else "OK")
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())
