"""vnvmectl: the management client. Talks JSON-RPC to ``$VNVMED_RUN_DIR/vnvmed.rpc``.

Exit status: 0 success, 1 the daemon refused (its message is printed) or is
not reachable, 2 usage error (argparse).  Output is a table for humans; with
``--json`` the server's result is printed as JSON for scripts.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
from typing import Any, Sequence, TextIO

from ops.config import DEFAULT_RUN_DIR, RPC_SOCKET_NAME, RUN_DIR_ENV
from ops.mgmt import jsonrpc as rpc


class DaemonUnreachable(Exception):
    pass


class RpcClient:
    """Blocking JSON-RPC client over the management socket (one request at a time)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except FileNotFoundError:
                s.close()
                raise DaemonUnreachable(f"vnvmed is not running: no management socket at {self.path} "
                                        f"(start vnvmed, or point --rpc / ${RUN_DIR_ENV} at its run dir)") from None
            except ConnectionRefusedError:
                s.close()
                raise DaemonUnreachable(f"vnvmed is not running: {self.path} refuses connections "
                                        "(stale socket from a daemon that exited?)") from None
            except PermissionError:
                s.close()
                raise DaemonUnreachable(f"permission denied on {self.path}: the management socket is "
                                        "mode 0600, run vnvmectl as the daemon's user (e.g. root)") from None
            except OSError as e:
                s.close()
                raise DaemonUnreachable(f"cannot connect to {self.path}: {e.strerror or e}") from None
            self._sock = s
        return self._sock

    def call(self, method: str, **params: Any) -> Any:
        s = self._connect()
        rid = self._next_id
        self._next_id += 1
        try:
            s.sendall(rpc.encode(rpc.make_request(method, params, rid)))
            while b"\n" not in self._buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise DaemonUnreachable(f"vnvmed closed the connection on {self.path} without answering")
                self._buf += chunk
        except socket.timeout:
            raise DaemonUnreachable(f"vnvmed did not answer {method} within {self.timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonUnreachable(f"vnvmed dropped the connection on {self.path}") from None
        line, _, self._buf = self._buf.partition(b"\n")
        return rpc.parse_reply(line, rid)


# --------------------------------------------------------------------------- formatting

def fmt_size(n: Any) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "-" if n is None else str(n)
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def format_controllers(ctrls: list[dict[str, Any]]) -> str:
    """controller.list records (ops/schema.py) as a table; a fatal reason goes on its own line."""
    if not ctrls:
        return "no controllers"
    rows, notes = [], []
    for c in ctrls:
        ns = ", ".join(f"{n['nsid']}={n['kind']}:{n['arg']}({fmt_size(n['size'])}/{n['block_size']}"
                       f"{',ro' if n['read_only'] else ''})" for n in c["namespaces"]) or "-"
        rows.append([_cell(c["name"]), c["state"], _cell(c["client_connected"]), str(len(c["queues"])),
                     _cell(c["socket"]), ns])
        if c["fatal_reason"]:
            notes.append(f"{c['name']}: {c['fatal_reason']}")
    out = table(rows, ["NAME", "STATE", "CLIENT", "QUEUES", "SOCKET", "NAMESPACES (nsid=kind:arg(size/bs))"])
    return "\n".join([out, *notes])


_CTRL_COLS = (("commands", "COMMANDS"), ("read_commands", "READS"), ("write_commands", "WRITES"),
              ("bytes_read", "READ"), ("bytes_written", "WRITTEN"), ("slow_commands", "SLOW"),
              ("doorbell_errors", "DBERR"), ("quiesces", "QUIESCES"))
_QUEUE_COLS = ("worker", "cqid", "depth", "sq_head", "sq_tail", "pending", "cq_head", "cq_tail", "broken")
_WORKER_COLS = ("id", "core", "pid", "alive", "restarts", "datapath", "polls", "idle", "sleeps", "queues")


def format_stats(stats: dict[str, Any]) -> str:
    """`stats` as tables: controllers, each controller's I/O queues, worker processes."""
    ctrls = stats.get("controllers") or {}
    rows = []
    for name, s in sorted(ctrls.items()):
        c = s.get("controller") if isinstance(s, dict) else None
        if not isinstance(c, dict):
            rows.append([name, *(["-"] * len(_CTRL_COLS)), _cell((s or {}).get("error", "no answer"))])
            continue
        rows.append([name, *(fmt_size(c.get(k)) if k.startswith("bytes") else _cell(c.get(k))
                             for k, _ in _CTRL_COLS), _cell(s.get("errors_logged"))])
    parts = [table(rows, ["CONTROLLER", *(h for _, h in _CTRL_COLS), "ERRLOG"]) if rows else "no controllers"]
    for name, s in sorted(ctrls.items()):
        queues = (s.get("queues") if isinstance(s, dict) else None) or {}
        if queues:
            qrows = [[str(sq), *(_cell(q.get(k)) for k in _QUEUE_COLS)]
                     for sq, q in sorted(queues.items(), key=lambda kv: int(kv[0]))]
            parts.append(f"\n{name}: I/O queues\n" + table(qrows, ["SQ", *(k.upper() for k in _QUEUE_COLS)]))
    workers = stats.get("workers") or []
    if workers:
        wrows = [[_cell(w.get(k)) for k in _WORKER_COLS] for w in workers]
        parts.append("\nworkers\n" + table(wrows, [k.upper() for k in _WORKER_COLS]))
    return "\n".join(parts)


def format_records(recs: list[dict[str, Any]]) -> str:
    if not recs:
        return "none"
    cols: list[str] = []
    for r in recs:
        cols.extend(k for k in r if k not in cols)
    return table([[_cell(r.get(k)) for k in cols] for r in recs], [k.upper() for k in cols])


def format_tree(obj: Any, prefix: str = "") -> str:
    """Nested dicts/lists as ``a.b.c: value`` lines, sorted: readable and grep-able."""
    lines: list[str] = []

    def walk(o: Any, p: str) -> None:
        if isinstance(o, dict) and o:
            for k in sorted(o, key=str):
                walk(o[k], f"{p}.{k}" if p else str(k))
        elif isinstance(o, list) and o and any(isinstance(x, (dict, list)) for x in o):
            for i, x in enumerate(o):
                walk(x, f"{p}[{i}]")
        else:
            lines.append(f"{p or 'result'}: {_cell(o)}")

    walk(obj, prefix)
    return "\n".join(lines)


def format_result(obj: Any) -> str:
    if isinstance(obj, dict):
        return format_tree(obj) if obj else "ok"
    return _cell(obj) if obj is not None else "ok"


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the raw result as JSON")
    p = argparse.ArgumentParser(prog="vnvmectl", parents=[common],
                                description="Manage a running vnvmed over its management socket.")
    p.add_argument("--rpc", metavar="PATH", help=f"management socket (default ${RUN_DIR_ENV}/{RPC_SOCKET_NAME}, "
                                                 f"else {DEFAULT_RUN_DIR}/{RPC_SOCKET_NAME})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    sub = p.add_subparsers(dest="group", required=True,
                           metavar="{controller,namespace,stats,workers,upgrade}")

    ctrl = sub.add_parser("controller", help="list/add/remove controllers").add_subparsers(
        dest="cmd", required=True)
    ctrl.add_parser("list", parents=[common], help="list controllers")
    add = ctrl.add_parser("add", parents=[common], help="add a controller on a new vfio-user socket")
    add.add_argument("name")
    add.add_argument("--socket", required=True, help="socket path (relative: to the current directory)")
    add.add_argument("--serial")
    add.add_argument("--model")
    add.add_argument("--max-io-queues", type=int)
    add.add_argument("--mqes", type=int, help="CAP.MQES: max queue entries - 1")
    add.add_argument("--mdts", type=int)
    add.add_argument("--socket-mode", help="octal, e.g. 0660 (world bits need --allow-world-socket)")
    add.add_argument("--allow-world-socket", action="store_true", default=None,
                     help="accept a --socket-mode any local user can connect to (logged)")
    add.add_argument("--doorbells", choices=("mmap", "trapped"),
                     help="mmap (default): doorbell page shared; trapped: every write is a message")
    add.add_argument("--message-write-windows", metavar="RANGES",
                     help="START-END[,...] or none: guest ranges written with DMA_WRITE (default 0-1M)")
    add.add_argument("--socket-owner")
    add.add_argument("--socket-group")
    rm = ctrl.add_parser("remove", parents=[common], help="remove a controller")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="even if a VM is connected")
    sv = ctrl.add_parser("save", parents=[common], help="save the controller's state to FILE (the "
                         "migration snapshot); it stays stopped unless --resume (offline migration: "
                         "start the destination with restore = FILE)")
    sv.add_argument("name")
    sv.add_argument("file")
    sv.add_argument("--resume", action="store_true", help="keep the controller running (debugging)")
    rs = ctrl.add_parser("resume", parents=[common], help="run a controller `save` left stopped")
    rs.add_argument("name")

    ns = sub.add_parser("namespace", help="add/remove/resize namespaces").add_subparsers(dest="cmd", required=True)
    nadd = ns.add_parser("add", parents=[common], help="attach KIND:ARG (ram:SIZE, null:SIZE, file:PATH[,direct], "
                                                       "nbd:URI[,size=SIZE], rbd:POOL/IMAGE[?conf=..&id=..])")
    nadd.add_argument("ctrl")
    nadd.add_argument("spec", metavar="KIND:ARG")
    nadd.add_argument("--nsid", type=int)
    nadd.add_argument("--block-size", type=int, default=512)
    nadd.add_argument("--read-only", action="store_true")
    nrm = ns.add_parser("remove", parents=[common], help="detach a namespace")
    nrm.add_argument("ctrl")
    nrm.add_argument("nsid", type=int)
    nrs = ns.add_parser("resize", parents=[common], help="resize a namespace")
    nrs.add_argument("ctrl")
    nrs.add_argument("nsid", type=int)
    nrs.add_argument("size", help="new size, e.g. 2G")

    st = sub.add_parser("stats", parents=[common], help="counters (all controllers, or one)")
    st.add_argument("ctrl", nargs="?")
    sub.add_parser("workers", parents=[common], help="worker processes and their queues")
    sub.add_parser("backends", parents=[common], help="namespace kinds the daemon can serve, and why not")
    up = sub.add_parser("upgrade", parents=[common],
                        help="live upgrade: a new daemon from the installed code takes over every "
                             "controller, VMs stay connected (exit 1 and the reason if it rolled back)")
    up.add_argument("--exec", metavar="PROGRAM",
                    help="start PROGRAM (given the daemon's arguments) instead of the installed vnvmed")
    up.add_argument("--handover-timeout", type=float, default=45.0, metavar="S",
                    help="give up (and roll back) after S seconds (default 45)")
    return p


def rpc_path(arg: str | None, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if arg:
        return arg
    return os.path.join(env.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR, RPC_SOCKET_NAME)


def _absolute_spec(spec: str) -> str:
    # The daemon's cwd is not ours (under systemd it is /): anchor file paths here.
    kind, sep, arg = spec.partition(":")
    if sep and kind.strip().lower() == "file" and arg and not os.path.isabs(arg):
        return f"{kind}:{os.path.abspath(arg)}"
    return spec


def request_for(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Parsed command line -> (method, params) on the wire."""
    key = (a.group, getattr(a, "cmd", None))
    if key == ("controller", "list"):
        return "controller.list", {}
    if key == ("controller", "add"):
        params: dict[str, Any] = {"name": a.name, "socket": os.path.abspath(a.socket)}
        for opt in ("serial", "model", "max_io_queues", "mqes", "mdts", "socket_mode", "socket_owner",
                    "socket_group", "doorbells", "allow_world_socket", "message_write_windows"):
            if getattr(a, opt) is not None:
                params[opt] = getattr(a, opt)
        return "controller.add", params
    if key == ("controller", "remove"):
        return "controller.remove", {"name": a.name, "force": a.force}
    if key == ("controller", "save"):
        return "controller.save", {"name": a.name, "resume": a.resume}
    if key == ("controller", "resume"):
        return "controller.resume", {"name": a.name}
    if key == ("namespace", "add"):
        params = {"ctrl": a.ctrl, "spec": _absolute_spec(a.spec), "block_size": a.block_size,
                  "read_only": a.read_only}
        if a.nsid is not None:
            params["nsid"] = a.nsid
        return "namespace.add", params
    if key == ("namespace", "remove"):
        return "namespace.remove", {"ctrl": a.ctrl, "nsid": a.nsid}
    if key == ("namespace", "resize"):
        return "namespace.resize", {"ctrl": a.ctrl, "nsid": a.nsid, "size": a.size}
    if a.group == "stats":
        return "stats", ({"ctrl": a.ctrl} if a.ctrl else {})
    if a.group == "backends":
        return "backends", {}
    if a.group == "upgrade":
        params = {"timeout": a.handover_timeout}
        if a.exec:
            params["exec"] = os.path.abspath(a.exec)
        return "daemon.upgrade", params
    return "workers", {}


def _write_snapshot(path: str, value: dict[str, Any]) -> dict[str, Any]:
    """controller.save: the snapshot goes to FILE (written whole, then renamed into place)."""
    data = base64.b64decode(value.pop("snapshot"))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    value["file"] = os.path.abspath(path)
    return value


def render(method: str, value: Any) -> str:
    if method == "controller.list" and isinstance(value, list):
        return format_controllers(value)
    if method == "stats" and isinstance(value, dict):
        return format_stats(value)
    if method in ("workers", "backends") and isinstance(value, list):
        return format_records(value)
    if method == "daemon.upgrade" and isinstance(value, dict):
        ctrls = value.get("controllers") or {}
        lines = [f"upgraded: pid {value.get('old_pid')} -> pid {value.get('new_pid')} "
                 f"in {value.get('duration_ms')} ms (snapshot format {value.get('format')})"]
        lines += [f"  {n}: blackout {c.get('blackout_ms')} ms" for n, c in sorted(ctrls.items())]
        if value.get("error"):
            lines.append(f"  after the commit: {value['error']}")
        return "\n".join(lines)
    return format_result(value)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    a = build_parser().parse_args(argv)
    method, params = request_for(a)
    timeout = a.timeout
    if method == "daemon.upgrade":     # the answer comes once the handover is done
        timeout = max(timeout, float(params["timeout"]) + 15)
    try:
        with RpcClient(rpc_path(a.rpc), timeout) as client:
            value = client.call(method, **params)
        if method == "controller.save":
            value = _write_snapshot(a.file, value)
    except OSError as e:
        print(f"vnvmectl: {method}: cannot write {a.file}: {e.strerror}", file=err)
        return 1
    except DaemonUnreachable as e:
        print(f"vnvmectl: {e}", file=err)
        return 1
    except rpc.RpcError as e:
        print(f"vnvmectl: {method}: {e.message}", file=err)
        return 1
    text = json.dumps(value, indent=2, sort_keys=True) if getattr(a, "json", False) else render(method, value)
    try:
        print(text, file=out)
        out.flush()
    except BrokenPipeError:
        # The reader left (`vnvmectl stats | head`): not an error of ours.  Point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError):
            pass
        os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
