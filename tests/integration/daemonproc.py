"""Run the real daemon (bin/vnvmed) as a subprocess for integration tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Daemon:
    def __init__(self, run_dir: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.log_path = os.path.join(run_dir, "vnvmed.log")
        self.args = args
        self.env = dict(os.environ, VNVMED_RUN_DIR=run_dir, **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Daemon":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "vnvmed"), *self.args],
                                     env=self.env, stderr=self._log, stdout=self._log)
        deadline = time.monotonic() + timeout
        while "ready" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vnvmed exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vnvmed not ready:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> dict[int, str]:
        """pid -> command line of the daemon's direct children."""
        out = {}
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        out[int(pid)] = c.read().replace(b"\0", b" ").decode().strip()
                except FileNotFoundError:
                    pass
        return out

    def pids_named(self, word: str) -> list[int]:
        return sorted(p for p, cmd in self.children().items() if word in cmd)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        self._log.close()
        return self.proc.returncode

    def shm_left(self) -> list[str]:
        from reactor.shm.names import instance_prefix
        prefix = instance_prefix(self.run_dir, self.pid)
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
