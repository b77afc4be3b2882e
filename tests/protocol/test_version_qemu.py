"""The exact 214-byte VERSION request QEMU 11.1.3 sends (qemu-client.md §4)."""
import json

from vfio_user.client import QEMU_VERSION_JSON
from vfio_user.messages import Version
from vfio_user.wire import Header


def qemu_request() -> bytes:
    payload = Version(0, 0, QEMU_VERSION_JSON).encode()
    raw = Header(0, 1, 16 + len(payload), 0, 0).encode() + payload
    return raw


def test_request_matches_the_capture():
    raw = qemu_request()
    assert len(raw) == 214
    assert raw[:16] == bytes.fromhex("00000100d60000000000000000000000")
    assert raw[16:32] == bytes.fromhex("000000007b226361706162696c697469")
    assert raw[-6:] == b'rue}}\0'


def test_reply_fits_qemu_buffer_and_passes_qemu_checks(raw_client):
    raw_client.send_raw(qemu_request())
    f = raw_client.recv_message()
    h = f.header
    assert h.msg_id == 0 and h.command == 1 and h.is_reply and not h.is_error
    assert h.size <= 214                     # "reply larger than recv buffer" otherwise
    assert f.payload[-1:] == b"\0"           # QEMU requires the trailing NUL
    v = Version.decode(f.payload)
    assert (v.major, v.minor) == (0, 0)
    caps = json.loads(v.json)["capabilities"]
    assert isinstance(caps, dict)
    assert caps["max_msg_fds"] <= 16
    assert caps["max_data_xfer_size"] <= 64 << 20
    assert caps["pgsizes"] % 4096 == 0
    assert "write_multiple" not in caps and "twin_socket" not in caps
    assert caps["migration"] == {"pgsize": 4096}   # QEMU offered it; pgsize a 4 KiB multiple
    # The session is now negotiated: device info works.
    assert raw_client.get_device_info().num_regions >= 8
