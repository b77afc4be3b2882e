"""Queue-pair placement: which worker runs which I/O queue (pure).

A CQ goes to the worker with the fewest queues (ties: lowest worker id), counting the
load every worker reports (queues of all controllers) plus what this front-end placed
since the last report.  An SQ always goes where its CQ is: a CQ is written by exactly
one process, so every SQ completing into it must live in that process too.
"""
from __future__ import annotations


class Placement:
    def __init__(self, workers: list[int]) -> None:
        self.load: dict[int, int] = {w: 0 for w in workers}
        self.cq_worker: dict[int, int] = {}
        self.sq_cq: dict[int, int] = {}

    def set_workers(self, workers: list[int]) -> None:
        for w in workers:
            self.load.setdefault(w, 0)
        for w in list(self.load):
            if w not in workers:
                del self.load[w]

    def report(self, worker: int, queues: int) -> None:
        """Load as counted by the worker itself (all controllers)."""
        if worker in self.load:
            self.load[worker] = queues

    def place_cq(self, cqid: int) -> int:
        if not self.load:
            raise RuntimeError("no worker to place a queue on")
        w = min(self.load, key=lambda k: (self.load[k], k))
        self.cq_worker[cqid] = w
        self.load[w] += 1
        return w

    def place_sq(self, sqid: int, cqid: int) -> int:
        w = self.cq_worker[cqid]
        self.sq_cq[sqid] = cqid
        self.load[w] += 1
        return w

    def worker_of_sq(self, sqid: int) -> int | None:
        cq = self.sq_cq.get(sqid)
        return None if cq is None else self.cq_worker.get(cq)

    def worker_of_cq(self, cqid: int) -> int | None:
        return self.cq_worker.get(cqid)

    def remove_sq(self, sqid: int) -> int | None:
        w = self.worker_of_sq(sqid)
        self.sq_cq.pop(sqid, None)
        if w is not None and w in self.load:
            self.load[w] = max(0, self.load[w] - 1)
        return w

    def remove_cq(self, cqid: int) -> int | None:
        w = self.cq_worker.pop(cqid, None)
        if w is not None and w in self.load:
            self.load[w] = max(0, self.load[w] - 1)
        return w

    def drop_worker(self, worker: int) -> list[int]:
        """Forget the queues of a worker that died; returns the CQ ids it held."""
        cqs = [cq for cq, w in self.cq_worker.items() if w == worker]
        for cq in cqs:
            del self.cq_worker[cq]
        for sq in [sq for sq, cq in self.sq_cq.items() if cq in cqs]:
            del self.sq_cq[sq]
        self.load.pop(worker, None)
        return cqs

    def busy_workers(self) -> set[int]:
        """Workers holding at least one queue of this controller."""
        return set(self.cq_worker.values())

    def clear(self) -> None:
        for cq in list(self.cq_worker):
            self.remove_cq(cq)
        self.sq_cq.clear()
