"""ops.mgmt.jsonrpc: the sans-I/O codec and parameter binding."""
from __future__ import annotations

import json

import pytest

from ops.mgmt import jsonrpc as rpc
from ops.mgmt.jsonrpc import ErrorCode, MgmtError, Param, Request


def one(line: str | bytes) -> Request | dict:
    inc = rpc.decode(line)
    assert not inc.batch and len(inc.items) == 1
    return inc.items[0]


def test_decode_request_and_notification() -> None:
    r = one('{"jsonrpc":"2.0","method":"controller.list","id":7}')
    assert r == Request("controller.list", None, 7, False)
    n = one(b'{"jsonrpc":"2.0","method":"stats","params":{"ctrl":"a"}}')
    assert isinstance(n, Request) and n.notification and n.params == {"ctrl": "a"}
    assert one('{"jsonrpc":"2.0","method":"x","id":null}') == Request("x", None, None, False)


@pytest.mark.parametrize("line, code, rid", [
    ("{not json", ErrorCode.PARSE_ERROR, None),
    (b"\xff\xfe", ErrorCode.PARSE_ERROR, None),
    ("[]", ErrorCode.INVALID_REQUEST, None),
    ("42", ErrorCode.INVALID_REQUEST, None),
    ('{"method":"x","id":1}', ErrorCode.INVALID_REQUEST, 1),
    ('{"jsonrpc":"1.0","method":"x","id":1}', ErrorCode.INVALID_REQUEST, 1),
    ('{"jsonrpc":"2.0","method":5,"id":"a"}', ErrorCode.INVALID_REQUEST, "a"),
    ('{"jsonrpc":"2.0","method":"x","params":3,"id":2}', ErrorCode.INVALID_REQUEST, 2),
    ('{"jsonrpc":"2.0","method":"x","id":{"a":1}}', ErrorCode.INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","method":"x","id":true}', ErrorCode.INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","method":"x","id":3,"extra":1}', ErrorCode.INVALID_REQUEST, 3),
])
def test_decode_errors(line: str | bytes, code: int, rid: object) -> None:
    e = one(line)
    assert isinstance(e, dict)
    assert e["jsonrpc"] == "2.0" and e["error"]["code"] == code and e["id"] == rid
    assert e["error"]["message"]


def test_oversized_line_is_parse_error() -> None:
    e = one(b'{"x":"' + b"a" * rpc.MAX_LINE + b'"}')
    assert isinstance(e, dict) and e["error"]["code"] == ErrorCode.PARSE_ERROR


def test_batch_mixed() -> None:
    inc = rpc.decode('[{"jsonrpc":"2.0","method":"a","id":1}, 5, {"jsonrpc":"2.0","method":"b"}]')
    assert inc.batch and len(inc.items) == 3
    a, bad, b = inc.items
    assert isinstance(a, Request) and a.id == 1
    assert isinstance(bad, dict) and bad["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert isinstance(b, Request) and b.notification
    out = rpc.encode_replies(inc, [rpc.result(1, "ok"), bad])
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert json.loads(out) == [{"jsonrpc": "2.0", "id": 1, "result": "ok"}, bad]


def test_all_notifications_get_no_reply() -> None:
    inc = rpc.decode('{"jsonrpc":"2.0","method":"a"}')
    assert rpc.encode_replies(inc, []) == b""


SPEC = rpc.MethodSpec("namespace.add", "namespace_add",
                      (Param("ctrl", (str,)), Param("spec", (str,)), Param("nsid", (int, type(None)), False, None),
                       Param("read_only", (bool,), False, False)),
                      (Param("serial", (str,), False),))


def test_bind_defaults_and_extras() -> None:
    assert rpc.bind(SPEC, {"ctrl": "a", "spec": "ram:1M"}) == {
        "ctrl": "a", "spec": "ram:1M", "nsid": None, "read_only": False}
    assert rpc.bind(SPEC, {"ctrl": "a", "spec": "x", "serial": "S", "nsid": 3})["serial"] == "S"
    assert "serial" not in rpc.bind(SPEC, {"ctrl": "a", "spec": "x"})   # absent extras are not invented


@pytest.mark.parametrize("params, words", [
    ({"ctrl": "a"}, ["missing parameter 'spec'", "string"]),
    ({"ctrl": 5, "spec": "x"}, ["'ctrl' must be string", "got integer 5"]),
    ({"ctrl": "a", "spec": "x", "nsid": "1"}, ["'nsid' must be integer or null", 'got string "1"']),
    ({"ctrl": "a", "spec": "x", "nsid": True}, ["'nsid' must be integer"]),
    ({"ctrl": "a", "spec": "x", "read_only": 1}, ["'read_only' must be boolean"]),
    ({"ctrl": "a", "spec": "x", "colour": 1}, ["unknown parameter(s) colour", "valid: ctrl"]),
    (["a", "x"], ["pass params by name"]),
])
def test_bind_errors_name_the_param(params: object, words: list[str]) -> None:
    with pytest.raises(MgmtError) as ei:
        rpc.bind(SPEC, params)  # type: ignore[arg-type]
    assert ei.value.code == ErrorCode.INVALID_PARAMS
    for w in words:
        assert w in ei.value.message


def test_client_side_roundtrip() -> None:
    req = rpc.make_request("stats", {"ctrl": "a"}, 9)
    assert one(rpc.encode(req)) == Request("stats", {"ctrl": "a"}, 9)
    assert rpc.parse_reply(rpc.encode(rpc.result(9, {"x": 1})), 9) == {"x": 1}
    with pytest.raises(rpc.RpcError) as ei:
        rpc.parse_reply(rpc.encode(rpc.error(9, -32001, "no controller 'zz'")), 9)
    assert ei.value.code == -32001 and ei.value.message == "no controller 'zz'"
    with pytest.raises(rpc.RpcError):
        rpc.parse_reply(b"garbage", 9)
    with pytest.raises(rpc.RpcError, match="does not match"):
        rpc.parse_reply(rpc.encode(rpc.result(8, None)), 9)


def test_error_object_shape() -> None:
    e = rpc.error(3, ErrorCode.INVALID_PARAMS, "bad", {"param": "x"})
    assert e == {"jsonrpc": "2.0", "id": 3, "error": {"code": -32602, "message": "bad", "data": {"param": "x"}}}
    assert "data" not in rpc.error(3, -32000, "m")["error"]
