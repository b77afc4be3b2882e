"""The records the management API returns, built in one place for the server and read by
vnvmectl with the same field names (so the table can never print placeholders for keys
the server does not send).

`controller.list` returns one `controller_record` per controller:

    name, state, client_connected, socket, pid, restarts, fatal_reason,
    namespaces: [namespace_record...], queues: [{"sqid", "worker"}...], plus the
    front-end's raw `info` fields (enabled, ready, fatal, csts, slow_commands, quiesces)

`state` is one word an operator can act on (STATES).  A namespace record carries the
kind and the argument it was configured with (`file` path, `ram`/`null` size, `nbd` URI,
`rbd` image), its current size and block size.
"""
from __future__ import annotations

from typing import Any, Iterable

from ops.config import NamespaceSpec

CONTROLLER_FIELDS = ("name", "state", "client_connected", "socket", "pid", "restarts",
                     "fatal_reason", "namespaces", "queues")
NAMESPACE_FIELDS = ("nsid", "kind", "arg", "size", "block_size", "read_only")

STATES = {
    "restarting": "the front-end process is being (re)started",
    "unavailable": "the front-end did not answer (details in fatal_reason and the log)",
    "fatal": "controller fatal status (CSTS.CFS): the guest must reset it",
    "no-client": "socket listening, no VM connected",
    "disabled": "a VM is connected, the controller is not enabled (CC.EN=0)",
    "ready": "enabled and serving I/O",
}


def controller_state(info: dict[str, Any] | None, running: bool = True) -> str:
    if not running:
        return "restarting"
    if info is None:
        return "unavailable"
    if info.get("fatal"):
        return "fatal"
    if not info.get("client_connected"):
        return "no-client"
    return "ready" if info.get("ready") else "disabled"


def namespace_record(ns: NamespaceSpec, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configured namespace, with the front-end's live size when it has one."""
    live = live or {}
    return {"nsid": ns.nsid, "kind": ns.kind.value, "arg": ns.arg,
            "size": live.get("size", ns.size), "block_size": ns.block_size,
            "read_only": ns.read_only}


def controller_record(name: str, socket: str, namespaces: Iterable[NamespaceSpec],
                      info: dict[str, Any] | None, *, pid: int | None = None, restarts: int = 0,
                      running: bool = True, error: str | None = None) -> dict[str, Any]:
    """One controller.list entry from the supervisor's spec and the front-end's `info`."""
    raw = dict(info or {})
    live = {n.get("nsid"): n for n in raw.pop("namespaces", None) or [] if isinstance(n, dict)}
    queues = raw.pop("queues", None) or {}
    rec: dict[str, Any] = dict(raw)
    rec.update({
        "name": name, "state": controller_state(info, running), "socket": socket, "pid": pid,
        "restarts": restarts, "client_connected": bool(raw.get("client_connected")),
        "fatal_reason": raw.get("fatal_reason") or error,
        "namespaces": [namespace_record(n, live.get(n.nsid)) for n in namespaces],
        "queues": [{"sqid": int(sq), "worker": w} for sq, w in sorted(queues.items(), key=lambda kv: int(kv[0]))],
    })
    return rec


def missing_fields(rec: dict[str, Any]) -> list[str]:
    """Fields of the schema a controller record lacks (for tests and the CLI's sanity)."""
    out = [f for f in CONTROLLER_FIELDS if f not in rec]
    for n in rec.get("namespaces") or []:
        out += [f"namespaces.{f}" for f in NAMESPACE_FIELDS if f not in n]
    return out
