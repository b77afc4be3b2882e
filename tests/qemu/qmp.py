"""A minimal QMP client for the real-guest tests (QEMU's JSON machine protocol).

QEMU listens with ``-qmp unix:PATH,server=on,wait=off``; ``Qmp.connect`` retries until
the socket exists, reads the greeting and sends ``qmp_capabilities``.  ``execute``
returns the command's ``return`` value (QmpError for an ``error`` reply); events that
arrive meanwhile are kept, ``wait_event`` returns the first one of a name (kept or
new).  EOF (QEMU died) raises ``QmpClosed`` so a test can look at how it died.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any


class QmpError(RuntimeError):
    pass


class QmpClosed(ConnectionError):
    pass


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> "Qmp":
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.fspath(path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        q = cls(s)
        greeting = q._read(timeout)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        q.execute("qmp_capabilities")
        return q

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP message")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no QMP message") from None
            if not chunk:
                raise QmpClosed("QMP connection closed (QEMU exited?)")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(timeout)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read(max(0.0, deadline - time.monotonic()))
            if ev.get("event") == name:
                return ev
            if "event" in ev:
                self.events.append(ev)

    def close(self) -> None:
        self.sock.close()
