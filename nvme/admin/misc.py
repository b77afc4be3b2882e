"""Small admin commands: Abort (08h), Keep Alive (18h), Async Event Request (0Ch),
Doorbell Buffer Config (7Ch)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from nvme.errors import CommandError
from nvme.memory import DmaFault
from nvme.state import ShadowDoorbells
from nvme.status import Status

from .command import AdminCmd

if TYPE_CHECKING:
    from nvme.controller import Controller

PAGE_MASK = 0xFFF


def handle_abort(c: "Controller", cmd: AdminCmd) -> int:
    # Best effort (1.4 5.1): commands run to completion quickly here, so we never
    # abort; DW0 bit 0 = 1 tells the host "not aborted", which is always allowed.
    return 1


def handle_keep_alive(c: "Controller", cmd: AdminCmd) -> int:
    return 0  # KAS = 0: no keep-alive timer to restart; the command is still accepted


def handle_async_event_request(c: "Controller", cmd: AdminCmd) -> None:
    # Parked: completed later through Controller.post_aer_completions (maybe at once,
    # if an event is already queued).
    c.post_aer_completions(c.aer.submit(cmd.cid))
    return None


def handle_doorbell_buffer_config(c: "Controller", cmd: AdminCmd) -> int:
    """Shadow doorbells (1.4 5.7): PRP1 = shadow doorbell page, PRP2 = EventIdx page.

    Both must be page aligned, distinct and mapped writable.  The current doorbell
    values of every I/O queue are copied into the shadow page and EventIdx starts at
    the same values, so nothing the host already rang is lost in the switch.  The
    admin queue keeps using BAR0 doorbells.
    """
    dbbuf, ei = cmd.prp1, cmd.prp2
    if dbbuf & PAGE_MASK or ei & PAGE_MASK or dbbuf == ei:
        raise CommandError(Status.INVALID_FIELD, "shadow doorbell pages")
    try:
        db_words = c.mem.view(dbbuf, 4096, write=True).cast("I")
        ei_words = c.mem.view(ei, 4096, write=True).cast("I")
    except DmaFault:
        raise CommandError(Status.INVALID_FIELD, "shadow doorbell pages not mapped") from None
    for qid in c.queues.sqs:
        v = c.db.sq_tail(qid)
        db_words[qid << 1] = v          # one aligned 32-bit store each
        ei_words[qid << 1] = v
    for qid in c.queues.cqs:
        v = c.db.cq_head(qid)
        db_words[(qid << 1) | 1] = v
        ei_words[(qid << 1) | 1] = v
    c.shadow = ShadowDoorbells(dbbuf=dbbuf, eventidx=ei)
    c.hooks.shadow_doorbells_changed(c.shadow)
    return 0
