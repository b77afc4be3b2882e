"""JSON-RPC 2.0, sans-I/O: bytes in, typed requests out; replies as plain dicts.

Theory of operation
-------------------
The management socket carries newline-delimited JSON.  ``decode(line)`` turns
one line into an ``Incoming``: a list of items, each either a ``Request`` to
run or an already-built error reply (a malformed member of a batch gets its own
-32600 answer; the rest of the batch still runs).  Notifications (no ``id``)
are run but never answered.  After running, the caller collects the replies
and hands them to ``encode_replies`` which gives the bytes to send (or nothing,
when every item was a notification).

Parameters are checked against a ``MethodSpec`` table by ``bind``: params by
name only, unknown names, missing names and wrong types become -32602 with the
parameter named and the expected type spelled out.  Application failures are
``MgmtError`` (code -32000 by default) whose message says what to fix.

Nothing here touches a socket; the same functions give the client
(``make_request`` / ``parse_reply``) and the tests their codec.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable

JSONRPC = "2.0"
MAX_LINE = 1 << 20   # one request line; larger is refused as a parse error (memory bound)


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    APPLICATION = -32000     # ManagementApi refused: the message says what to fix
    NOT_FOUND = -32001       # named controller/namespace does not exist
    CONFLICT = -32002        # name/socket/NSID already in use, or object busy


class MgmtError(Exception):
    """Raised by ManagementApi implementations; becomes a JSON-RPC error reply."""

    def __init__(self, message: str, code: int = ErrorCode.APPLICATION, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(code)
        self.data = data


class RpcError(Exception):
    """Client side: the server answered with an error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


@dataclass(slots=True, frozen=True)
class Request:
    method: str
    params: dict[str, Any] | list[Any] | None
    id: Any = None
    notification: bool = False


@dataclass(slots=True)
class Incoming:
    items: list[Request | dict[str, Any]] = field(default_factory=list)
    batch: bool = False


# --------------------------------------------------------------------------- replies

def result(id: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": id, "result": value}


def error(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": JSONRPC, "id": id, "error": err}


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def encode_replies(incoming: Incoming, replies: list[dict[str, Any]]) -> bytes:
    """Bytes to send for one decoded line: a batch answers with an array, nothing if all were notifications."""
    if not replies:
        return b""
    return encode(replies if incoming.batch else replies[0])


# --------------------------------------------------------------------------- decode

def _valid_id(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _request(obj: Any) -> Request | dict[str, Any]:
    if not isinstance(obj, dict):
        return error(None, ErrorCode.INVALID_REQUEST, "request must be a JSON object")
    rid = obj.get("id")
    if not _valid_id(rid):
        return error(None, ErrorCode.INVALID_REQUEST, "id must be a string, a number or null")
    if obj.get("jsonrpc") != JSONRPC:
        return error(rid, ErrorCode.INVALID_REQUEST, 'missing or wrong "jsonrpc": must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return error(rid, ErrorCode.INVALID_REQUEST, '"method" must be a non-empty string')
    params = obj.get("params")
    if params is not None and not isinstance(params, (dict, list)):
        return error(rid, ErrorCode.INVALID_REQUEST, '"params" must be an object or an array')
    extra = set(obj) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return error(rid, ErrorCode.INVALID_REQUEST, f"unknown member(s) {', '.join(sorted(extra))}")
    return Request(method, params, rid, notification="id" not in obj)


def decode(line: bytes | str) -> Incoming:
    """One line of the wire -> requests to run and/or ready error replies."""
    if len(line) > MAX_LINE:
        return Incoming([error(None, ErrorCode.PARSE_ERROR, f"request longer than {MAX_LINE} bytes")])
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        return Incoming([error(None, ErrorCode.PARSE_ERROR, f"parse error: {e}")])
    if isinstance(obj, list):
        if not obj:
            return Incoming([error(None, ErrorCode.INVALID_REQUEST, "empty batch")])
        return Incoming([_request(o) for o in obj], batch=True)
    return Incoming([_request(obj)])


# --------------------------------------------------------------------------- parameters

_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", float: "number", list: "array",
               dict: "object", type(None): "null"}


@dataclass(slots=True, frozen=True)
class Param:
    name: str
    types: tuple[type, ...]
    required: bool = True
    default: Any = None

    def accepts(self, v: Any) -> bool:
        for t in self.types:
            if t is bool and type(v) is bool:
                return True
            if t is int and type(v) is int:          # True is not an integer here
                return True
            if t not in (bool, int) and isinstance(v, t):
                return True
        return False

    @property
    def type_name(self) -> str:
        return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)


@dataclass(slots=True, frozen=True)
class MethodSpec:
    name: str                       # on the wire, dotted: "controller.add"
    attr: str                       # method of the API object: "controller_add"
    params: tuple[Param, ...] = ()
    extra: tuple[Param, ...] = ()   # optional by-name extras passed as **opts
    doc: str = ""


def bind(spec: MethodSpec, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
    """Check params against spec -> kwargs; raises MgmtError(-32602) naming the parameter."""
    if params is None:
        params = {}
    if isinstance(params, list):
        if not params:
            params = {}
        else:
            raise MgmtError(f"{spec.name}: pass params by name (a JSON object), e.g. "
                            f"{ {p.name: '...' for p in spec.params if p.required} }",
                            ErrorCode.INVALID_PARAMS)
    known = {p.name: p for p in (*spec.params, *spec.extra)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MgmtError(f"{spec.name}: unknown parameter(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(known) or 'none'}", ErrorCode.INVALID_PARAMS)
    out: dict[str, Any] = {}
    for p in known.values():
        if p.name not in params:
            if p.required:
                raise MgmtError(f"{spec.name}: missing parameter {p.name!r} ({p.type_name})",
                                ErrorCode.INVALID_PARAMS)
            if p in spec.params:
                out[p.name] = p.default
            continue
        v = params[p.name]
        if not p.accepts(v):
            raise MgmtError(f"{spec.name}: parameter {p.name!r} must be {p.type_name}, got "
                            f"{_TYPE_NAMES.get(type(v), type(v).__name__)} {json.dumps(v)}",
                            ErrorCode.INVALID_PARAMS, {"param": p.name, "expected": p.type_name})
        out[p.name] = v
    return out


def method_table(specs: Iterable[MethodSpec]) -> dict[str, MethodSpec]:
    return {s.name: s for s in specs}


# --------------------------------------------------------------------------- client side

def make_request(method: str, params: dict[str, Any] | None, id: int | str) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": JSONRPC, "method": method, "id": id}
    if params:
        req["params"] = params
    return req


def parse_reply(line: bytes | str, expect_id: Any) -> Any:
    """Client: one reply line -> the result, or raise RpcError with the server's message."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RpcError(ErrorCode.PARSE_ERROR, f"server sent invalid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("jsonrpc") != JSONRPC:
        raise RpcError(ErrorCode.INTERNAL_ERROR, f"server sent a non JSON-RPC 2.0 reply: {obj!r:.200}")
    if "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        raise RpcError(int(err.get("code", ErrorCode.INTERNAL_ERROR)), str(err.get("message", "error")),
                       err.get("data"))
    if obj.get("id") != expect_id:
        raise RpcError(ErrorCode.INTERNAL_ERROR, f"reply id {obj.get('id')!r} does not match {expect_id!r}")
    return obj.get("result")
