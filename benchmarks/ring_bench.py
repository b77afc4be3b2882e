"""Micro-benchmark: small messages through reactor.shm.ring between two processes.

Prints messages/s (and the consumer's sleep count) for a few message shapes.
Not a test: figures depend on the machine and on what else runs on it.

    python -m benchmarks.ring_bench [--count N] [--capacity BYTES]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # allow `python benchmarks/ring_bench.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reactor.shm import names  # noqa: E402
from reactor.shm.fdpass import FdReceiver, fd_socketpair, send_fds  # noqa: E402
from reactor.shm.ring import Ring  # noqa: E402

SHAPES = {
    "int": lambda i: i,
    "small dict": lambda i: {"op": "kick", "qid": i & 63, "tail": i & 1023},
    "64 B bytes": lambda i: b"x" * 64,
}


def _producer(sock, name: str, shape: str, count: int) -> None:
    with FdReceiver(sock) as rx:
        (efd,) = rx.take(1, timeout=10)
    ring = Ring.attach(name, efd)
    make = SHAPES[shape]
    msgs = [make(i) for i in range(1024)]
    for i in range(count):
        ring.put_wait(msgs[i & 1023], timeout=30)
    ring.put_wait("done", timeout=30)
    ring.close()


def run(shape: str, count: int, capacity: int, prefix: str, n: int) -> tuple[float, int]:
    name = names.ring_name(prefix, n)
    ring = Ring.create(name, capacity)
    a, b = fd_socketpair()
    p = mp.get_context("spawn").Process(target=_producer, args=(b, name, shape, count))
    p.start()
    try:
        send_fds(a, 1, [ring.eventfd])
        # Wait for the first message so process start-up is not measured.
        ring.wait(30)
        t0 = time.perf_counter()
        got, sleeps, done = 0, 0, False
        while not done:
            batch = ring.get_all(4096)
            if not batch:
                sleeps += 1
                ring.wait(1.0)
                continue
            if batch[-1] == "done":
                done = True
            got += len(batch)
        dt = time.perf_counter() - t0
        p.join(30)
        return (got - 1) / dt, sleeps
    finally:
        if p.is_alive():
            p.kill(); p.join()
        ring.close(); ring.unlink()
        a.close(); b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--capacity", type=int, default=1 << 20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        prefix = names.instance_prefix(run_dir)
        print(f"ring_bench: {args.count} messages, capacity {args.capacity} B, "
              f"{os.cpu_count()} CPUs")
        for n, shape in enumerate(SHAPES):
            rate, sleeps = run(shape, args.count, args.capacity, prefix, n)
            print(f"  {shape:12s} {rate / 1e3:8.1f} k msg/s   consumer sleeps: {sleeps}")


if __name__ == "__main__":
    main()
