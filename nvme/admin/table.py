"""The admin capability table: opcode -> handler + Commands Supported and Effects.

Built per controller from its config, so Doorbell Buffer Config disappears from
dispatch, from OACS and from log 05h together when shadow doorbells are off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from nvme.config import ControllerConfig

from . import features, identify, logs, misc, queues
from .caps import CSUPP, AdminOpcode
from .command import AdminCmd

if TYPE_CHECKING:
    from nvme.controller import Controller

Handler = Callable[["Controller", AdminCmd], "int | None"]


@dataclass(slots=True, frozen=True)
class AdminCommandSpec:
    opcode: AdminOpcode
    handler: Handler
    effects: int = CSUPP


def build_admin_table(cfg: ControllerConfig) -> dict[int, AdminCommandSpec]:
    A = AdminOpcode
    specs = [
        AdminCommandSpec(A.DELETE_IO_SQ, queues.handle_delete_io_sq),
        AdminCommandSpec(A.CREATE_IO_SQ, queues.handle_create_io_sq),
        AdminCommandSpec(A.GET_LOG_PAGE, logs.handle_get_log_page),
        AdminCommandSpec(A.DELETE_IO_CQ, queues.handle_delete_io_cq),
        AdminCommandSpec(A.CREATE_IO_CQ, queues.handle_create_io_cq),
        AdminCommandSpec(A.IDENTIFY, identify.handle_identify),
        AdminCommandSpec(A.ABORT, misc.handle_abort),
        AdminCommandSpec(A.SET_FEATURES, features.handle_set_features),
        AdminCommandSpec(A.GET_FEATURES, features.handle_get_features),
        AdminCommandSpec(A.ASYNC_EVENT_REQUEST, misc.handle_async_event_request),
        AdminCommandSpec(A.KEEP_ALIVE, misc.handle_keep_alive),
    ]
    if cfg.shadow_doorbells:
        specs.append(AdminCommandSpec(A.DOORBELL_BUFFER_CONFIG, misc.handle_doorbell_buffer_config))
    return {int(s.opcode): s for s in specs}
