"""Dirty-page logging, front-end side: the shared byte maps and who writes them (SEAMS S3).

On DMA_LOGGING_START (v2) or DIRTY_PAGES START (v1) the front-end creates one memfd
per fd-mapped, device-writable DMA region (a byte per 4 KiB page, migration.dirty),
maps it itself and hands it to every worker of the controller with a *synchronous*
request: once START is answered, no worker writes guest memory without marking it.
A region mapped while logging is on gets its map the same way (before DMA_MAP is
answered); an unmapped region's map is dropped.  STOP tells the workers (again
synchronously) and closes everything.

Markers: workers (read data in the executor; CQEs and EventIdx in the runner), and
the front-end itself: admin CQEs (its QueueRunner) and admin data (the controller's
memory is wrapped in a `MarkingMemory` while logging: the front-end is one thread, so
a mark made when the admin handler takes its view is in place before any REPORT can
run), and the slow path (reactor/slowpath.py) for read data it sent by DMA_WRITE, once
the client answered.
REPORT reads-and-clears the front-end's view of the same maps.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
from typing import TYPE_CHECKING

from migration.dirty import DirtyLog, MarkingMemory, map_size
from vfio_user.errors import ProtocolError

if TYPE_CHECKING:
    from reactor.nvmefn import NvmeFunction

log = logging.getLogger("vnvmed.migration")


class DirtyLogger:
    def __init__(self, fn: "NvmeFunction") -> None:
        self.fn = fn
        self.log = DirtyLog()
        self.active = False
        self.pgsize = 0
        self._maps: dict[int, tuple[int, mmap.mmap, int]] = {}   # iova -> (fd, mm, size)

    # -- DirtyOps ----------------------------------------------------------------------
    def start(self, pgsize: int) -> None:
        if self.active:
            return          # already logging: the maps keep what they hold (libvfio-user)
        self.active = True
        self.pgsize = pgsize
        try:
            for (iova, size), (_off, fd, _r, w) in sorted(self.fn.dma_regions.items()):
                if fd is not None and w:
                    self._add(iova, size)
        except BaseException:
            self.stop()
            raise
        self.fn.ctrl.mem = MarkingMemory(self.fn.mem, self.log)
        self.fn.ctrl.set_dirty(self.log)
        log.info("%s: dirty page logging on (%d regions)", self.fn.name, len(self._maps))

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        # No round trip: a worker that marks a page before it reads this message marks
        # its own mapping of a map nobody reports any more (FIFO: a later START's maps
        # come after this message).
        for link in list(self.fn.links.values()):
            link.send({"op": "dirty_off"})
        for iova in list(self._maps):
            self._drop(iova)
        self.log.clear()
        self.fn.ctrl.mem = self.fn.mem
        self.fn.ctrl.set_dirty(None)
        log.info("%s: dirty page logging off", self.fn.name)

    def report(self, iova: int, length: int, pgsize: int) -> bytes:
        if not self.active:
            raise ProtocolError(errno.EINVAL, "dirty page logging is not started")
        return self.log.report(iova, length, pgsize)

    # -- DMA map changes (called by NvmeFunction while quiesced) -----------------------
    def mapped(self, iova: int, size: int, fd: int | None, writable: bool) -> None:
        if self.active and fd is not None and writable:
            self._add(iova, size)

    def unmapped(self, iova: int, size: int) -> None:
        if self.active and iova in self._maps:
            self._workers({"op": "dirty_del", "iova": iova})
            self._drop(iova)

    def memory_changed(self) -> None:
        """The session's guest memory object changed (connect): re-wrap if logging."""
        if self.active:
            self.fn.ctrl.mem = MarkingMemory(self.fn.mem, self.log)

    # -- plumbing ---------------------------------------------------------------------------
    def _add(self, iova: int, size: int) -> None:
        n = map_size(iova, size)
        fd = os.memfd_create(f"vnvmed-{self.fn.name}-dirty", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, n)
            mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._maps[iova] = (fd, mm, size)
        self.log.add(iova, size, memoryview(mm))
        self._workers({"op": "dirty_add", "iova": iova, "size": size, "len": n}, [fd])

    def _drop(self, iova: int) -> None:
        m = self.log.remove(iova)
        if m is not None:
            m.bm.release()
        fd, mm, _ = self._maps.pop(iova)
        try:
            mm.close()
        except BufferError:
            pass            # a report's view is still alive; the mapping dies with it
        os.close(fd)

    def _workers(self, msg: dict, fds: list[int] | None = None) -> None:
        for wid, link in list(self.fn.links.items()):
            try:
                ack = link.request_sync(dict(msg), fds)
            except (TimeoutError, ConnectionError) as e:
                ack = {"error": str(e)}
            if ack.get("error"):
                # A worker that cannot log would write pages nobody reports: refuse.
                raise ProtocolError(errno.EIO, f"worker {wid}: dirty logging: {ack['error']}")

    def info(self) -> dict:
        return {"active": self.active, "regions": len(self._maps)}
