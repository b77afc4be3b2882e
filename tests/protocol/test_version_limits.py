"""VERSION JSON that is too deep or too large is malformed input: EINVAL, no traceback.

Found from outside (issue 12): ~1000 levels of nested JSON raised RecursionError inside
json.loads, logged as an internal error with a traceback.  Depth and size are bounded
before parsing; the session stays usable for a proper VERSION.
"""
import errno
import logging

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.negotiate import MAX_JSON_BYTES, MAX_JSON_DEPTH, parse_client_version
from vfio_user.messages import Version


@pytest.mark.parametrize("text", [
    '{"capabilities": ' + "[" * 1000 + "]" * 1000 + "}",
    '{"capabilities": {"x": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}}",
    "[" * 100000,                                   # unterminated, deep
    '{"capabilities": {"migration": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}}",
])
def test_deep_json_is_einval_without_traceback(raw_client, caplog, text):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProtocolError) as e:
        raw_client.negotiate(text)
    assert e.value.errno == errno.EINVAL
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    raw_client.negotiate()                          # the session is still usable


def test_huge_json_is_einval(raw_client):
    text = '{"capabilities": {}, "pad": "' + "x" * MAX_JSON_BYTES + '"}'
    with pytest.raises(ProtocolError) as e:
        raw_client.negotiate(text)
    assert e.value.errno == errno.EINVAL
    raw_client.negotiate()


def test_depth_limit_counts_only_structure():
    ok = '{"capabilities": {"migration": {"pgsize": 4096, "note": "' + "[{" * 500 + '"}}}'
    caps = parse_client_version(Version(0, 0, ok).encode())
    assert caps.migration == {"pgsize": 4096, "note": "[{" * 500}
    esc = '{"capabilities": {"s": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}}'
    parse_client_version(Version(0, 0, esc).encode())
