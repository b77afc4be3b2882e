"""Daemon configuration: the model, the TOML loader, the command line, the default.

Theory of operation
-------------------
There is one validation path.  The TOML file, the command line and the
management socket (``controller.add`` / ``namespace.add``) all hand plain
dicts to the ``_build_*`` functions below, which check every key against a
small schema table and build the slotted dataclasses.  Every failure is a
``ConfigError`` carrying *where* (file or ``<command line>``, the key path such
as ``controllers[1].namespaces[0].kind``, the line when we can tell) and *why*,
so an operator can fix the input without reading this code.

Precedence, lowest first: built-in defaults < ``$VNVMED_RUN_DIR`` (run dir
only) < the config file < command-line flags.  When no controller is
configured anywhere, the embedded default (``nvme0``, 1 GiB RAM namespace,
``<run_dir>/nvme0.sock``) is used, so ``bin/vnvmed`` with no arguments serves
one disk.

This module is pure apart from ``os.stat`` on namespace backing files (a
missing image is a configuration error, better reported at start than at the
guest's first read) and reading the config file.  It never imports backends:
the size grammar (``64M``, ``1G``, ``4096``) lives here.
"""
from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Sequence

from nvme.msgwindow import LOW_MEMORY, Window, normalize as normalize_windows
from ops.cores import expand_cores

DEFAULT_RUN_DIR = "/run/vnvmed"
RUN_DIR_ENV = "VNVMED_RUN_DIR"
RPC_SOCKET_NAME = "vnvmed.rpc"
DEFAULT_CONTROLLER = "nvme0"
DEFAULT_NAMESPACE = "ram:1G"

# One Active Namespace ID list page (Identify CNS 02h) holds 1024 NSIDs; we
# keep every NSID inside it so one page always lists them all.
MAX_NSID = 1024
BLOCK_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_CORE = 4095
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration input is wrong; the message says where and what to fix."""

    def __init__(self, source: str, key: str, reason: str, line: int | None = None) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


class NamespaceKind(StrEnum):
    RAM = "ram"      # ARG = size; contents live in daemon memory, lost at exit
    NULL = "null"    # ARG = size; reads return zeroes, writes are discarded
    FILE = "file"    # ARG = path of a regular file or block device
    NBD = "nbd"      # ARG = libnbd URI: nbd://host[:port]/export, nbd+unix:///export?socket=PATH
    RBD = "rbd"      # ARG = POOL/IMAGE[?conf=PATH&id=USER&keyring=PATH] (Ceph RBD image)


# Namespace kinds whose size comes from elsewhere (a file, a server) and may be capped by `size`.
_REMOTE_KINDS = (NamespaceKind.NBD, NamespaceKind.RBD)
# TOML key holding ARG, per kind.
_ARG_KEY = {NamespaceKind.RAM: "size", NamespaceKind.NULL: "size", NamespaceKind.FILE: "path",
            NamespaceKind.NBD: "uri", NamespaceKind.RBD: "image"}
_NBD_URI_RE = re.compile(r"^nbds?(\+(unix|vsock|tcp))?://", re.IGNORECASE)
_RBD_RE = re.compile(r"^[^/?\s]+/[^/?\s]+(\?.*)?$")
MAX_QUEUE_DEPTH = 1024


class DoorbellMode(StrEnum):
    MMAP = "mmap"        # doorbell page mmapped by the client: guest writes land in memory we poll
    TRAPPED = "trapped"  # no mmap: every doorbell write is a REGION_WRITE that wakes its worker


class Datapath(StrEnum):
    PYTHON = "python"      # nvme.qpair.QueueRunner: the reference
    NATIVE = "native"      # nvme.native: a C loop for the common commands, Python for the rest


class Polling(StrEnum):
    ADAPTIVE = "adaptive"  # busy-poll while busy, back off to blocking waits when idle
    BUSY = "busy"          # never sleep: lowest latency, one full core per worker


# --------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(value: str | int) -> int:
    """``4096``, ``64M``, ``1G``, ``2GiB``, ``512K`` -> bytes (binary units only).

    Raises ValueError with a message that shows the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"size must be a number of bytes or a string like '64M', not {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
            raise ValueError(f"bad size {value!r}: use bytes or a number with K/M/G/T suffix (e.g. 64M, 1G)")
        n = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    else:
        raise ValueError(f"size must be an integer or a string like '64M', not {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


def parse_cores(value: str | Sequence[int]) -> list[int]:
    """``"0-3,6"`` or ``[0, 1]`` -> sorted unique core numbers (not checked against the machine).

    The string syntax is ops.cores' (one parser for ``--cores`` everywhere); the
    supervisor checks availability at start.  A configuration naming a core twice is
    refused here: it is more likely a typo than a wish.
    """
    if isinstance(value, str):
        cores = expand_cores(value)
        if max(cores) > MAX_CORE:
            raise ValueError(f"core {max(cores)} out of range 0..{MAX_CORE}")
    elif isinstance(value, (list, tuple)):
        cores = list(value)
        for c in cores:
            if type(c) is not int or not 0 <= c <= MAX_CORE:
                raise ValueError(f"core {c!r} is not an integer in 0..{MAX_CORE}")
        if not cores:
            raise ValueError("core list is empty")
    else:
        raise ValueError("cores must be a string like '0-3' or a list of integers")
    if len(set(cores)) != len(cores):
        raise ValueError(f"core list {value!r} names a core twice")
    return sorted(cores)


# --------------------------------------------------------------------------- model


@dataclass(slots=True)
class NamespaceSpec:
    kind: NamespaceKind
    arg: str                      # size string for ram/null, path for file
    nsid: int | None = None       # None: the next free NSID is assigned at validation
    block_size: int = 512
    read_only: bool = False
    size: int | None = None       # bytes; filled in by validation (file: from stat); nbd/rbd:
                                  # the configured size (None = the whole export/image)
    direct: bool = False          # file: O_DIRECT (block devices, bypass the page cache)
    queue_depth: int | None = None  # async backends: requests in flight per worker (None = default)
    # Migration identity of the backend (migration/nvmeimage.py): set the same string on two
    # hosts that reach the same storage under different names; None = derived from the spec.
    fingerprint: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.kind.value}:{self.arg}"

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments for backends.base.create_backend beyond kind and arg."""
        opts: dict[str, Any] = {}
        if self.kind is NamespaceKind.FILE:
            opts["direct"] = self.direct
        if self.kind in _REMOTE_KINDS and self.size is not None:
            opts["size"] = self.size
        if self.queue_depth is not None:
            opts["depth"] = self.queue_depth
        return opts

    @classmethod
    def parse(cls, text: str, nsid: int | None = None, block_size: int = 512,
              read_only: bool = False) -> "NamespaceSpec":
        """Parse ``KIND:ARG[,OPTION...]`` (syntax only; call check_namespace for sizes and files).

        Options, recognised only at the end so a path or URI with commas still works:
        ``direct`` (file: O_DIRECT), ``ro``, ``size=SIZE`` (nbd/rbd: use only that much,
        and refuse a smaller export), ``depth=N`` (requests in flight per worker).
        """
        kind, sep, arg = text.partition(":")
        opts: dict[str, str] = {}
        while "," in arg:
            head, _, last = arg.rpartition(",")
            name, eq, val = last.partition("=")
            name = name.strip().lower()
            if (name in ("direct", "ro") and not eq) or (name in ("size", "depth") and eq and val):
                opts.setdefault(name, val)
                arg = head
            else:
                break
        kinds = ", ".join(k.value for k in NamespaceKind)
        if not sep or not arg:
            raise ValueError(f"namespace spec {text!r} must be KIND:ARG with KIND one of {kinds}")
        try:
            k = NamespaceKind(kind.strip().lower())
        except ValueError:
            raise ValueError(f"unknown namespace kind {kind!r}: use one of {kinds}") from None
        ns = cls(k, arg, nsid, block_size, read_only or "ro" in opts)
        if "direct" in opts:
            if k is not NamespaceKind.FILE:
                raise ValueError(f"namespace spec {text!r}: 'direct' is for file namespaces only")
            ns.direct = True
        if "size" in opts:
            if k not in _REMOTE_KINDS:
                raise ValueError(f"namespace spec {text!r}: 'size=' is for nbd and rbd namespaces")
            ns.size = parse_size(opts["size"])
        if "depth" in opts:
            if not opts["depth"].isdigit():
                raise ValueError(f"namespace spec {text!r}: depth must be a number")
            ns.queue_depth = int(opts["depth"])
        return ns


@dataclass(slots=True)
class ControllerSpec:
    name: str
    socket: str
    serial: str = ""                      # "" -> derived from name at validation
    model: str = "vnvmed NVMe controller"
    max_io_queues: int = 64               # I/O queue pairs offered (Number of Queues feature)
    mqes: int = 1023                      # CAP.MQES, zero-based: max entries per queue - 1
    mdts: int = 5                         # Identify MDTS: 2^mdts * 4 KiB per command, 0 = no limit
    socket_owner: str | None = None
    socket_group: str | None = None
    socket_mode: int = 0o600              # owner only by default; widen with socket_mode/socket_group
    # World bits in socket_mode let any local user attach to the guest's disks: refused
    # unless this is set (and then logged at start-up).
    allow_world_socket: bool = False
    # "trapped": BAR0 offers no mmap area, so guest doorbell writes arrive as messages and
    # wake the owning worker at once; idle workers then sleep (nearly) without a timeout.
    doorbells: DoorbellMode = DoorbellMode.MMAP
    # Guest ranges where read payloads go by DMA_WRITE so TCG sees new code (nvme/msgwindow.py).
    message_write_windows: tuple[Window, ...] = LOW_MEMORY
    # A saved controller snapshot (vnvmectl controller save) the controller resumes from
    # once its first client has mapped the guest memory the snapshot's queues live in.
    restore: str = ""
    namespaces: list[NamespaceSpec] = field(default_factory=list)


@dataclass(slots=True)
class DaemonConfig:
    run_dir: str = DEFAULT_RUN_DIR
    cores: list[int] | None = None        # None: every core in our affinity mask
    polling: Polling = Polling.ADAPTIVE
    datapath: Datapath | None = None      # None: native when it is built, else python
    poll_sleep_us: int = 1000             # longest blocking wait once idle (bounds idle latency)
    log_level: str = "info"
    controllers: list[ControllerSpec] = field(default_factory=list)
    source: str | None = None             # config file this came from (for SIGHUP reload)

    @property
    def rpc_socket(self) -> str:
        return os.path.join(self.run_dir, RPC_SOCKET_NAME)

    def controller(self, name: str) -> ControllerSpec | None:
        return next((c for c in self.controllers if c.name == name), None)


def default_run_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def default_controller(run_dir: str) -> ControllerSpec:
    ns = NamespaceSpec.parse(DEFAULT_NAMESPACE, nsid=1)
    ns.size = parse_size(ns.arg)
    return ControllerSpec(DEFAULT_CONTROLLER, os.path.join(run_dir, f"{DEFAULT_CONTROLLER}.sock"),
                          serial=_default_serial(DEFAULT_CONTROLLER), namespaces=[ns])


def _default_serial(name: str) -> str:
    return ("VNVME" + re.sub(r"[^A-Za-z0-9]", "", name).upper())[:20]


# --------------------------------------------------------------------------- schema checks

class _Where:
    """Where the input came from; finds a best-effort line for a key path in TOML text."""

    def __init__(self, source: str, text: str | None = None) -> None:
        self.source = source
        self.text = text

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason, self._line_of(key))

    def _line_of(self, key: str) -> int | None:
        if not self.text:
            return None
        # Walk "[[controllers]]" / "[[controllers.namespaces]]" headers counting
        # array entries, then find "leaf =" inside the addressed table.  Inline
        # tables and dotted keys defeat this; we then report no line at all.
        parts = re.findall(r"([A-Za-z_]+)(?:\[(\d+)\])?", key)
        tables = [(n, int(i)) for n, i in parts if i != ""]
        leaf = parts[-1][0] if parts and parts[-1][1] == "" else None
        paths = [".".join(n for n, _ in tables[: d + 1]) for d in range(len(tables))]
        counts: dict[str, int] = {}
        inside = not tables          # top-level keys live before the first header
        for lineno, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            h = re.match(r"^\[\[?\s*([A-Za-z_.]+)\s*\]", line)
            if h:
                name = h.group(1)
                counts = {k: v for k, v in counts.items() if not k.startswith(name + ".")}
                if line.startswith("[["):
                    counts[name] = counts.get(name, -1) + 1
                inside = bool(tables) and name == paths[-1] and all(
                    counts.get(p, -1) == i for p, (_, i) in zip(paths, tables))
                if inside and leaf is None:
                    return lineno
                continue
            if inside and leaf and re.match(rf"^{re.escape(leaf)}\s*=", line):
                return lineno
        return None


def _check_type(where: _Where, key: str, value: Any, kinds: tuple[type, ...]) -> None:
    ok = any((type(value) is bool) if k is bool else
             (isinstance(value, k) and not isinstance(value, bool)) for k in kinds)
    if not ok:
        names = " or ".join({str: "string", int: "integer", bool: "boolean", list: "array",
                             dict: "table"}.get(k, k.__name__) for k in kinds)
        raise where.error(key, f"expected {names}, got {type(value).__name__} {value!r}")


def _check_keys(where: _Where, prefix: str, table: dict[str, Any],
                schema: dict[str, tuple[type, ...]]) -> None:
    for k, v in table.items():
        path = f"{prefix}.{k}" if prefix else k
        if k not in schema:
            raise where.error(path, f"unknown key; valid keys here: {', '.join(sorted(schema))}")
        _check_type(where, path, v, schema[k])


def _int_in(where: _Where, key: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise where.error(key, f"{value} is out of range {lo}..{hi}")
    return value


_TOP_SCHEMA: dict[str, tuple[type, ...]] = {
    "run_dir": (str,), "cores": (str, list), "polling": (str,), "datapath": (str,),
    "poll_idle_us": (int,),   # removed: known only to say so (_build_daemon)
    "poll_sleep_us": (int,), "log_level": (str,), "controllers": (list,),
}
_CTRL_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,), "socket": (str,), "serial": (str,), "model": (str,), "max_io_queues": (int,),
    "mqes": (int,), "mdts": (int,), "socket_owner": (str,), "socket_group": (str,),
    "socket_mode": (int, str), "allow_world_socket": (bool,), "doorbells": (str,),
    "message_write_windows": (list, str), "namespaces": (list,), "restore": (str,),
}
_NS_SCHEMA: dict[str, tuple[type, ...]] = {
    "kind": (str,), "size": (int, str), "path": (str,), "nsid": (int,), "block_size": (int,),
    "read_only": (bool,), "direct": (bool,), "uri": (str,), "image": (str,), "queue_depth": (int,),
    "fingerprint": (str,),
}
CONTROLLER_OPTIONS = tuple(k for k in _CTRL_SCHEMA if k not in ("name", "socket", "namespaces"))


def check_namespace(ns: NamespaceSpec, where: _Where | None = None, key: str = "namespace") -> NamespaceSpec:
    """Validate sizes, block size and backing file of one namespace; fills ``ns.size``.

    Public so the supervisor can run ``namespace.add`` through the same checks;
    raises ConfigError (source ``<request>`` unless told otherwise).
    """
    w = where or _Where("<request>")
    if ns.block_size not in BLOCK_SIZES:
        raise w.error(f"{key}.block_size", f"{ns.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if ns.nsid is not None:
        _int_in(w, f"{key}.nsid", ns.nsid, 1, MAX_NSID)
    if ns.queue_depth is not None:
        _int_in(w, f"{key}.queue_depth", ns.queue_depth, 1, MAX_QUEUE_DEPTH)
    if ns.direct and ns.kind is not NamespaceKind.FILE:
        raise w.error(f"{key}.direct", "only file namespaces have O_DIRECT")
    if ns.kind in _REMOTE_KINDS:
        return _check_remote(ns, w, key)
    if ns.kind in (NamespaceKind.RAM, NamespaceKind.NULL):
        try:
            size = parse_size(ns.arg)
        except ValueError as e:
            raise w.error(f"{key}.size", str(e)) from None
        if size % ns.block_size:
            raise w.error(f"{key}.size", f"{size} bytes is not a multiple of block_size {ns.block_size}")
    else:
        try:
            st = os.stat(ns.arg)
        except FileNotFoundError:
            raise w.error(f"{key}.path", f"backing file {ns.arg!r} does not exist") from None
        except OSError as e:
            raise w.error(f"{key}.path", f"cannot stat {ns.arg!r}: {e.strerror}") from None
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            try:   # a block device reports size 0 in stat; seek to the end instead
                fd = os.open(ns.arg, os.O_RDONLY)
                try:
                    size = os.lseek(fd, 0, os.SEEK_END)
                finally:
                    os.close(fd)
            except OSError as e:
                raise w.error(f"{key}.path", f"cannot open block device {ns.arg!r}: {e.strerror}") from None
        else:
            raise w.error(f"{key}.path", f"{ns.arg!r} is not a regular file or block device")
        if size < ns.block_size:
            raise w.error(f"{key}.path", f"backing file {ns.arg!r} is too small: {size} bytes, "
                                         f"need at least one {ns.block_size}-byte block")
        if not ns.read_only and not os.access(ns.arg, os.W_OK):
            raise w.error(f"{key}.path", f"backing file {ns.arg!r} is not writable: fix its "
                                         "permissions or set read_only = true")
        size -= size % ns.block_size   # a partial last block is not addressable
    if size // ns.block_size >= 1 << 64:   # NSZE is a 64-bit block count
        raise w.error(f"{key}.size", "too large: more than 2^64 blocks")
    ns.size = size
    return ns


def _check_remote(ns: NamespaceSpec, w: _Where, key: str) -> NamespaceSpec:
    """nbd/rbd: syntax only.  Reachability, credentials and the export's size are checked
    when the backend is created (start-up or namespace.add), with a one-line error."""
    if ns.kind is NamespaceKind.NBD and not _NBD_URI_RE.match(ns.arg):
        raise w.error(f"{key}.uri", f"{ns.arg!r} is not an NBD URI: use nbd://HOST[:PORT]/EXPORT "
                                    "or nbd+unix:///EXPORT?socket=PATH")
    if ns.kind is NamespaceKind.RBD and not _RBD_RE.match(ns.arg):
        raise w.error(f"{key}.image", f"{ns.arg!r} is not an RBD image: use POOL/IMAGE"
                                      "[?conf=PATH&id=USER&keyring=PATH]")
    if ns.size is not None:
        if ns.size % ns.block_size:
            raise w.error(f"{key}.size", f"{ns.size} bytes is not a multiple of block_size {ns.block_size}")
        if ns.size // ns.block_size >= 1 << 64:
            raise w.error(f"{key}.size", "too large: more than 2^64 blocks")
    return ns


def _build_namespace(where: _Where, key: str, t: dict[str, Any]) -> NamespaceSpec:
    _check_keys(where, key, t, _NS_SCHEMA)
    if "kind" not in t:
        raise where.error(f"{key}.kind", "missing; use one of " + ", ".join(k.value for k in NamespaceKind))
    try:
        kind = NamespaceKind(t["kind"].lower())
    except ValueError:
        raise where.error(f"{key}.kind", f"unknown kind {t['kind']!r}: use one of "
                          + ", ".join(k.value for k in NamespaceKind)) from None
    need = _ARG_KEY[kind]
    if need not in t:
        raise where.error(f"{key}.{need}", f"missing; a {kind.value} namespace needs '{need}'")
    allowed = {need, "size"} if kind in _REMOTE_KINDS else {need}
    for other in set(_ARG_KEY.values()) - allowed:
        if other in t:
            raise where.error(f"{key}.{other}", f"not valid for a {kind.value} namespace (use '{need}')")
    arg = str(t[need])
    ns = NamespaceSpec(kind, arg, t.get("nsid"), t.get("block_size", 512), t.get("read_only", False))
    if "direct" in t:
        if kind is not NamespaceKind.FILE:
            raise where.error(f"{key}.direct", f"not valid for a {kind.value} namespace (file only)")
        ns.direct = t["direct"]
    if kind in _REMOTE_KINDS and "size" in t:
        try:
            ns.size = parse_size(t["size"])
        except ValueError as e:
            raise where.error(f"{key}.size", str(e)) from None
    ns.queue_depth = t.get("queue_depth")
    if "fingerprint" in t:
        if not t["fingerprint"] or len(t["fingerprint"]) > 256:
            raise where.error(f"{key}.fingerprint", "must be 1..256 characters")
        ns.fingerprint = t["fingerprint"]
    return check_namespace(ns, where, key)


def _socket_mode(where: _Where, key: str, v: int | str) -> int:
    if isinstance(v, str):
        if not re.fullmatch(r"0?o?[0-7]{3,4}", v):
            raise where.error(key, f"bad mode {v!r}: use an octal string like \"0660\"")
        v = int(v.replace("o", ""), 8)
    return _int_in(where, key, v, 0, 0o777)


def _doorbell_mode(where: _Where, key: str, v: str) -> DoorbellMode:
    try:
        return DoorbellMode(v.strip().lower())
    except ValueError:
        raise where.error(key, f"{v!r}: use " + " or ".join(repr(m.value) for m in DoorbellMode)) from None


_ADDR_RE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)


def _address(text: str) -> int:
    m = _ADDR_RE.match(text)
    if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"bad address {text.strip()!r}: use bytes, 0x hex or a K/M/G suffix (e.g. 1M)")
    return int(m.group(1), 0) << _SIZE_SHIFT[m.group(2).lower()]


def parse_windows(value: str | Sequence[str]) -> tuple[Window, ...]:
    """``"0-1M,0xe0000000-0xe0100000"`` (or a list of ``START-END``) -> sorted windows.

    END is exclusive; ``"none"``, ``""`` or ``[]`` means no window.  ValueError says why.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        items = []
    windows = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"window {item!r} must be a string \"START-END\"")
        start, dash, end = item.partition("-")
        if not dash:
            raise ValueError(f"window {item.strip()!r} must be START-END (END exclusive), e.g. 0-1M")
        windows.append((_address(start), _address(end)))
    return normalize_windows(windows)


def _windows(where: _Where, key: str, v: str | Sequence[str]) -> tuple[Window, ...]:
    try:
        return parse_windows(v)
    except ValueError as e:
        raise where.error(key, str(e)) from None


def _ascii_field(where: _Where, key: str, v: str, limit: int) -> str:
    # Identify SN/MN are space-padded ASCII fields of fixed width (NVMe Base, Figure 312).
    if not v or len(v) > limit or not all(0x20 <= ord(c) < 0x7F for c in v):
        raise where.error(key, f"must be 1..{limit} printable ASCII characters")
    return v


def _socket_path(where: _Where, key: str, sock: str, base: str) -> str:
    if not sock or "\0" in sock:
        raise where.error(key, "empty or contains NUL")
    sock = os.path.normpath(os.path.join(base, sock))   # relative -> inside base (the run dir)
    if len(os.fsencode(sock)) > 107:   # sockaddr_un.sun_path is 108 bytes incl. NUL
        raise where.error(key, f"path {sock!r} is longer than the 107 bytes a UNIX socket allows")
    return sock


def _build_controller(where: _Where, key: str, t: dict[str, Any], run_dir: str,
                      allow_no_namespaces: bool = True) -> ControllerSpec:
    _check_keys(where, key, t, _CTRL_SCHEMA)
    for req in ("name", "socket"):
        if req not in t:
            raise where.error(f"{key}.{req}", "missing")
    name = t["name"]
    if not _NAME_RE.match(name):
        raise where.error(f"{key}.name", f"bad name {name!r}: letters, digits, '_', '.', '-' (max 64), "
                                         "starting with a letter or digit")
    c = ControllerSpec(name, _socket_path(where, f"{key}.socket", t["socket"], run_dir))
    c.serial = _ascii_field(where, f"{key}.serial", t.get("serial", _default_serial(name)), 20)
    c.model = _ascii_field(where, f"{key}.model", t.get("model", c.model), 40)
    c.max_io_queues = _int_in(where, f"{key}.max_io_queues", t.get("max_io_queues", c.max_io_queues), 1, 1024)
    c.mqes = _int_in(where, f"{key}.mqes", t.get("mqes", c.mqes), 1, 0xFFFF)
    c.mdts = _int_in(where, f"{key}.mdts", t.get("mdts", c.mdts), 0, 10)
    c.socket_owner = t.get("socket_owner")
    c.socket_group = t.get("socket_group")
    c.socket_mode = _socket_mode(where, f"{key}.socket_mode", t.get("socket_mode", c.socket_mode))
    c.allow_world_socket = t.get("allow_world_socket", False)
    if c.socket_mode & 0o007 and not c.allow_world_socket:
        raise where.error(f"{key}.socket_mode",
                          f"{c.socket_mode:04o} lets any local user attach to this controller's disks; "
                          "use 0660 with socket_group, or set allow_world_socket = true to force it")
    c.doorbells = _doorbell_mode(where, f"{key}.doorbells", t.get("doorbells", c.doorbells.value))
    if "message_write_windows" in t:
        c.message_write_windows = _windows(where, f"{key}.message_write_windows", t["message_write_windows"])
    if "restore" in t:
        # A relative path is relative to the configuration file.
        base = (os.path.dirname(os.path.abspath(where.source)) if os.path.isfile(where.source)
                else os.getcwd())
        c.restore = _snapshot_file(where, f"{key}.restore", t["restore"], base)
    for i, nt in enumerate(t.get("namespaces", [])):
        _check_type(where, f"{key}.namespaces[{i}]", nt, (dict,))
        c.namespaces.append(_build_namespace(where, f"{key}.namespaces[{i}]", nt))
    assign_nsids(c, where, key)
    return c


SNAPSHOT_MAGIC = b"VNVMESNP"     # migration/snapshot.py (config stays import-free)


def _snapshot_file(where: _Where, key: str, path: str, base: str) -> str:
    """A saved controller snapshot: exists, readable, starts like one (the front-end checks
    the rest - format version, identity - when it loads it)."""
    path = os.path.join(base, os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            head = f.read(len(SNAPSHOT_MAGIC))
    except OSError as e:
        raise where.error(key, f"cannot read {path}: {e.strerror}") from None
    if head != SNAPSHOT_MAGIC:
        raise where.error(key, f"{path} is not a vnvmed controller snapshot (vnvmectl controller save)")
    return path


def assign_nsids(c: ControllerSpec, where: _Where | None = None, key: str = "controller") -> None:
    """Refuse duplicate NSIDs and give NSID-less namespaces the lowest free ones."""
    w = where or _Where("<request>")
    seen: dict[int, int] = {}
    for i, ns in enumerate(c.namespaces):
        if ns.nsid is None:
            continue
        if ns.nsid in seen:
            raise w.error(f"{key}.namespaces[{i}].nsid",
                          f"duplicate NSID {ns.nsid} (also namespaces[{seen[ns.nsid]}]) in controller {c.name!r}")
        seen[ns.nsid] = i
    free = (n for n in range(1, MAX_NSID + 1) if n not in seen)
    for i, ns in enumerate(c.namespaces):
        if ns.nsid is None:
            ns.nsid = next(free, None)
            if ns.nsid is None:
                raise w.error(f"{key}.namespaces[{i}]", f"more than {MAX_NSID} namespaces")


def controller_from_options(name: str, socket: str, opts: dict[str, Any], run_dir: str,
                            source: str = "<request>") -> ControllerSpec:
    """Build a ControllerSpec for ``controller.add`` through the TOML checks (key path ``params``)."""
    return _build_controller(_Where(source), "params", {"name": name, "socket": socket, **opts}, run_dir)


def _check_unique(where: _Where, cfg: DaemonConfig) -> None:
    names: dict[str, int] = {}
    socks: dict[str, int] = {cfg.rpc_socket: -1}
    for i, c in enumerate(cfg.controllers):
        if c.name in names:
            raise where.error(f"controllers[{i}].name", f"duplicate controller name {c.name!r} "
                                                        f"(also controllers[{names[c.name]}])")
        names[c.name] = i
        if c.socket in socks:
            other = "the management socket" if socks[c.socket] < 0 else f"controllers[{socks[c.socket]}]"
            raise where.error(f"controllers[{i}].socket", f"socket {c.socket!r} is already used by {other}")
        socks[c.socket] = i


def _build_daemon(where: _Where, t: dict[str, Any], environ: dict[str, str] | None) -> DaemonConfig:
    _check_keys(where, "", t, _TOP_SCHEMA)
    cfg = DaemonConfig(run_dir=t.get("run_dir") or default_run_dir(environ))
    if not os.path.isabs(cfg.run_dir):
        raise where.error("run_dir", f"{cfg.run_dir!r} must be an absolute path")
    if "cores" in t:
        try:
            cfg.cores = parse_cores(t["cores"])
        except ValueError as e:
            raise where.error("cores", str(e)) from None
    if "polling" in t:
        try:
            cfg.polling = Polling(t["polling"].lower())
        except ValueError:
            raise where.error("polling", f"{t['polling']!r}: use 'adaptive' or 'busy'") from None
    if "poll_idle_us" in t:
        raise where.error("poll_idle_us", "no longer supported (it was never used: a worker keeps "
                          "polling 200 empty rounds after its last command); remove the line")
    if "datapath" in t:
        try:
            cfg.datapath = Datapath(t["datapath"].lower())
        except ValueError:
            raise where.error("datapath", f"{t['datapath']!r}: use 'python' or 'native'") from None
    cfg.poll_sleep_us = _int_in(where, "poll_sleep_us", t.get("poll_sleep_us", cfg.poll_sleep_us), 1, 1_000_000)
    level = t.get("log_level", cfg.log_level).lower()
    if level not in LOG_LEVELS:
        raise where.error("log_level", f"{t['log_level']!r}: use one of {', '.join(LOG_LEVELS)}")
    cfg.log_level = level
    for i, ct in enumerate(t.get("controllers", [])):
        _check_type(where, f"controllers[{i}]", ct, (dict,))
        cfg.controllers.append(_build_controller(where, f"controllers[{i}]", ct, cfg.run_dir))
    _check_unique(where, cfg)
    return cfg


# --------------------------------------------------------------------------- loaders


def load_toml(path: str, environ: dict[str, str] | None = None) -> DaemonConfig:
    """Read and validate a config file; every problem is a ConfigError naming file, key, line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
        table = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise ConfigError(path, "", f"TOML syntax error: {e}", int(m.group(1)) if m else None) from None
    cfg = _build_daemon(_Where(path, text), table, environ)
    cfg.source = os.path.abspath(path)
    return cfg


def with_controller(cfg: DaemonConfig, c: ControllerSpec) -> DaemonConfig:
    """A copy of cfg with c added, checked for duplicate name/socket (for controller.add)."""
    new = replace(cfg, controllers=[*cfg.controllers, c])
    _check_unique(_Where("<request>"), new)
    return new

