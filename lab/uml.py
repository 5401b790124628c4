"""Which User-Mode Linux the lab boots: Debian 13's, fetched once into the cache, else the host's.

Debian 12's user-mode-linux (6.1) starts a process in about twice the time Debian 13's (6.12) takes,
and the lab is bound by process starts (Libreswan's `_updown` per Child SA, the router programs):
measured inside each kernel on this project's machine, 100 runs each: `ip -o link` 37 ms vs 21 ms,
`sed` 27 vs 13, `/bin/true` 10 vs 5 (docs/performance.md has the labs' times). The lab therefore
boots Debian 13's User-Mode Linux on any host, fetched with apt from Debian's archive
(lab/debian.py: the archive keyring verifies it) and kept under the cache:

    <cache>/uml/<version>/   usr/bin/linux.uml, usr/lib/uml/modules/<release>/, libc6's files, READY

Debian 13's binary needs glibc 2.38 (`__isoc23_strtol`), which Debian 12 does not have, so the tree
carries Debian 13's libc6 too, and the binary's program interpreter is rewritten (same length, in
place) to a path relative to the tree, ``./ld.so``: the kernel opens a relative interpreter from the
working directory of the execve (fs/binfmt_elf.c, load_elf_binary's open_exec of the PT_INTERP path:
recalled, not read here; tests/test_uml.py shows it on this kernel), so UML runs with the tree as its
working directory and LD_LIBRARY_PATH on Debian 13's libc (set by env(1) for the kernel alone).
Starting it through the loader instead (``ld.so linux.uml``) does not work: UML then sizes its memory
from the loader's program break and panics (tried: "Failed to allocate 1466006962176 bytes").
UML sees the host's files through hostfs by absolute paths; its working directory matters to nothing
else.

$WAN_LAB_UML=host boots the host's /usr/bin/linux (Debian's package) instead; when Debian 13's cannot
be fetched (no mirror, no keyring) and none is cached, the lab says so and boots the host's.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import debian

SUITE = "trixie"  # Debian 13
PACKAGES = ["user-mode-linux", "libc6"]
HOST_BINARY = Path("/usr/bin/linux")
HOST_MODULES = Path("/usr/lib/uml/modules")
INTERPRETER = b"./ld.so"  # relative to the tree (the working directory UML is started in)
PT_INTERP = 3


@dataclass(frozen=True)
class UmlKernel:
    """A User-Mode Linux binary with its modules, and how to start it."""

    binary: Path
    modules: Path  # the directory holding <release>/ (guest-init.sh binds <modules>/<release>)
    release: str  # uname -r inside, e.g. 6.12.113
    origin: str  # for the verdict and progress lines
    cwd: Path | None = None  # the working directory to start it in (a relative interpreter)
    env: dict[str, str] = field(default_factory=dict)  # added to its environment


def _releases(modules: Path) -> list[str]:
    return sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []


def host() -> UmlKernel | None:
    """The host's user-mode-linux package, or None when it is not installed."""
    releases = _releases(HOST_MODULES)
    if not HOST_BINARY.exists() or not releases:
        return None
    return UmlKernel(HOST_BINARY, HOST_MODULES, releases[-1], f"the host's user-mode-linux ({releases[-1]})")


def _from_tree(tree: Path) -> UmlKernel:
    version = (tree / "READY").read_text().strip()
    modules = tree / "usr/lib/uml/modules"
    release = _releases(modules)[-1]
    return UmlKernel(tree / "usr/bin/linux.uml", modules, release, f"Debian 13's user-mode-linux {version} ({release})",
                     cwd=tree, env={"LD_LIBRARY_PATH": str(tree / "usr/lib/x86_64-linux-gnu")})


def cached(base: Path) -> list[Path]:
    """The fetched trees under base, oldest version first (a tree without READY is not done)."""
    return sorted(p for p in base.iterdir() if (p / "READY").exists()) if base.is_dir() else []


def wanted() -> bool:
    return os.environ.get("WAN_LAB_UML", "") != "host"


def available(base: Path) -> str | None:
    """None when a User-Mode Linux can be had (cached, fetchable or the host's), else what to install.
    Cheap: nothing is downloaded."""
    if host() is not None or (wanted() and (cached(base) or (shutil.which("apt-get") and shutil.which("dpkg")
                                                              and debian.KEYRING.exists()))):
        return None
    return "User-Mode Linux is missing: apt-get install user-mode-linux (or debian-archive-keyring to fetch Debian 13's)"


def interpreter_field(data: bytes) -> tuple[int, int] | None:
    """Where a 64-bit ELF executable's program interpreter path lies (offset, size of PT_INTERP's
    bytes), None for one without (statically linked). ValueError for what is no 64-bit ELF file."""
    if data[:4] != b"\x7fELF" or data[4:5] != b"\x02":
        raise ValueError("not a 64-bit ELF file")
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[32:40], order)
    phentsize = int.from_bytes(data[54:56], order)
    for i in range(int.from_bytes(data[56:58], order)):
        ph = phoff + i * phentsize
        if int.from_bytes(data[ph:ph + 4], order) == PT_INTERP:
            return int.from_bytes(data[ph + 8:ph + 16], order), int.from_bytes(data[ph + 32:ph + 40], order)
    return None


def set_interpreter(path: Path, new: bytes) -> bytes:
    """Rewrite the ELF program interpreter of the 64-bit little-endian executable `path` in place
    (the new path, NUL-padded, must fit the old one's bytes); the old interpreter."""
    data = bytearray(path.read_bytes())
    try:
        if data[5:6] != b"\x01":
            raise ValueError("big-endian")
        field = interpreter_field(data)
    except ValueError:
        raise RuntimeError(f"{path}: not a 64-bit little-endian ELF file") from None
    if field is None:
        raise RuntimeError(f"{path}: no program interpreter (a static binary needs no rewrite)")
    offset, size = field
    old = bytes(data[offset:offset + size]).split(b"\0", 1)[0]
    if len(new) + 1 > size:
        raise RuntimeError(f"{path}: interpreter {new!r} does not fit the {size} bytes of {old!r}")
    data[offset:offset + size] = new.ljust(size, b"\0")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(path.stat().st_mode)
    os.replace(tmp, path)
    return old


def _fetch(base: Path, progress: Callable[[str], None]) -> Path:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=base))
    try:
        progress(f"fetching Debian 13's User-Mode Linux with apt (once, ~40 MB) from {debian.mirror(SUITE)}")
        debs = debian.download(SUITE, PACKAGES, work)
        version = debs["user-mode-linux"].name.split("_")[1]
        tree = work / "tree"
        for deb in debs.values():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, capture_output=True)
        loader = tree / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        if not loader.exists() or not (tree / "usr/bin/linux.uml").exists() or not _releases(tree / "usr/lib/uml/modules"):
            raise RuntimeError(f"the packages {', '.join(d.name for d in debs.values())} lack the loader, "
                               "/usr/bin/linux.uml or its modules")
        (tree / INTERPRETER.decode()).symlink_to("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        set_interpreter(tree / "usr/bin/linux.uml", INTERPRETER)
        (tree / "READY").write_text(version + "\n")
        final = base / version
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tree, final)
        progress(f"Debian 13's User-Mode Linux {version} ready in {time.monotonic() - started:.0f} s")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(base: Path, progress: Callable[[str], None] = print) -> UmlKernel:
    """The User-Mode Linux the lab boots: Debian 13's (cached under base, fetched on first use; the newest
    cached one wins: delete base to take a newer one), else the host's. RuntimeError when there is none."""
    if wanted():
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first runs wait for one fetch
            trees = cached(base)
            if trees:
                return _from_tree(trees[-1])
            try:
                return _from_tree(_fetch(base, progress))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                fallback = host()
                if fallback is None:
                    raise RuntimeError(f"no User-Mode Linux: Debian 13's could not be fetched ({e}) and "
                                       "user-mode-linux is not installed") from e
                progress(f"WARNING: Debian 13's User-Mode Linux could not be fetched ({str(e).splitlines()[0]}); "
                         f"booting {fallback.origin}, about twice as slow")
                return fallback
    kernel = host()
    if kernel is None:
        raise RuntimeError("WAN_LAB_UML=host but user-mode-linux is not installed: apt-get install user-mode-linux")
    return kernel
