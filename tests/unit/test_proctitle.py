"""ops.proctitle: the name shows in /proc/PID/comm and /proc/PID/cmdline of a real child."""
import multiprocessing as mp

import pytest

from ops.proctitle import comm_for


def _child(name, ready, done):
    from ops.proctitle import set_process_name
    set_process_name(name)
    ready.set()
    done.wait(10)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name, comm", [
    ("worker 2", "vnvmed:worker2"),
    ("worker 123", "worker123"),
    ("supervisor", "supervisor"),
    ("vnvmed: worker 7", "vnvmed:worker7"),
])
def test_spawned_child_shows_name(name, comm):
    """comm (15 bytes) keeps the role word; cmdline carries 'vnvmed: <name>'."""
    assert comm_for(name) == comm
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_child, args=(name, ready, done))
    p.start()
    try:
        assert ready.wait(15)
        with open(f"/proc/{p.pid}/comm") as f:
            assert f.read().rstrip("\n") == comm
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode()
        role = name.removeprefix("vnvmed: ")
        assert f"vnvmed: {role}" in cmdline and "vnvmed: vnvmed" not in cmdline
    finally:
        done.set()
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0


def test_comm_never_exceeds_15_bytes():
    """Long names are cut to the kernel limit, keeping the front (the role)."""
    assert comm_for("frontend controller-nvme0") == "frontendcontrol"
    assert len(comm_for("x" * 100).encode()) == 15
