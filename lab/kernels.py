"""Run a command inside a Linux kernel that can carry ESP (IPsec).

The lab needs a kernel that installs ESP security associations. Where the host's kernel can
(a CI runner, a router), commands run on the host. Where it cannot (the project's own machines:
XFRM without ESP, see reference/lab-substrate.md), they run in a throw-away kernel whose root
file system is the host's ``/`` mounted read-only, so the host's Python, Libreswan and the
project checkout are used unchanged:

- ``uml``: Debian 13's User-Mode Linux (lab/uml.py; the host's ``/usr/bin/linux`` as a fallback).
  Boots in seconds; ESP works, but its nf_tables has no ``ip``/``ip6``/``inet`` families, so the
  rendered firewall cannot be loaded.
- ``qemu``: Debian's own amd64 kernel under QEMU (software emulation by default). Slower, but a
  full router kernel: ESP and ``inet`` nftables tables.
- ``host``: the host's own kernel, no isolation beyond what the command does itself.

One entry point, :func:`run_in_guest`, with the same contract for all three: the command runs
as root with the given cwd and environment, a host directory (the *share*) is writable at the
same absolute path, every console line is streamed as it arrives, and the exit code comes back.
The kernel process is always killed and temporary files removed, whatever happens.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import io
import lzma
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import uml
from .uml_xstate import GUEST_GLIBC_TUNABLES, GUEST_GODEBUG

KINDS = ("host", "qemu", "uml")

GUEST_INIT = Path(__file__).resolve().with_name("guest-init.sh")
UML_XSTATE = Path(__file__).resolve().with_name("uml_xstate.py")

BUSYBOX = Path("/bin/busybox")

# Modules the QEMU initramfs needs to reach the host's / over 9p (the order that worked by hand;
# their dependencies from modules.dep are inserted first in any case).
INITRAMFS_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                     "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p")

# Inside a guest the wrapper that points modprobe at the lab kernel's modules comes first in PATH.
GUEST_BIN = "/run/wan-lab/bin"

# The probe from the reference: adding an ESP SA fails on a kernel without ESP ("Requested type
# not found", or "Requested AEAD algorithm not found" where GCM is missing too, as here). The key is
# a throw-away constant (20 bytes: 16 key + 4 salt), the addresses
# are from TEST-NET-1 and the namespace is deleted right after.
ESP_PROBE_ARGV = ["ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
                  "proto", "esp", "spi", "0x100", "mode", "tunnel",
                  "aead", "rfc4106(gcm(aes))", "0x" + "0123456789abcdef" * 2 + "01234567", "128"]
ESP_PROBE = shlex.join(ESP_PROBE_ARGV)  # the same, quoted for a shell

# A share path goes onto a kernel command line and into mount options: keep it plain.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@:/-]*$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestRun:
    """What happened when a command ran in a lab kernel."""

    kind: str  # "uml" | "qemu" | "host"
    exit_code: int  # exit code of the command inside; -1 when it never reported one (crash, timeout)
    console: str  # the whole console text, boot noise included, for diagnostics
    boot_seconds: float  # process start until the command started inside
    total_seconds: float
    firewall_capable: bool  # nftables 'inet' tables work inside this kernel
    timed_out: bool = False  # the run was killed at the timeout
    origin: str = ""  # which kernel: "Debian 13's user-mode-linux 6.12um1+b22 (6.12.113)", "linux-image-..."
    pid: int = 0  # host PID of the kernel (or of the command, for kind='host'); gone on return


def _default_progress(line: str) -> None:
    print(f"wan-lab: {line}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where downloaded kernels and built initramfs images are kept ($WAN_LAB_CACHE)."""
    return Path(os.environ.get("WAN_LAB_CACHE") or "~/.cache/wan-lab").expanduser()


# ---------------------------------------------------------------------------------------------
# Host probes


def _run_quiet(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class _CannotProbe(Exception):
    """The probe could not even be tried (not root, no 'ip', no namespaces)."""


def _in_throwaway_netns(shell: str) -> tuple[bool, str]:
    """Run `shell` in a fresh, uniquely named network namespace that is always deleted.

    Returns whether it succeeded and its error text; raises _CannotProbe when it cannot run.
    """
    if os.geteuid() != 0:
        raise _CannotProbe("needs root (network namespaces)")
    if shutil.which("ip") is None:
        raise _CannotProbe("the 'ip' command is missing: apt-get install iproute2")
    name = f"wanlab-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = _run_quiet(["ip", "netns", "add", name])
    if made.returncode != 0:
        raise _CannotProbe(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        done = _run_quiet(["ip", "netns", "exec", name, "sh", "-c", shell])
        return done.returncode == 0, (done.stderr or done.stdout).strip()
    finally:
        _run_quiet(["ip", "netns", "del", name])


def esp_probe_host() -> tuple[bool, str]:
    """True where THIS kernel can install an ESP SA and we are root.

    Adds an ESP state in a throw-away namespace (see ESP_PROBE). The string says why not, or is
    empty when the probe succeeded.
    """
    try:
        ok, why = _in_throwaway_netns(ESP_PROBE)
    except _CannotProbe as e:
        return False, str(e)
    if ok:
        return True, ""
    return False, f"this kernel cannot install an ESP SA ({why or 'no error text'})"


@functools.lru_cache(maxsize=1)
def _host_firewall_capable() -> bool:
    # The kernel does not change while we run: probe once per process.
    if shutil.which("nft") is None:
        return False
    try:
        return _in_throwaway_netns("nft add table inet wanlab_probe")[0]
    except _CannotProbe:
        return False


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit ELF executable without a program interpreter (statically linked)."""
    try:
        return uml.interpreter_field(path.read_bytes()) is None
    except (OSError, ValueError):
        return False


def available_kernels() -> dict[str, str | None]:
    """For each of host/qemu/uml: None when usable, else a sentence saying what to install.

    Cheap: nothing is downloaded or booted. For qemu, a kernel that is not cached yet counts as
    available when apt can fetch it (the first run downloads it).
    """
    result: dict[str, str | None] = {}
    ok, why = esp_probe_host()
    result["host"] = None if ok else f"The host kernel cannot run the lab: {why}."

    result["uml"] = uml.available(cache_dir() / "uml")
    if result["uml"] is None and not Path("/usr/sbin/modprobe").exists():
        result["uml"] = "User-Mode Linux is missing: apt-get install kmod"

    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    if not _is_static_elf(BUSYBOX):
        missing.append("busybox-static")
    if not Path("/usr/sbin/modprobe").exists():
        missing.append("kmod")
    if missing:
        result["qemu"] = f"QEMU is missing: apt-get install {' '.join(missing)}"
    elif _cached_qemu_kernels() or (shutil.which("apt-get") and shutil.which("dpkg")):
        result["qemu"] = None
    else:
        result["qemu"] = ("No Debian kernel for QEMU is cached and apt-get/dpkg are missing to "
                          f"fetch one: put an extracted linux-image-*-amd64 under {cache_dir()}/qemu")
    return result


# ---------------------------------------------------------------------------------------------
# The QEMU kernel and initramfs (fetched and built once, cached)


@dataclass(frozen=True)
class QemuKernel:
    """A Debian kernel extracted into the cache, with its initramfs."""

    release: str  # uname -r, e.g. 6.1.0-56-amd64
    vmlinuz: Path
    modules: Path  # .../lib/modules/<release>
    initrd: Path


def _apt_kernel_package() -> str | None:
    """The newest linux-image-<ver>-amd64 that apt knows (local query, no network)."""
    wanted = os.environ.get("WAN_LAB_QEMU_KERNEL")
    if wanted:
        return wanted
    try:
        names = _run_quiet(["apt-cache", "pkgnames", "linux-image-"]).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    pattern = re.compile(r"^linux-image-(\d+)\.(\d+)\.(\d+)-(\d+)-amd64$")
    found = [(tuple(map(int, m.groups())), n) for n in names if (m := pattern.match(n))]
    return max(found)[1] if found else None


def _cached_qemu_kernels() -> list[Path]:
    base = cache_dir() / "qemu"
    return sorted(p for p in base.glob("linux-image-*") if (p / "READY").exists()) if base.is_dir() else []


def _modules_load_order(modules: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files to insmod, dependencies first; built-in modules are skipped."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", Path(t).name).replace("-", "_"): t for t in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps.get(path, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        if path not in order:
            order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is not None:
            visit(path)
    return [modules / p for p in order]


def _module_bytes(path: Path) -> bytes:
    # BusyBox insmod takes plain ELF; newer Debian kernels compress their modules.
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise RuntimeError(f"{path}: zstd-compressed modules are not supported")
    return data


_INITRAMFS_INIT = """#!/bin/sh
# initramfs of the wan-lab QEMU guest: load virtio + 9p, mount the host's / read-only over 9p
# and hand over to lab/guest-init.sh on it (its path and arguments come after "--").
# cache=loose: the guest keeps what it read of the read-only root in its page and dentry caches;
# without it every exec went to the host for each lookup and page (200 runs of `ip` took 54.7 s
# under TCG, 14.8 s with it; _updown starts a chain of such processes per Child SA). The
# writable share is mounted without it, so results are never stale.
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot; then
    echo "initramfs: cannot mount the host's / over 9p"; poweroff -f
fi
umount /dev
umount /proc
exec switch_root /newroot /bin/sh "$@"
"""


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive: entries of (name, mode, data, rdev as (major << 8) | minor)."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, b"", 0)], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(encoded)
        pad()
        out.write(data)
        pad()
    return out.getvalue()


def _build_initramfs(modules: Path) -> tuple[bytes, str]:
    """The initramfs archive (uncompressed cpio) and its digest, which names the cached file."""
    load = _modules_load_order(modules, INITRAMFS_MODULES)
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes(), 0))
    for applet in ("sh", "mount", "umount", "insmod", "cat", "echo", "switch_root", "poweroff"):
        entries.append((f"bin/{applet}", 0o120777, b"busybox", 0))
    entries.append(("init", 0o100755, _INITRAMFS_INIT.encode(), 0))
    names = []
    for path in load:
        name = re.sub(r"\.(xz|gz|zst)$", "", path.name)
        names.append(name)
        entries.append((f"modules/{name}", 0o100644, _module_bytes(path), 0))
    entries.append(("modules/order", 0o100644, ("\n".join(names) + "\n").encode(), 0))
    archive = _cpio_newc(entries)
    return archive, hashlib.sha256(archive).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_qemu(progress: Progress = _default_progress) -> QemuKernel:
    """Fetch and extract the Debian kernel and build the initramfs, once; later calls use the cache.

    The kernel package is downloaded with ``apt-get download`` (the host's configured Debian
    mirror) and extracted with ``dpkg -x``; nothing is installed on the host. A lock file makes
    concurrent first runs wait for each other instead of racing.
    """
    base = cache_dir() / "qemu"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = _apt_kernel_package()
        if package is None:
            cached = _cached_qemu_kernels()
            if not cached:
                raise RuntimeError("apt knows no linux-image-*-amd64 package and none is cached")
            root = cached[-1]
        else:
            root = base / package
        if not (root / "READY").exists():
            _fetch_kernel(package or root.name, root, progress)
        release = (root / "READY").read_text().strip()
        modules = root / "lib" / "modules" / release
        image, digest = _build_initramfs(modules)
        initrd = root / f"initrd-{digest}.gz"
        if not initrd.exists():
            progress(f"building the QEMU initramfs {initrd}")
            _write_atomic(initrd, gzip.compress(image, compresslevel=6, mtime=0))
            for old in root.glob("initrd-*.gz"):
                if old != initrd:
                    old.unlink(missing_ok=True)
        return QemuKernel(release, root / "boot" / f"vmlinuz-{release}", modules, initrd)


def _fetch_kernel(package: str, root: Path, progress: Progress) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root.parent))
    try:
        progress(f"downloading {package} with apt-get download (first run only, ~70 MB)")
        got = subprocess.run(["apt-get", "download", "-q", package], cwd=work,
                             capture_output=True, text=True, check=False)
        debs = list(work.glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {package} failed: {got.stderr.strip()}")
        progress(f"extracting {debs[0].name}")
        tree = work / "tree"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tree)], check=True)
        releases = [p.name for p in (tree / "lib" / "modules").iterdir()]
        if len(releases) != 1:
            raise RuntimeError(f"{debs[0].name}: expected one module tree, found {releases}")
        release = releases[0]
        progress(f"depmod for {release}")
        subprocess.run(["depmod", "-b", str(tree), release], check=True)
        (tree / "READY").write_text(release + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tree, root)
        progress(f"kernel {release} ready in {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running


def _command_script(argv: list[str], cwd: Path, env: dict[str, str], guest: bool, uml: bool = False) -> str:
    """The shell script that runs argv with exactly cwd and env (quoted, never interpolated)."""
    env = dict(env)
    if guest:
        env["PATH"] = GUEST_BIN + ":" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if uml and uml_needs_xstate_guard():
        env.setdefault("GLIBC_TUNABLES", GUEST_GLIBC_TUNABLES)
        env.setdefault("GODEBUG", GUEST_GODEBUG)
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (f"cd {shlex.quote(str(cwd))} || exit 127\n"
            f"exec /usr/bin/env -i {assignments} {shlex.join(argv)}\n")


def uml_needs_xstate_guard() -> bool:
    """True on a host CPU whose XSAVE area is larger than UML 6.1 hands to ptrace (AVX-512, AMX):
    see lab/uml_xstate.py. /proc/cpuinfo's flags are enough to tell."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512f", "amx_tile"} & set(flags.split()))


def prepare_uml(progress: Progress = _default_progress) -> uml.UmlKernel:
    """The User-Mode Linux to boot (lab/uml.py: Debian 13's, fetched once into the cache)."""
    return uml.prepare(cache_dir() / "uml", progress)


def _uml_argv(kernel: uml.UmlKernel, init_args: list[str], mem_mb: int, umid: str, uml_dir: Path) -> list[str]:
    guard = [sys.executable, str(UML_XSTATE)] if uml_needs_xstate_guard() else []
    # unknown NAME=value parameters reach init's environment: every guest process gets the tunables
    tunables = [f"GLIBC_TUNABLES={GUEST_GLIBC_TUNABLES}", f"GODEBUG={GUEST_GODEBUG}"] if guard else []
    # the kernel's own environment (Debian 13's libc) is set by env(1) right before it: not for the guard's Python
    own = ["/usr/bin/env", *(f"{k}={v}" for k, v in sorted(kernel.env.items()))] if kernel.env else []
    # WAN_LAB_UML_MODULES reaches guest-init.sh's environment, as the tunables do
    return [*guard, *own, str(kernel.binary), *tunables, f"mem={mem_mb}M", "rootfstype=hostfs", "rootflags=/", "ro",
            f"umid={umid}", f"uml_dir={uml_dir}", f"WAN_LAB_UML_MODULES={kernel.modules}", "con0=fd:0,fd:1", "con=null", "quiet",
            "init=/bin/sh", "--", *init_args]


def _qemu_argv(kernel: QemuKernel, init_args: list[str], share: Path, mem_mb: int) -> list[str]:
    accel = os.environ.get("WAN_LAB_QEMU_ACCEL", "tcg")
    accel = "tcg,thread=multi" if accel == "tcg" else accel
    # no_timer_check: under TCG the kernel's check of the IO-APIC timer (arch/x86/kernel/apic/io_apic.c
    # check_timer, "MP-BIOS bug: 8254 timer not connected to IO-APIC") now and then stalled the boot
    # for good on this machine (measured twice in one afternoon); the parameter skips that check
    # (Documentation/admin-guide/kernel-parameters.txt, no_timer_check), as cloud images do under QEMU
    append = " ".join(["console=ttyS0", "quiet", "panic=-1", "no_timer_check", "--", *init_args])
    return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", accel,
            "-cpu", os.environ.get("WAN_LAB_QEMU_CPU", "max"), "-m", str(mem_mb), "-smp", os.environ.get("WAN_LAB_QEMU_SMP", "2"),
            "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd), "-append", append,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={kernel.modules},mount_tag=kmods,security_model=none,readonly=on",
            "-virtfs", f"local,path={share},mount_tag=share,security_model=none"]


def _read_lines(stream: io.BufferedReader, lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
    lines.put(None)


def _exited(pid: int) -> bool:
    """True once our child `pid` has exited; WNOWAIT leaves it unreaped, so its PID stays ours."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid == pid


def _kill_group(pid: int) -> None:
    # The kernel was started in a session of its own, so its process group id is its PID: this
    # reaches UML's helper processes too, and nothing we did not start.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, limit: float = 10.0) -> None:
    # UML's helpers are the kernel's children, not ours: after SIGKILL they linger until the
    # host's init reaps them. Return once none is left, so the caller sees a clean host.
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


# A kernel that has not reached the guest's init after this long never will (a hung boot): it is
# killed and booted once more, within the same timeout (nothing of the command has run yet).
BOOT_LIMIT = {"qemu": 240.0, "uml": 120.0}


def run_in_guest(kind: str, argv: list[str], share: Path, *, cwd: Path, env: dict[str, str],
                 timeout: float, on_line: Callable[[str], None] | None = None,
                 mem_mb: int = 1024, _boots_left: int = 1) -> GuestRun:
    """Boot the kernel `kind`, run argv inside as root, power off, and report.

    argv runs as a child of PID 1 with working directory `cwd` and exactly the environment
    `env` (inside a guest, PATH gets the directory of a ``modprobe`` wrapper prepended so that
    plain ``modprobe`` finds the guest kernel's modules). The host directory `share` is mounted
    writable at the same absolute path inside. The rest of the host's file system is visible
    read-only; /tmp, /run, /var/tmp, /var/log and /var/lib/ipsec are empty tmpfs, so `cwd` must
    not be below them unless it is below `share`. Use absolute interpreter paths
    (``os.path.realpath(sys.executable)``) rather than pyenv shims.

    Every console line goes to `on_line` as it arrives. `timeout` covers boot and command; the
    QEMU kernel is fetched and its initramfs built before the clock starts (first run only).
    kind='host' runs argv as a plain subprocess with the same contract. Whatever happens (timeout,
    exception, KeyboardInterrupt), the process we started is killed by its PID and the temporary
    files are removed. Concurrent runs do not collide, even on the same share.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {', '.join(KINDS)}")
    share = Path(share).resolve()
    if not share.is_dir():
        raise ValueError(f"share {share} is not a directory")
    if kind != "host" and not _SAFE_PATH.match(str(Path(cwd).resolve())):
        raise ValueError(f"working directory {cwd}: only letters, digits and ._+@:/- are allowed in its path")
    if kind != "host" and not _SAFE_PATH.match(str(share)):
        raise ValueError(f"share {share}: only letters, digits and ._+@:/- are allowed in its path")
    kernel = prepare_qemu() if kind == "qemu" else None
    uml_kernel = prepare_uml() if kind == "uml" else None

    nonce = uuid.uuid4().hex[:12]
    ctl = share / f".guest-{nonce}"
    # UML keeps the guest's memory in a file in its TMPDIR and warns when that is not a tmpfs.
    shm = "/dev/shm" if kind == "uml" and os.access("/dev/shm", os.W_OK) else None
    temp = Path(tempfile.mkdtemp(prefix=f"wan-lab-{kind}-", dir=shm))
    proc: subprocess.Popen[bytes] | None = None
    console: list[str] = []
    timed_out = False
    boot_hung = False
    started = time.monotonic()
    ready_at: float | None = None
    boot_limit = float(os.environ.get("WAN_LAB_BOOT_LIMIT", BOOT_LIMIT.get(kind, 0.0)))
    try:
        if kind == "host":
            popen_argv, popen_kw = argv, {"cwd": cwd, "env": env}
            firewall = _host_firewall_capable()
        else:
            ctl.mkdir()
            (ctl / "cmd.sh").write_text(_command_script(argv, cwd, env, guest=True, uml=kind == "uml"))
            init_args = [str(GUEST_INIT), kind, str(share), str(ctl), nonce, str(Path(cwd).resolve())]
            if kind == "uml":
                assert uml_kernel is not None
                popen_argv = _uml_argv(uml_kernel, init_args, mem_mb, f"wanlab-{nonce}", temp)
                popen_kw = {"env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(temp)},
                            "cwd": uml_kernel.cwd}
                firewall = False
            else:
                assert kernel is not None
                popen_argv, popen_kw = _qemu_argv(kernel, init_args, share, mem_mb), {}
                firewall = True

        started = time.monotonic()
        proc = subprocess.Popen(popen_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, **popen_kw)
        if kind == "host":
            ready_at = started
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()

        ready, done = f"@@GUEST-READY {nonce}@@", f"@@GUEST-DONE {nonce} rc="
        deadline, over_by = started + timeout, None  # over_by: the command is over, stop by then
        while True:
            now = time.monotonic()
            end = deadline if over_by is None else min(deadline, over_by)
            if now >= end:
                timed_out = over_by is None
                break
            if ready_at is None and boot_limit and now - started > boot_limit:
                boot_hung = True
                break
            try:
                line = lines.get(timeout=min(0.25, end - now))
            except queue.Empty:
                # Something the command left behind may hold the pipe open after the process we
                # started has exited: do not wait for an EOF that may never come.
                if over_by is None and _exited(proc.pid):
                    over_by = time.monotonic() + 2
                continue
            if line is None:
                break
            console.append(line)
            if ready_at is None and line.endswith(ready):
                ready_at = time.monotonic()
            elif done in line and over_by is None:
                # The command is over; the power-off should take a moment, not the full timeout.
                over_by = time.monotonic() + 20
            if on_line is not None:
                on_line(line)
    finally:
        if proc is not None:
            _kill_group(proc.pid)  # before reaping, so the PID cannot have been reused
            proc.wait()
            _wait_group_gone(proc.pid)
            if proc.stdout is not None:
                proc.stdout.close()
        rc_text = _read_text(ctl / "rc")
        shutil.rmtree(ctl, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)

    if boot_hung:
        left = timeout - (time.monotonic() - started)
        note = f"lab: the {kind} kernel did not reach its init within {boot_limit:.0f} s (a hung boot)"
        if _boots_left > 0 and left > boot_limit:
            if on_line is not None:
                on_line(note + "; booting it once more")
            return run_in_guest(kind, argv, share, cwd=cwd, env=env, timeout=left, on_line=on_line,
                                mem_mb=mem_mb, _boots_left=_boots_left - 1)
        console.append(note)
        timed_out = True
    if kind == "host":
        exit_code = -1 if timed_out else proc.returncode
    elif rc_text is not None and re.fullmatch(r"\d+\n?", rc_text):
        exit_code = int(rc_text)
    else:  # the share lost the file (or the write never reached the host): the console has it
        marks = re.findall(re.escape(f"@@GUEST-DONE {nonce} rc=") + r"(\d+)@@", "\n".join(console))
        exit_code = int(marks[0]) if marks else -1
    finished = time.monotonic()
    return GuestRun(kind=kind, exit_code=exit_code, console="\n".join(console) + "\n",
                    boot_seconds=round((ready_at or finished) - started, 2),
                    total_seconds=round(finished - started, 2), firewall_capable=firewall,
                    timed_out=timed_out, pid=proc.pid,
                    origin=uml_kernel.origin if uml_kernel else f"Debian's {kernel.release} under QEMU" if kernel else "")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
