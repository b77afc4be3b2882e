"""What an NVMe controller's snapshot holds, and the checks a destination makes (pure).

Sections of a full snapshot (migration.snapshot blobs; all REQUIRED):

    identity    controller config (everything Identify/CAP/PCI derive from), BAR0 size,
                namespaces: nsid, block size, blocks, read-only, backend fingerprint
    pci         the 4 KiB config space image
    controller  nvme.controller.Controller.snapshot(): registers incl. CC/AQA/ASQ/ACQ/
                INTMS and CSTS state, admin and I/O SQ/CQ records (base, size, head,
                tail, phase, vector, IEN, SQ->CQ), features incl. coalescing, AER state,
                error log, Changed NS list, SMART counters, shadow doorbell/EventIdx pages
    doorbells   the doorbell page as the guest last wrote it: [[word, value], ...] for
                the non-zero words (word 2y = SQ y tail, 2y+1 = CQ y head)

The pre-copy blob carries `identity` alone: a destination that cannot take this
controller refuses it while the source is still running.

Identity rule: a destination takes a snapshot only if its own controller is configured
the same (every ControllerConfig field except the firmware revision, which may change
with an upgrade) and serves the same namespaces: same NSIDs, block sizes, capacities,
read-only flags and backend fingerprints.  The default fingerprint names the storage
(`file:<real path>`, `ram:<shm name>`, `null`), so a RAM namespace, whose data cannot
follow, is refused; an operator whose two hosts mount the same storage under
different paths sets the same `fingerprint` on both sides.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from .snapshot import SnapshotError

SECTIONS = ("identity", "pci", "controller", "doorbells")
IGNORED_CFG = frozenset({"firmware"})


def fingerprint(backend: Mapping[str, Any], override: str | None = None) -> str:
    """The backend's identity as the operator would recognise it (see the module doc)."""
    if override:
        return str(override)
    kind = str(backend.get("kind", "?"))
    if kind == "file":
        return "file:" + os.path.realpath(str(backend.get("path", "")))
    if kind == "ram":
        return "ram:" + str(backend.get("shm", ""))
    if kind == "null":
        return "null"
    return kind + ":" + ",".join(f"{k}={v}" for k, v in sorted(backend.items()) if k != "kind")


def identity(cfg: Mapping[str, Any], bar0_size: int, namespaces: Iterable[Mapping[str, Any]]) -> dict:
    return {"cfg": dict(cfg), "bar0_size": bar0_size,
            "namespaces": sorted((dict(n) for n in namespaces), key=lambda n: n["nsid"])}


def compare_identity(theirs: Any, mine: Mapping[str, Any]) -> list[str]:
    """Human-readable differences that make the snapshot unusable here ([] = compatible)."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("cfg"), dict):
        return ["identity section is malformed"]
    out: list[str] = []
    tc, mc = theirs["cfg"], mine["cfg"]
    for k in sorted(set(tc) | set(mc)):
        if k in IGNORED_CFG:
            continue
        if tc.get(k) != mc.get(k):
            out.append(f"controller {k}: snapshot {tc.get(k)!r}, here {mc.get(k)!r}")
    if theirs.get("bar0_size") != mine["bar0_size"]:
        out.append(f"BAR0 size: snapshot {theirs.get('bar0_size')!r}, here {mine['bar0_size']!r}")
    tns = theirs.get("namespaces")
    if not isinstance(tns, list) or not all(isinstance(n, dict) and "nsid" in n for n in tns):
        return out + ["namespace list is malformed"]
    tmap = {n["nsid"]: n for n in tns}
    mmap = {n["nsid"]: n for n in mine["namespaces"]}
    for nsid in sorted(set(tmap) | set(mmap), key=str):
        t, m = tmap.get(nsid), mmap.get(nsid)
        if t is None or m is None:
            out.append(f"namespace {nsid}: {'not in the snapshot' if t is None else 'not here'}")
            continue
        for k in ("block_size", "blocks", "read_only", "fingerprint"):
            if t.get(k) != m.get(k):
                out.append(f"namespace {nsid} {k}: snapshot {t.get(k)!r}, here {m.get(k)!r}")
    return out


def check_identity(theirs: Any, mine: Mapping[str, Any]) -> None:
    diffs = compare_identity(theirs, mine)
    if diffs:
        raise SnapshotError("snapshot is of a controller this one cannot become: " + "; ".join(diffs))


_ZERO_KIB = bytes(1024)


def doorbell_words(words: memoryview) -> list[list[int]]:
    """The non-zero words of the doorbell page, from one copy of it (a single aligned load
    per word).  Zero KiBs, then zero 64-byte lines, are skipped by comparing bytes: a
    word-by-word Python scan of the 12 KiB page cost ~0.5 ms of the blackout, twice
    (save, and the restore clearing the old words)."""
    raw = words.tobytes()
    w = memoryview(raw).cast("I")
    n = len(raw)
    out = []
    for a in range(0, n, 1024):
        end = min(a + 1024, n)
        if raw[a:end] == _ZERO_KIB[:end - a]:
            continue
        for b in range(a, end, 64):
            e = min(b + 64, end)
            if raw[b:e] == _ZERO_KIB[:e - b]:
                continue
            for i in range(b >> 2, e >> 2):
                v = w[i]
                if v:
                    out.append([i, v])
    return out


def check_doorbells(entries: Any, nwords: int) -> list[tuple[int, int]]:
    if not isinstance(entries, list):
        raise SnapshotError("doorbells section is not a list")
    out = []
    for e in entries:
        if (not isinstance(e, list) or len(e) != 2 or not all(type(x) is int for x in e)
                or not 0 <= e[0] < nwords or not 0 <= e[1] <= 0xFFFFFFFF):
            raise SnapshotError(f"doorbells entry {e!r} is malformed")
        out.append((e[0], e[1]))
    return out


def _int_fields(d: Any, names: Iterable[str], what: str) -> None:
    if not isinstance(d, dict):
        raise SnapshotError(f"{what} is not a map")
    for n in names:
        if type(d.get(n)) is not int or d[n] < 0:
            raise SnapshotError(f"{what}.{n} missing or not a non-negative integer")


def check_controller(d: Any, max_io_queues: int, mqes: int) -> None:
    """Structural checks before restoring (a CRC-valid but hostile stream included)."""
    if not isinstance(d, dict):
        raise SnapshotError("controller section is not a map")
    for key in ("regs", "queues", "features", "aer", "errlog", "stats", "shadow", "changed_ns"):
        if not isinstance(d.get(key), dict):
            raise SnapshotError(f"controller.{key} missing or not a map")
    _int_fields(d["regs"], ("cc", "aqa", "asq", "acq", "intms"), "controller.regs")
    q = d["queues"]
    if not isinstance(q.get("sqs"), list) or not isinstance(q.get("cqs"), list):
        raise SnapshotError("controller.queues malformed")
    cqids = set()
    for c in q["cqs"]:
        _int_fields(c, ("cqid", "base", "size", "iv", "tail", "phase", "head"), "controller CQ")
        if not 1 <= c["cqid"] <= max_io_queues or not 2 <= c["size"] <= mqes:
            raise SnapshotError(f"CQ {c['cqid']} (size {c['size']}) outside this controller's limits")
        if not (c["tail"] < c["size"] and c["head"] < c["size"] and c["phase"] in (0, 1)):
            raise SnapshotError(f"CQ {c['cqid']} position out of range")
        cqids.add(c["cqid"])
    for s in q["sqs"]:
        _int_fields(s, ("sqid", "cqid", "base", "size", "head", "tail"), "controller SQ")
        if not 1 <= s["sqid"] <= max_io_queues or not 2 <= s["size"] <= mqes:
            raise SnapshotError(f"SQ {s['sqid']} (size {s['size']}) outside this controller's limits")
        if s["cqid"] not in cqids or s["head"] >= s["size"] or s["tail"] >= s["size"]:
            raise SnapshotError(f"SQ {s['sqid']}: bad CQ or position")
    admin = d.get("admin")
    if admin is not None:
        if not isinstance(admin, dict):
            raise SnapshotError("controller.admin malformed")
        _int_fields(admin.get("sq"), ("base", "size", "head", "tail"), "admin SQ")
        _int_fields(admin.get("cq"), ("base", "size", "head", "tail", "phase"), "admin CQ")
    aer = d["aer"]
    for k in ("outstanding", "queued", "masked"):
        if not isinstance(aer.get(k), list):
            raise SnapshotError(f"controller.aer.{k} malformed")


def queue_ranges(d: Mapping[str, Any]) -> list[tuple[str, int, int, bool]]:
    """(what, guest address, bytes, device writes it) of every ring the snapshot names."""
    out = []
    admin = d.get("admin")
    if admin is not None:
        out.append(("admin SQ", admin["sq"]["base"], admin["sq"]["size"] * 64, False))
        out.append(("admin CQ", admin["cq"]["base"], admin["cq"]["size"] * 16, True))
    for s in d["queues"]["sqs"]:
        out.append((f"SQ {s['sqid']}", s["base"], s["size"] * 64, False))
    for c in d["queues"]["cqs"]:
        out.append((f"CQ {c['cqid']}", c["base"], c["size"] * 16, True))
    return out
