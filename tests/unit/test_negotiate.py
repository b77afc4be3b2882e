"""VERSION negotiation: parsing client JSON and sizing our reply."""
import errno
import json

import pytest

from vfio_user.errors import ProtocolError
from vfio_user.messages import Version
from vfio_user.negotiate import (SERVER_MAX_MSG_FDS, build_server_version, migration_pgsize,
                                 parse_client_version, parse_server_version)

QEMU_JSON = ('{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
             '"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
             '"pgsize": 4096}, "write_multiple": true}}')


def test_qemu_request_parsed_and_reply_fits():
    payload = Version(0, 0, QEMU_JSON).encode()
    assert 16 + len(payload) == 214
    caps = parse_client_version(payload)
    assert caps.max_msg_fds == 16 and caps.write_multiple and caps.qemu_flavour
    reply = build_server_version(caps, 16 + len(payload))
    assert 16 + len(reply.encode()) <= 214
    msg, server = parse_server_version(reply.encode())
    assert (msg.major, msg.minor) == (0, 0)
    assert server == {"max_msg_fds": SERVER_MAX_MSG_FDS, "max_data_xfer_size": 1 << 20,
                      "pgsizes": 4096, "migration": {"pgsize": 4096}}
    assert "write_multiple" not in server and "twin_socket" not in server


def test_migration_capability_only_when_offered_and_valid():
    for text, want in [('{"capabilities": {"max_msg_fds": 4}}', None),
                       ('{"capabilities": {"migration": {"pgsize": 65536}}}', {"pgsize": 4096}),
                       ('{"capabilities": {"migration": {}}}', {"pgsize": 4096}),
                       ('{"capabilities": {"migration": {"pgsize": 1000}}}', None),
                       ('{"capabilities": {"migration": {"pgsize": 2048}}}', None)]:
        caps = parse_client_version(Version(0, 0, text).encode())
        reply = build_server_version(caps, 400)
        got = json.loads(reply.json)["capabilities"].get("migration")
        assert got == want, text
        assert migration_pgsize(caps) == (want or {}).get("pgsize")


def test_no_json_client_gets_no_json():
    caps = parse_client_version(Version(0, 0).encode())
    assert not caps.had_json and caps.max_msg_fds == 1 and not caps.qemu_flavour
    reply = build_server_version(caps, 20)
    assert reply.json is None and len(reply.encode()) == 4


def test_reply_shrinks_to_request_and_stays_a_subset():
    small = '{"capabilities":{"max_msg_fds":4}}'
    caps = parse_client_version(Version(0, 0, small).encode())
    size = 16 + 4 + len(small) + 1
    reply = build_server_version(caps, size)
    assert 16 + len(reply.encode()) <= size
    assert set(json.loads(reply.json)["capabilities"]) <= {"max_msg_fds"}
    tiny = '{}'
    caps = parse_client_version(Version(0, 0, tiny).encode())
    r = build_server_version(caps, 16 + 4 + 3)
    assert 16 + len(r.encode()) <= 23


def test_bad_versions():
    with pytest.raises(ProtocolError) as e:
        parse_client_version(Version(1, 0).encode())
    assert e.value.errno == errno.ENOTSUP
    for text in ('{"capabilities": [1]}', "not json", "[1,2]",
                 '{"capabilities": {"max_msg_fds": 0}}',
                 '{"capabilities": {"max_msg_fds": true}}',
                 '{"capabilities": {"pgsizes": 512}}',
                 '{"capabilities": {"migration": 5}}'):
        with pytest.raises(ProtocolError) as e:
            parse_client_version(Version(0, 0, text).encode())
        assert e.value.errno == errno.EINVAL, text


def test_minor_never_above_client():
    caps = parse_client_version(Version(0, 5, '{"capabilities":{}}').encode())
    assert build_server_version(caps, 200).minor == 0
