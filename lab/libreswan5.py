"""The Libreswan 5 root: a Debian 13 (trixie) root file system with Libreswan 5.2, built by the
project with debootstrap (the Docker router image's recipe, lab/docker_image.py) and cached as a
directory on the host, which both lab kernels see at the same path (they boot the host's / read-only).

Routers of sites that target Libreswan 5 run in it: their holder (lab/router-setup.sh) builds a
root of its own from this one (bind mounts, read-only) with the router's writable /etc, /run and /var
and chroots into it, so pluto, whack, ipsec, ip and nft are 5.2's and trixie's. Routers of 4.x sites
run on the lab kernel's own root (Debian 12: Libreswan 4.10), as before.

    root = ensure_root(say)      # built once per recipe: ~/.cache/wan-lab/root-trixie-<hash>/
    why = unavailable()           # None, or why no 5.x root can be had here (the verdict says it)

$WAN_LAB_LIBRESWAN5=0 keeps every router on the lab kernel's Libreswan (the 5.x sites then run a
4.x rendering, and the verdict names them as not proven on 5.x).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import docker_image, kernels

# What a 5.x router needs inside: pluto and its tools (bind9-host: libreswan depends on the virtual
# package `host`, which debootstrap does not resolve by itself; certutil for the NSS database), the
# router programs' tools (router/fetch, router/reconcile:
# sh, curl, jq, signify, flock, logger, sha256sum, tar, gzip), ip, nft, and dnsmasq for the DNS model.
PACKAGES = ("libreswan", "bind9-host", "libnss3-tools", "iproute2", "nftables", "dnsmasq-base", "busybox", "procps",
            "iputils-ping", "curl", "jq", "signify-openbsd", "ca-certificates")

RECIPE = {
    "version": 1,
    "suite": "trixie",  # Debian 13: Libreswan 5.2
    "variant": "minbase",
    "packages": list(PACKAGES),
    "strip": list(docker_image.STRIP),
}
META = "wan-lab-root.json"  # in the root: the recipe, the Libreswan version, build time and size


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def root_dir() -> Path:
    return kernels.cache_dir() / f"root-{RECIPE['suite']}-{recipe_hash()}"


def wanted() -> bool:
    return os.environ.get("WAN_LAB_LIBRESWAN5", "1") != "0"


def built() -> Path | None:
    """The root if it is built (its metadata file is written last)."""
    root = root_dir()
    return root if (root / META).exists() else None


def meta(root: Path) -> dict:
    return json.loads((root / META).read_text())


def unavailable() -> str | None:
    """Why no 5.x root can be used in this run, None if one can (built, or buildable here)."""
    if not wanted():
        return "WAN_LAB_LIBRESWAN5=0"
    if built():
        return None
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (./run installs it; apt-get install debootstrap)"
    if os.geteuid() != 0:
        return "building the Libreswan 5 root needs root (debootstrap)"
    return None


def _version(root: Path) -> str:
    """`ipsec --version` of the root's Libreswan, run in the root ("Libreswan 5.2" -> "5.2")."""
    r = subprocess.run(["chroot", str(root), "/usr/sbin/ipsec", "--version"], capture_output=True, text=True, timeout=60)
    words = (r.stdout or "").split()
    if r.returncode != 0 or len(words) < 2 or words[0] != "Libreswan":
        raise RuntimeError(f"the Libreswan 5 root {root}: `ipsec --version` answered {(r.stdout + r.stderr).strip()[:200]!r}")
    return words[1]


def ensure_root(say: Callable[[str], None] = print) -> Path:
    """The root, built once per recipe (minutes; the caller may hold the lab lock, another process
    building the same root is waited for). Raises RuntimeError naming what failed."""
    root = root_dir()
    if built():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built():
            return root
        t0 = time.monotonic()
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            docker_image.debootstrap(RECIPE, tmp, say, f"the Libreswan 5 root ({RECIPE['suite']})")
            # mount points and directories the router's holder binds over (lab/router-setup.sh)
            for d in ("run/wan-lab", "var/lib/ipsec/nss", "var/prometheus", "wanhost"):
                (tmp / d).mkdir(parents=True, exist_ok=True)
            version = _version(tmp)
            if not version.startswith("5."):
                raise RuntimeError(f"the {RECIPE['suite']} root has Libreswan {version}, not 5.x")
            size = int(subprocess.run(["du", "-sxk", str(tmp)], capture_output=True, text=True).stdout.split()[0]) * 1024
            seconds = round(time.monotonic() - t0, 1)
            (tmp / META).write_text(json.dumps({"recipe": RECIPE, "hash": recipe_hash(), "libreswan": version,
                                                "build_seconds": seconds, "bytes": size}, indent=1) + "\n")
            shutil.rmtree(root, ignore_errors=True)  # a half-built root of an earlier, killed build
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"lab: Libreswan {version} root {root} ({size // 2**20} MiB) built in {seconds:.0f} s")
    return root


def choose(targets: dict[str, int], say: Callable[[str], None] = print) -> tuple[Path | None, str | None]:
    """For a run whose routers target these majors: the 5.x root (built if need be), or None and
    why not. Nothing is built when no router targets 5."""
    if not any(t >= 5 for t in targets.values()):
        return None, None
    why = unavailable()
    if why:
        return None, why
    try:
        return ensure_root(say), None
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        say(f"lab: no Libreswan 5 root: {e}")
        return None, f"building the Libreswan 5 root failed: {str(e).splitlines()[0]}"
