"""Real-guest test harness: provision QEMU + images, boot guests, run vnvmed.

Theory of operation
    ``provision()`` runs ``tests/qemu/provision`` (idempotent and cached on disk,
    so a cached run costs well under a second; a failure gets one retry, for a
    mirror hiccup) at most once per process and returns the paths it printed, or
    raises ProvisionError with the script's reason.  Tests never call it at import
    time: tests/qemu/conftest.py provisions once, after collection and before the
    first test, only when a selected test carries the ``qemu`` marker (so
    ``--collect-only`` and ``-m 'not qemu'`` provision nothing), and hands the
    result out as the session fixture ``guest_env``.  That fixture skips with the
    reason, or fails when ``VNVMED_QEMU_REQUIRED=1`` (scripts/test, .ci/run): CI
    must not go green with every real-guest test skipped.

    ``start_guest()`` starts QEMU (TCG only: KVM cannot run Linux guests on
    these machines) with guest RAM in a shared memfd, as the vfio-user client
    needs, the serial console in ``console.log`` inside a work directory that
    is kept, and every vfio-user socket as a JSON ``-device`` (the dotted form
    is rejected by QEMU).  The guest's init (tests/qemu/guest/init) reads
    ``vnv.KEY=VALUE`` kernel arguments, prints ``VNV-...`` lines and powers
    off, so QEMU exits on its own; the harness only bounds it with a timeout
    and kills it by its own PID.  ``GuestResult`` parses the console and its
    ``fail()``/``expect()`` put the console tail into assertion messages.

    ``start_vnvmed()`` runs ``bin/vnvmed`` from this checkout through
    ``tests.daemon.Daemon`` (``VNVMED_RUN_DIR`` set, ready once it logs
    "vnvmed ready", stopped with SIGTERM, SIGKILL after a grace period, by PID).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence


from tests.daemon import Daemon

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROVISION = HERE / "provision"

# Cold provisioning (debootstrap + apt + image build) took ~75 s here; leave
# room for a slow mirror.
PROVISION_TIMEOUT = 900.0
CONSOLE_TAIL_LINES = 60
# Console text after which a guest can only hang (SeaBIOS retries for a minute).
STOP_ON = ("No bootable device", "Kernel panic - not syncing")
_VNV_RE = re.compile(r"VNV-[A-Z0-9-]+(?: .*)?$")


# --------------------------------------------------------------- provisioning
@dataclass(frozen=True, slots=True)
class GuestEnv:
    """Paths printed by tests/qemu/provision."""

    qemu: str
    qemu_version: str
    kernel: str
    kernel_release: str
    initrd: str
    boot_initrd: str
    bootdisk: str
    mbrdisk: str          # SeaBIOS: syslinux MBR + active FAT partition (tests/qemu/mkdisk)
    gptdisk: str          # SeaBIOS: syslinux gptmbr + legacy-bootable GPT partition
    uefidisk: str         # OVMF: EFI system partition with \EFI\BOOT\BOOTX64.EFI (a UKI)
    ovmf_code: str
    ovmf_vars: str


class ProvisionError(RuntimeError):
    """QEMU or the guest images could not be provisioned (reason in str())."""


def _run_provision() -> GuestEnv | str:
    """Run the script once; a failure is returned as its reason."""
    if sys.platform != "linux":
        return "real-guest tests need Linux"
    if os.geteuid() != 0:
        return "provisioning QEMU needs root (apt-get, debootstrap, chroot)"
    try:
        proc = subprocess.run(
            ["bash", str(PROVISION)], capture_output=True, text=True,
            timeout=PROVISION_TIMEOUT, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"tests/qemu/provision did not finish in {PROVISION_TIMEOUT:.0f} s"
    except OSError as exc:
        return f"cannot run tests/qemu/provision: {exc}"
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return f"tests/qemu/provision failed (exit {proc.returncode}): {tail}"
    kv = dict(
        line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line
    )
    try:
        return GuestEnv(
            qemu=kv["QEMU"], qemu_version=kv["QEMU_VERSION"], kernel=kv["KERNEL"],
            kernel_release=kv["KERNEL_RELEASE"], initrd=kv["INITRD"],
            boot_initrd=kv["BOOT_INITRD"], bootdisk=kv["BOOTDISK"], mbrdisk=kv["MBRDISK"],
            gptdisk=kv["GPTDISK"], uefidisk=kv["UEFIDISK"], ovmf_code=kv["OVMF_CODE"],
            ovmf_vars=kv["OVMF_VARS"],
        )
    except KeyError as exc:
        return f"tests/qemu/provision printed no {exc.args[0]}= line"


@functools.cache
def _provision_cached() -> GuestEnv | str:
    """Once per process; one retry (a mirror hiccup); a failure is cached as its reason."""
    res = _run_provision()
    if isinstance(res, str) and os.geteuid() == 0 and sys.platform == "linux":
        res = _run_provision()
    return res


def provision() -> GuestEnv:
    """The provisioned QEMU and guest (cached per process); ProvisionError with the reason."""
    res = _provision_cached()
    if isinstance(res, str):
        raise ProvisionError(res)
    return res


def qemu_required() -> bool:
    """Must the real-guest tests run (fail rather than skip when they cannot)?"""
    return os.environ.get("VNVMED_QEMU_REQUIRED") == "1"


# -------------------------------------------------------------- guest output
@dataclass(frozen=True, slots=True)
class VnvLine:
    """One machine-readable console line: ``VNV-TAG rest``."""

    tag: str
    rest: str

    def words(self) -> list[str]:
        return self.rest.split()

    def kv(self) -> dict[str, str]:
        """key=value words (values without spaces, per the guest's convention)."""
        return dict(w.split("=", 1) for w in self.rest.split() if "=" in w)


def parse_console(text: str) -> list[VnvLine]:
    """VNV- lines of a console log; firmware escape junk before a marker is cut."""
    out = []
    for raw in text.splitlines():
        m = _VNV_RE.search(raw.rstrip("\r"))
        if m:
            tag, _, rest = m.group(0).partition(" ")
            out.append(VnvLine(tag[4:], rest))
    return out


@dataclass(slots=True)
class GuestResult:
    console: str
    lines: list[VnvLine]
    returncode: int | None
    timed_out: bool
    elapsed: float
    workdir: Path
    qemu_log: str = ""
    # Other logs (e.g. the vnvmed log) to show with a failure: name -> text.
    attached: dict[str, str] = field(default_factory=dict)

    # -- lookups
    def tagged(self, tag: str) -> list[VnvLine]:
        return [ln for ln in self.lines if ln.tag == tag]

    def first(self, tag: str) -> VnvLine:
        found = self.tagged(tag)
        if not found:
            self.fail(f"guest printed no VNV-{tag} line")
        return found[0]

    def json(self, what: str, name: str | None = None) -> list[Any]:
        """Parsed ``VNV-JSON what name {...}`` documents."""
        docs = []
        for ln in self.tagged("JSON"):
            w, _, rest = ln.rest.partition(" ")
            n, _, doc = rest.partition(" ")
            if w == what and (name is None or n == name):
                # Tools may put a warning before the document (fio does).
                brace = min((i for i in (doc.find("{"), doc.find("[")) if i >= 0), default=0)
                try:
                    docs.append(json.loads(doc[brace:]))
                except ValueError as exc:
                    self.fail(f"bad JSON in VNV-JSON {w} {n}: {exc}")
        return docs

    def attrs(self) -> dict[str, dict[str, str]]:
        """``VNV-ATTR ctrl key=value...`` lines as {ctrl: {key: value}} (values may hold spaces)."""
        out: dict[str, dict[str, str]] = {}
        for ln in self.tagged("ATTR"):
            ctrl, _, kv = ln.rest.partition(" ")
            key, _, value = kv.partition("=")
            out.setdefault(ctrl, {})[key] = value
        return out

    def after_end(self) -> str:
        """Console text after VNV-END: the kernel's own shutdown path."""
        idx = self.console.rfind("VNV-END")
        return self.console[idx:] if idx >= 0 else ""

    def irq_delta(self) -> dict[str, int]:
        """Interrupts per queue between ``VNV-IRQ before`` and ``VNV-IRQ after``."""
        snap: dict[str, dict[str, int]] = {"before": {}, "after": {}}
        for ln in self.tagged("IRQ"):
            tag, _, _ = ln.rest.partition(" ")
            kv = ln.kv()
            if tag in snap:
                snap[tag][kv["queue"]] = int(kv["count"])
        return {q: n - snap["before"].get(q, 0) for q, n in snap["after"].items()}

    @property
    def workload_rc(self) -> int | None:
        for ln in self.tagged("RESULT"):
            return int(ln.kv().get("rc", "-1"))
        return None

    # -- assertions that carry the console
    def tail(self, n: int = CONSOLE_TAIL_LINES, width: int = 400) -> str:
        """Last n console lines, each cut to ``width`` (JSON lines are long)."""
        return "\n".join(ln if len(ln) <= width else ln[:width] + " [...]"
                         for ln in self.console.splitlines()[-n:])

    def fail(self, msg: str) -> None:
        extra = f"\n--- qemu stderr ---\n{self.qemu_log[-2000:]}" if self.qemu_log.strip() else ""
        for name, text in self.attached.items():
            extra += f"\n--- {name} (tail) ---\n{text[-3000:]}"
        raise AssertionError(
            f"{msg}\n(qemu rc={self.returncode} timed_out={self.timed_out} "
            f"elapsed={self.elapsed:.1f}s workdir={self.workdir})\n"
            f"--- guest console (tail) ---\n{self.tail()}{extra}"
        )

    def expect(self, cond: object, msg: str) -> None:
        if not cond:
            self.fail(msg)

    def assert_ok(self) -> None:
        """QEMU exited by itself, the workload returned 0, the guest reached VNV-END."""
        self.expect(not self.timed_out, "guest timed out")
        self.expect(self.tagged("END"), "guest did not reach VNV-END")
        self.expect(self.workload_rc == 0, f"workload failed (rc={self.workload_rc})")
        self.expect(not self.tagged("ERROR"), "guest reported VNV-ERROR")
        self.expect(self.returncode == 0, f"qemu exited with {self.returncode}")


# ------------------------------------------------------------------- guests
def kernel_cmdline(workload: str, args: Mapping[str, object] | None) -> str:
    parts = ["console=ttyS0", "loglevel=4", "panic=-1", f"vnv.wl={workload}"]
    for k, v in (args or {}).items():
        if not re.fullmatch(r"[a-z0-9_]+", k) or re.search(r"\s", str(v)):
            raise ValueError(f"bad guest argument {k}={v!r}")
        parts.append(f"vnv.{k}={v}")
    return " ".join(parts)


def vfio_user_device(socket_path: str | os.PathLike[str], bootindex: int | None = None) -> str:
    """The JSON -device value (QEMU rejects the dotted socket.* form)."""
    dev: dict[str, Any] = {"driver": "vfio-user-pci",
                           "socket": {"path": os.fspath(socket_path), "type": "unix"}}
    if bootindex is not None:
        dev["bootindex"] = bootindex
    return json.dumps(dev)


class Guest:
    """A running QEMU; ``wait()`` turns it into a GuestResult."""

    def __init__(self, argv: list[str], workdir: Path, daemon: "Vnvmed | None" = None) -> None:
        self.workdir = workdir
        self.daemon = daemon
        self.console_path = workdir / "console.log"
        self.qemu_log_path = workdir / "qemu.log"
        self.argv = argv
        self._t0 = time.monotonic()
        with open(self.qemu_log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, tag: str, timeout: float) -> VnvLine:
        """Block until the console shows VNV-TAG (AssertionError with console otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            for ln in parse_console(self.console()):
                if ln.tag == tag:
                    return ln
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                self.result().fail(f"guest never printed VNV-{tag}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal QEMU by its own PID (the wrapper execs, so this is QEMU)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def wait(self, timeout: float, stop_on: Sequence[str] = STOP_ON) -> GuestResult:
        """Wait for QEMU to exit; kill it at ``timeout`` or as soon as the
        console shows one of ``stop_on`` (a guest that can only hang now)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                return self.result(timed_out=True)
            if stop_on:
                text = self.console()
                if any(p in text for p in stop_on):
                    self.kill()
                    break
            try:
                self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
        return self.result()

    def result(self, timed_out: bool = False) -> GuestResult:
        console = self.console()
        try:
            qlog = self.qemu_log_path.read_text(errors="replace")
        except FileNotFoundError:
            qlog = ""
        res = GuestResult(console=console, lines=parse_console(console),
                          returncode=self.proc.poll(), timed_out=timed_out,
                          elapsed=time.monotonic() - self._t0, workdir=self.workdir,
                          qemu_log=qlog)
        if self.daemon is not None and self.daemon.proc is not None:
            alive = "running" if self.daemon.proc.poll() is None else f"exited {self.daemon.proc.returncode}"
            res.attached[f"vnvmed log ({alive})"] = self.daemon.log()
        return res

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_guest(
    *,
    devices: Sequence[str | os.PathLike[str]] = (),
    workload: str = "info",
    args: Mapping[str, object] | None = None,
    smp: int = 2,
    mem: str = "512M",
    workdir: str | os.PathLike[str] | None = None,
    extra: Iterable[str] = (),
    boot_disk: bool = False,
    uefi: bool = False,
    env: GuestEnv | None = None,
    daemon: "Vnvmed | None" = None,
) -> Guest:
    """Start QEMU with a vfio-user-pci device per socket in ``devices``.

    ``boot_disk=True``: no -kernel; the first device gets bootindex=0 and the
    firmware boots from it: SeaBIOS, or OVMF with ``uefi=True`` (its variable store
    is a copy in the work directory).  ``extra``: more QEMU arguments (e.g. a built-in
    ``-device nvme``).  ``daemon``: its log is shown with any failure.
    """
    env = env or provision()
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vnv-guest-"))
    wd.mkdir(parents=True, exist_ok=True)
    argv = [
        env.qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-machine", "q35,memory-backend=mem",
        "-nographic", "-nodefaults", "-no-reboot", "-monitor", "none",
        "-serial", f"file:{wd / 'console.log'}",
    ]
    if uefi:
        shutil.copyfile(env.ovmf_vars, wd / "ovmf_vars.fd")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={env.ovmf_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={wd / 'ovmf_vars.fd'}"]
    if not boot_disk:
        argv += ["-kernel", env.kernel, "-initrd", env.initrd,
                 "-append", kernel_cmdline(workload, args)]
    for i, sock in enumerate(devices):
        argv += ["-device", vfio_user_device(sock, 0 if boot_disk and i == 0 else None)]
    argv += list(extra)
    return Guest(argv, wd, daemon)


def run_guest(*, timeout: float = 120.0, **kw: Any) -> GuestResult:
    """start_guest(**kw), then wait at most ``timeout`` seconds."""
    return start_guest(**kw).wait(timeout)


# ------------------------------------------------------------------- vnvmed
# One way to run the daemon for every test (tests/daemon.py); here it also keeps a
# terminal's Ctrl-C away from it (own session) and logs beside, not in, its run dir.
Vnvmed = Daemon


def short_tmpdir(prefix: str = "vnv-") -> Path:
    """A short directory under /tmp: UNIX socket paths must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def vnvmed_controller(namespaces: Sequence[str], *, name: str = "nvme0", cores: str = "0",
                      extra: Sequence[str] = (), ready_timeout: float = 30.0
                      ) -> Iterator[tuple[Vnvmed, Path]]:
    """One controller NAME with ``--namespace NAME=<spec>`` per entry; yields (daemon, socket).

    Runs exactly ``bin/vnvmed --cores C --controller NAME=SOCK --namespace NAME=SPEC...``;
    the run dir (socket, log) is removed afterwards.
    """
    rd = short_tmpdir()
    sock = rd / f"{name}.sock"
    args = ["--cores", cores, "--controller", f"{name}={sock}"]
    for spec in namespaces:
        args += ["--namespace", f"{name}={spec}"]
    args += list(extra)
    try:
        with start_vnvmed(args, run_dir=rd / "run", log_path=rd / "vnvmed.log",
                          ready_timeout=ready_timeout) as daemon:
            yield daemon, sock
    finally:
        shutil.rmtree(rd, ignore_errors=True)


def start_vnvmed(args: Sequence[str], *, run_dir: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 ready_timeout: float = 30.0) -> Vnvmed:
    """Run bin/vnvmed ARGS with VNVMED_RUN_DIR=run_dir; returns once it logged 'vnvmed ready'."""
    rd = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="vnvmed-run-"))
    return Daemon(args, rd, log_path=log_path, new_session=True).start(ready_timeout)


def expect_fio_verify_two_queues(res: GuestResult) -> int:
    """The `fio` workload passed: no fio error, writes and verify reads done, both I/O
    queues completed I/O (interrupt counts moved); returns the reported write IOPS."""
    res.assert_ok()
    (doc,) = res.json("fio")
    job = doc["jobs"][0]
    res.expect(job["error"] == 0, f"fio error {job['error']}")
    res.expect(job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0,
               "fio did no write or no verify reads")
    iops = int(res.first("FIO").kv()["write_iops"])
    res.expect(iops > 0, "no IOPS reported")
    delta = res.irq_delta()
    res.expect(delta.get("nvme0q1", 0) > 0 and delta.get("nvme0q2", 0) > 0,
               f"both I/O queues should complete I/O: {delta}")
    return iops
