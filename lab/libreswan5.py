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

from collections.abc import Callable
from pathlib import Path

from . import docker_image, roots

# What a 5.x router needs inside: pluto and its tools (bind9-host: libreswan depends on the virtual
# package `host`, which debootstrap does not resolve by itself; certutil for the NSS database), the
# router programs' tools (router/fetch, router/reconcile:
# sh, curl, jq, signify, flock, logger, sha256sum, tar, gzip), ip, nft, and dnsmasq for the DNS model.
PACKAGES = ("libreswan", "bind9-host", "libnss3-tools", "iproute2", "nftables", "dnsmasq-base", "busybox", "procps",
            "iputils-ping", "curl", "jq", "signify-openbsd", "ca-certificates")

# firewalld with its D-Bus system bus, for the EL routers of the QEMU lab (lab/firewalld.py says why each
# package); in this root too, so a Libreswan 5.x EL router runs Debian 13's firewalld (2.x, the major
# EL 10 ships, which also ships Libreswan 5) as the 4.x ones run Debian 12's 1.3.3
FIREWALLD = ("firewalld", "dbus", "libpam-systemd", "radvd")

RECIPE = {
    "version": 1,
    "suite": "trixie",  # Debian 13: Libreswan 5.2, firewalld 2.x
    "variant": "minbase",
    "packages": [*PACKAGES, *FIREWALLD],
    "strip": list(docker_image.STRIP),
    # firewalld's and dbus's maintainer scripts must start nothing on the build host (docker_image.debootstrap)
    "no_daemons": True,
}
META = roots.META  # in the root: the recipe, the Libreswan version, build time and size


def _probe(root: Path) -> dict:
    version = roots.libreswan_version(root, "the Libreswan 5 root")
    if not version.startswith("5."):
        raise RuntimeError(f"the {RECIPE['suite']} root has Libreswan {version}, not 5.x")
    return {"libreswan": version, "firewalld": roots.firewalld_version(root, "the Libreswan 5 root")}


# lab/roots.py builds and caches it
ROOT = roots.Root(recipe=RECIPE, label="the Libreswan 5 root", probe=_probe,
                  files={roots.SYSTEMCTL: (roots.SYSTEMCTL_PLACEHOLDER, 0o755)}, switch="WAN_LAB_LIBRESWAN5")


def recipe_hash() -> str:
    return ROOT.recipe_hash()


def root_dir() -> Path:
    return ROOT.root_dir()


def wanted() -> bool:
    return ROOT.wanted()


def built() -> Path | None:
    """The root if it is built (its metadata file is written last)."""
    return ROOT.built()


def meta(root: Path) -> dict:
    return roots.meta(root)


def unavailable() -> str | None:
    """Why no 5.x root can be used in this run, None if one can (built, or buildable here)."""
    return ROOT.unavailable()


def ensure_root(say: Callable[[str], None] = print) -> Path:
    """The root, built once per recipe (lab/roots.py Root.ensure). Raises RuntimeError naming what failed."""
    return ROOT.ensure(say)


def choose(targets: dict[str, int], say: Callable[[str], None] = print) -> tuple[Path | None, str | None]:
    """For a run whose routers target these majors: the 5.x root (built if need be), or None and
    why not. Nothing is built when no router targets 5."""
    if not any(t >= 5 for t in targets.values()):
        return None, None
    return ROOT.obtain(say)
