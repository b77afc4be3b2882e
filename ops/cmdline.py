"""The daemon's command line: `bin/vnvmed` flags -> a validated DaemonConfig.

Flags win over the config file (--config); the rules and messages are ops/config.py's
(the same `_Where` errors: one line, exit 2 at start-up).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from ops.config import (DEFAULT_CONTROLLER, DEFAULT_NAMESPACE, DEFAULT_RUN_DIR, LOG_LEVELS,
                        RUN_DIR_ENV, ControllerSpec, DaemonConfig, Datapath, NamespaceSpec, Polling, _build_controller,
                        _build_daemon, _check_unique, _doorbell_mode, _snapshot_file, _socket_path,
                        _Where, _windows, assign_nsids, check_namespace, default_controller,
                        load_toml, parse_cores)


def _availability_epilog() -> str:
    # The one place ops/config looks at backends: what this Python can serve (help text only).
    from backends.registry import availability_lines
    return "\n\nbackends on this host (" + sys.executable + "):\n" + "\n".join(
        "  " + line for line in availability_lines())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnvmed", description="Emulated NVMe controllers for VMs over vfio-user.",
        epilog="KIND:ARG is one of\n"
               "  ram:SIZE, null:SIZE           SIZE like 4096, 64M, 1G\n"
               "  file:PATH[,direct]            regular file or block device (direct: O_DIRECT)\n"
               "  nbd:URI[,size=SIZE]           nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH\n"
               "  rbd:POOL/IMAGE[?conf=PATH&id=USER&keyring=PATH][,size=SIZE]\n"
               "',depth=N' bounds one namespace's requests in flight per worker, ',ro' makes it\n"
               "read-only.  Flags override the config file."
               + _availability_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config file (see contrib/vnvmed.toml)")
    p.add_argument("--cores", metavar="LIST", help="worker cores, e.g. 0-3 or 1,3")
    p.add_argument("--controller", metavar="NAME=SOCKET", action="append", default=[],
                   help="add a controller (or move an existing one's socket); repeatable")
    p.add_argument("--namespace", metavar="NAME=KIND:ARG", action="append", default=[],
                   help="add a namespace to controller NAME (KIND:ARG[,direct|,size=SIZE|,depth=N]); "
                        "repeatable")
    p.add_argument("--run-dir", metavar="DIR", help=f"runtime dir (default ${RUN_DIR_ENV} or {DEFAULT_RUN_DIR})")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower)
    p.add_argument("--polling", choices=[x.value for x in Polling], type=str.lower)
    p.add_argument("--datapath", choices=[x.value for x in Datapath], type=str.lower,
                   help="worker data path: native (C loop for common I/O; the default when built) "
                        "or python")
    p.add_argument("--doorbells", metavar="NAME=MODE", action="append", default=[],
                   help="doorbell mode of controller NAME: mmap (default) or trapped; repeatable")
    p.add_argument("--restore", metavar="NAME=FILE", action="append", default=[],
                   help="controller NAME resumes from a saved snapshot (vnvmectl controller save) "
                        "once its client has mapped guest memory: offline migration; repeatable")
    p.add_argument("--message-write-windows", metavar="NAME=RANGES", action="append", default=[],
                   help="guest ranges START-END[,...] (or none) where controller NAME writes read data "
                        "with DMA_WRITE messages, so TCG sees code it loads (default 0-1M); repeatable")
    return p


def from_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> DaemonConfig:
    """Command line (+ optional --config file) -> validated DaemonConfig. Flags win over the file.

    argparse usage errors exit(2) as usual; semantic errors are ConfigError.
    A controller named only on the command line that gets no --namespace is
    given the default ``ram:1G`` namespace, so ``--controller c=/tmp/c.sock``
    alone serves a disk.  With no controller anywhere, ``--namespace nvme0=...``
    adds to the embedded default controller (which keeps its ``ram:1G`` as NSID 1).
    """
    a = build_parser().parse_args(argv)
    where = _Where("<command line>")
    cfg = load_toml(a.config, environ) if a.config else _build_daemon(where, {}, environ)
    if a.run_dir:
        if not os.path.isabs(a.run_dir):
            a.run_dir = os.path.abspath(a.run_dir)
        old = cfg.run_dir
        cfg.run_dir = a.run_dir
        for c in cfg.controllers:   # sockets placed relative to the old run dir follow it
            if os.path.dirname(c.socket) == old:
                c.socket = os.path.join(a.run_dir, os.path.basename(c.socket))
    if a.cores is not None:      # --cores '' is an empty list, refused, not "all cores"
        try:
            cfg.cores = parse_cores(a.cores)
        except ValueError as e:
            raise where.error("--cores", str(e)) from None
    if a.log_level:
        cfg.log_level = a.log_level
    if a.polling:
        cfg.polling = Polling(a.polling)
    if a.datapath:
        cfg.datapath = Datapath(a.datapath)
    cli_ctrls: list[ControllerSpec] = []
    for i, item in enumerate(a.controller):
        name, eq, sock = item.partition("=")
        if not eq:
            raise where.error(f"--controller[{i}]", f"{item!r} must be NAME=SOCKET")
        existing = cfg.controller(name)
        if existing is not None:
            existing.socket = _socket_path(where, f"--controller[{i}]", sock, os.getcwd())
            continue
        c = _build_controller(where, f"--controller[{i}]", {"name": name, "socket": os.path.abspath(sock)},
                              cfg.run_dir)
        cfg.controllers.append(c)
        cli_ctrls.append(c)
    for i, item in enumerate(a.namespace):
        key = f"--namespace[{i}]"
        name, eq, spec = item.partition("=")
        if not eq:
            raise where.error(key, f"{item!r} must be NAME=KIND:ARG")
        target = cfg.controller(name)
        if target is None and name == DEFAULT_CONTROLLER and not cfg.controllers:
            # No controller anywhere: the namespace is added to the embedded default.
            target = default_controller(cfg.run_dir)
            cfg.controllers.append(target)
        if target is None:
            raise where.error(key, f"no controller named {name!r}; add it with --controller {name}=SOCKET")
        try:
            ns = NamespaceSpec.parse(spec)
        except ValueError as e:
            raise where.error(f"{key}.kind", str(e)) from None
        target.namespaces.append(check_namespace(ns, where, key))
        assign_nsids(target, where, name)
    # The per-controller options NAME=VALUE: (argparse dest, what VALUE is, its parser).
    per_controller: tuple[tuple[str, str, Callable[[_Where, str, str], Any]], ...] = (
        ("doorbells", "MODE", _doorbell_mode),
        ("restore", "FILE", lambda w, k, v: _snapshot_file(w, k, v, os.getcwd())),
        ("message_write_windows", "RANGES", _windows),
    )
    for dest, what, parse in per_controller:
        for i, item in enumerate(getattr(a, dest)):
            key = f"--{dest.replace('_', '-')}[{i}]"
            name, eq, value = item.partition("=")
            if not eq:
                raise where.error(key, f"{item!r} must be NAME={what}")
            target = cfg.controller(name)
            if target is None:
                raise where.error(key, f"no controller named {name!r}; add it with --controller {name}=SOCKET")
            setattr(target, dest, parse(where, key, value))
    for c in cli_ctrls:
        if not c.namespaces:
            c.namespaces.append(check_namespace(NamespaceSpec.parse(DEFAULT_NAMESPACE, nsid=1), where))
    if not cfg.controllers:
        cfg.controllers.append(default_controller(cfg.run_dir))
    _check_unique(where, cfg)
    return cfg
