import multiprocessing as mp
import os

import posix_ipc
import pytest

from backends.base import Backend, create_backend, open_backend, parse_size
from backends.file import FileBackend

pytestmark = pytest.mark.timeout(20)

PREFIX = f"vnvmedtest{os.getpid()}"


def _child_write(spec, q):
    # a separate (spawned) process attaches by name, writes, and exits
    b = open_backend(spec)
    b.write_from(4096, [memoryview(b"from-child")])
    data = bytearray(5)
    b.read_into(0, [memoryview(data)])
    b.close()
    q.put(bytes(data))


def test_parse_size():
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512K") == 512 << 10
    assert parse_size("4096") == 4096
    assert parse_size("2MiB") == 2 << 20
    for bad in ("", "12Q", "-5", "0", "1.5G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_ram_shared_between_processes():
    b = create_backend("ram", "1M", name_prefix=PREFIX)
    try:
        assert isinstance(b, Backend)
        spec = b.spec()
        assert spec["kind"] == "ram" and spec["size"] == 1 << 20 and spec["shm"].startswith(f"/{PREFIX}-ns-")
        b.write_from(0, [memoryview(b"he"), memoryview(b"llo")])
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_child_write, args=(spec, q))
        p.start()
        got = q.get(timeout=15)
        p.join(timeout=15)
        assert p.exitcode == 0
        assert got == b"hello"
        out = bytearray(10)
        b.read_into(4096, [memoryview(out)])
        assert out == b"from-child"
        # the child's close did not unlink: we can still attach
        again = open_backend(spec)
        again.close()
    finally:
        b.destroy()


def test_ram_destroy_unlinks_and_unique_names():
    a = create_backend("ram", "64K", name_prefix=PREFIX)
    c = create_backend("ram", "64K", name_prefix=PREFIX)
    assert a.spec()["shm"] != c.spec()["shm"]
    name = a.spec()["shm"]
    a.write_zeroes(0, 512)
    a.destroy()
    c.destroy()
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(name)
    with pytest.raises(ValueError):
        open_backend({"kind": "ram", "shm": name, "size": 65536})


def test_ram_discard_zeroes():
    b = create_backend("ram", "8K", name_prefix=PREFIX)
    try:
        b.write_from(0, [memoryview(b"\xff" * 8192)])
        b.discard(512, 1024)
        out = bytearray(8192)
        b.read_into(0, [memoryview(out)])
        assert out[:512] == b"\xff" * 512 and out[512:1536] == bytes(1024) and out[1536:] == b"\xff" * 6656
    finally:
        b.destroy()


def test_null_backend():
    b = create_backend("null", "1G", name_prefix=PREFIX)
    assert b.size == 1 << 30
    b.write_from(0, [memoryview(b"x" * 10)])
    buf = bytearray(b"\x01" * (3 << 20))
    b.read_into(0, [memoryview(buf)[:100], memoryview(buf)[100:]])
    assert not any(buf)
    assert open_backend(b.spec()).size == 1 << 30


def test_file_preadv_into_views_and_spec(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 64)       # 16 KiB
    b = create_backend("file", str(path), name_prefix=PREFIX)
    try:
        assert b.size == 16384
        big = bytearray(1000)
        views = [memoryview(big)[:300], memoryview(big)[300:1000]]
        b.read_into(256, views)
        assert bytes(big) == (bytes(range(256)) * 8)[:1000]
        b.write_from(4096, [memoryview(b"abc"), memoryview(b""), memoryview(b"def")])
        b.flush()
        assert path.read_bytes()[4096:4102] == b"abcdef"
        b2 = open_backend(b.spec())
        out = bytearray(6)
        b2.read_into(4096, [memoryview(out)])
        assert out == b"abcdef"
        b2.close()
        b.write_zeroes(0, 1024)
        b.discard(8192, 4096)
        data = path.read_bytes()
        assert data[:1024] == bytes(1024) and data[8192:12288] == bytes(4096)
        assert data[1024:1030] == bytes(range(256))[:6]
        assert len(data) == 16384
    finally:
        b.destroy()
    assert path.exists()


def test_file_read_past_eof_is_eio(tmp_path):
    path = tmp_path / "d"
    path.write_bytes(bytes(4096))
    b = FileBackend(str(path))
    try:
        os.truncate(path, 1024)                     # shrunk under us
        with pytest.raises(OSError):
            b.read_into(0, [memoryview(bytearray(4096))])
    finally:
        b.close()


def test_file_read_only(tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(bytes(4096))
    b = FileBackend(str(path), read_only=True)
    try:
        with pytest.raises(OSError):
            b.write_from(0, [memoryview(b"x")])
    finally:
        b.close()


def test_file_direct_falls_back_for_unaligned(tmp_path):
    path = tmp_path / "direct"
    path.write_bytes(b"z" * 8192)
    try:
        b = FileBackend(str(path), direct=True)
    except OSError:
        pytest.skip("O_DIRECT not supported on this filesystem")
    try:
        out = bytearray(100)
        b.read_into(3, [memoryview(out)])
        assert out == b"z" * 100
    finally:
        b.close()


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_backend("file", str(tmp_path / "missing"), name_prefix=PREFIX)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="smaller than one"):
        create_backend("file", str(small), name_prefix=PREFIX)
    with pytest.raises(ValueError):
        create_backend("file", str(tmp_path), name_prefix=PREFIX)    # a directory
    with pytest.raises(ValueError):
        create_backend("tape", "1M", name_prefix=PREFIX)
    with pytest.raises(ValueError):
        create_backend("ram", "100", name_prefix=PREFIX)
    for spec in ({}, {"kind": "ram"}, {"kind": "nope"}, "ram", {"kind": "file"}):
        with pytest.raises(ValueError):
            open_backend(spec)
