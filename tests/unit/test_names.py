"""reactor.shm.names: naming scheme and stale-segment cleanup on real /dev/shm."""
import os
import subprocess
import sys

import posix_ipc
import pytest

from reactor.shm import names


def _dead_pid() -> int:
    """A pid that certainly belonged to a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not names.pid_alive(p.pid)
    return p.pid


def test_prefix_and_ring_name_shape(tmp_path):
    """Prefix is vnvmed-<8 hex>-<pid>, ring names /<prefix>-ring-<n>."""
    prefix = names.instance_prefix(str(tmp_path), pid=1234)
    h = names.run_dir_hash(str(tmp_path))
    assert len(h) == 8 and int(h, 16) >= 0
    assert prefix == f"vnvmed-{h}-1234"
    assert names.ring_name(prefix, 3) == f"/vnvmed-{h}-1234-ring-3"
    assert names.instance_prefix(str(tmp_path)).endswith(f"-{os.getpid()}")
    with pytest.raises(ValueError):
        names.segment_name(prefix, "a/b", 0)


def test_hash_depends_on_run_dir(tmp_path):
    """Different run dirs hash differently; the same dir via a symlink hashes the same."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(); b.mkdir()
    (tmp_path / "link").symlink_to(a)
    assert names.run_dir_hash(str(a)) != names.run_dir_hash(str(b))
    assert names.run_dir_hash(str(a)) == names.run_dir_hash(str(tmp_path / "link"))


def test_cleanup_removes_only_dead_pid_objects(tmp_path):
    """Segments and semaphores of a dead pid go; a live pid's and other run dirs' stay."""
    run_dir = str(tmp_path / "run"); os.mkdir(run_dir)
    other_dir = str(tmp_path / "other"); os.mkdir(other_dir)
    dead = _dead_pid()
    dead_prefix = names.instance_prefix(run_dir, pid=dead)
    live_prefix = names.instance_prefix(run_dir, pid=os.getppid())  # our parent is alive
    other_prefix = names.instance_prefix(other_dir, pid=dead)
    created = {
        "dead_ring": names.ring_name(dead_prefix, 0),
        "dead_mem": names.segment_name(dead_prefix, "mem", 1),
        "live_ring": names.ring_name(live_prefix, 0),
        "own_ring": names.ring_name(names.instance_prefix(run_dir), 0),
        "other_ring": names.ring_name(other_prefix, 0),
    }
    segs = {k: posix_ipc.SharedMemory(v, posix_ipc.O_CREX, size=4096) for k, v in created.items()}
    dead_sem_name = names.segment_name(dead_prefix, "sem", 0)
    sem = posix_ipc.Semaphore(dead_sem_name, posix_ipc.O_CREX)
    sem.close()
    try:
        removed = names.cleanup_stale(run_dir)
        assert sorted(removed) == sorted([created["dead_ring"], created["dead_mem"], dead_sem_name])
        left = set(os.listdir("/dev/shm"))
        for key in ("live_ring", "own_ring", "other_ring"):
            assert created[key][1:] in left
        for key in ("dead_ring", "dead_mem"):
            assert created[key][1:] not in left
        assert "sem." + dead_sem_name[1:] not in left
        # A second pass finds nothing more to do.
        assert names.cleanup_stale(run_dir) == []
    finally:
        for key, seg in segs.items():
            seg.close_fd()
            try:
                seg.unlink()
            except posix_ipc.ExistentialError:
                pass
        try:
            posix_ipc.unlink_semaphore(dead_sem_name)
        except posix_ipc.ExistentialError:
            pass


def test_list_instance_objects_ignores_foreign_names(tmp_path):
    """Names that merely look similar are not ours."""
    fake = tmp_path / "shm"; fake.mkdir()
    h = names.run_dir_hash(str(tmp_path))
    for n in [f"vnvmed-{h}-12-ring-0", f"vnvmed-{h}-x-ring-0", f"vnvmed-{h}1-12-ring-0",
              f"sem.vnvmed-{h}-13-sem-0", "unrelated", f"xvnvmed-{h}-12-ring-0"]:
        (fake / n).write_bytes(b"")
    got = names.list_instance_objects(str(tmp_path), shm_dir=str(fake))
    assert sorted((e.name, e.pid, e.semaphore) for e in got) == sorted([
        (f"/vnvmed-{h}-13-sem-0", 13, True),
        (f"/vnvmed-{h}-12-ring-0", 12, False),
    ])
