"""The Docker lab's router image: a Debian root file system with Libreswan, dnsmasq, nftables,
iproute2 and the probe tools, built by the project and cached.

No image can be pulled on the project's machines, so the default way needs no registry:
``debootstrap --variant=minbase`` from the mirror apt already uses, the result tarred
(``rootfs.tar``) and ``docker import``-ed. Where a registry is reachable, ``--base
debian:bookworm-slim`` builds the same recipe with a Dockerfile instead.

Everything is keyed by the hash of the recipe (:data:`RECIPE`): change the recipe and the next
run builds anew; otherwise the cached files are reused. The cache (``~/.cache/wan-lab/docker/<hash>/``):

- ``rootfs.tar``: the root file system (debootstrap's, stripped of docs and apt lists);
- ``data-root.tar``: a whole Docker data-root that holds the imported image, made once inside the
  lab kernel. Restoring it into a fresh engine takes seconds where ``docker load`` took minutes
  in User-Mode Linux (see reference/lab-substrate.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import debian, kernels

IMAGE_REPO = "wan-lab-router"
LABEL = "wan-lab"  # every image, container and network the lab makes carries this label
PACKAGES = ("libreswan", "dnsmasq-base", "nftables", "iproute2", "iputils-ping", "dnsutils", "tcpdump",
            "procps", "ca-certificates")
# Removed after debootstrap: nothing a router needs, a third of the size (every byte is copied
# into the lab kernel's memory on every run).
STRIP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
         "var/lib/apt/lists", "usr/share/zoneinfo")


def _codename() -> str:
    text = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    m = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
    return m.group(1) if m else "bookworm"


RECIPE = {
    "version": 1,
    "suite": os.environ.get("WAN_LAB_DOCKER_SUITE") or _codename(),
    "variant": "minbase",
    "packages": list(PACKAGES),
    "strip": list(STRIP),
    # the container's PID 1: lays nothing itself, waits for the lab (see lab/docker-router.sh)
    "entrypoint": ["/bin/sh", "/run/wan-lab/router.sh"],
}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def image_tag() -> str:
    return f"{IMAGE_REPO}:{recipe_hash()}"


def cache() -> Path:
    return kernels.cache_dir() / "docker" / recipe_hash()


def apt_mirror(suite: str | None = None) -> str:
    """The Debian mirror apt uses here for `suite` (the recipe's by default): debootstrap fetches from it."""
    return debian.mirror(suite or RECIPE["suite"])


def _atomic(path: Path, make: Callable[[Path], None]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def debootstrap(recipe: dict, root: Path, say: Callable[[str], None] = print, what: str = "the router root file system") -> None:
    """A Debian root of `recipe` (suite, variant, packages, strip) in the new directory `root`:
    debootstrap from the mirror apt uses (root, a reachable mirror), then the recipe's strip list
    removed. Shared by the Docker router image and the Libreswan 5 root (lab/libreswan5.py).
    Raises RuntimeError with debootstrap's last log lines when it fails."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: apt-get install debootstrap (./run installs it)")
    if os.geteuid() != 0:
        raise RuntimeError(f"building {what} needs root (debootstrap)")
    mirror = apt_mirror(recipe["suite"])
    say(f"lab: building {what} with debootstrap {recipe['suite']} from {mirror} (once, minutes)")
    t0 = time.monotonic()
    first = ["debootstrap", f"--variant={recipe['variant']}", f"--include={','.join(recipe['packages'])}"]
    if recipe.get("no_daemons"):
        # a root with daemons that must never start on the host (firewalld would take over its firewall):
        # the packages are fetched and unpacked first (--foreign), then configured in the root with a
        # policy-rc.d that refuses every start (invoke-rc.d and deb-systemd-invoke ask it: exit 101 =
        # "action forbidden", Debian policy 9.3.3 and /usr/share/doc/init-system-helpers/README.policy-rc.d)
        # and in a network namespace of its own, so nothing a maintainer script runs reaches the host's.
        stages = [first + ["--foreign", recipe["suite"], str(root), mirror],
                  ["unshare", "--net", "--mount", "--propagation", "private",
                   "chroot", str(root), "/debootstrap/debootstrap", "--second-stage"]]
    else:
        stages = [first + [recipe["suite"], str(root), mirror]]
    for k, argv in enumerate(stages):
        if k == 1:
            rc = root / "usr/sbin/policy-rc.d"
            rc.write_text("#!/bin/sh\n# the lab's root: no daemon starts from a maintainer script\nexit 101\n")
            rc.chmod(0o755)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        last = 0.0
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            # debootstrap's own phases (I: Retrieving, Validating, Unpacking, Configuring), one line every 10 s at most
            if line.startswith("I: ") and time.monotonic() - last >= 10:
                last = time.monotonic()
                say(f"lab: debootstrap {recipe['suite']} ({time.monotonic() - t0:.0f} s): {line[3:].strip()}")
        if proc.wait() != 0:
            log = root / "debootstrap/debootstrap.log"
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else "\n".join(tail)
            raise RuntimeError(f"debootstrap {recipe['suite']} into {root} failed (exit {proc.returncode}); "
                               f"check the mirror {mirror} ($WAN_LAB_DEBIAN_MIRROR) and the space free there:\n{detail}")
    for rel in recipe["strip"]:
        shutil.rmtree(root / rel, ignore_errors=True)


def build_rootfs(say: Callable[[str], None] = print) -> Path:
    """``rootfs.tar`` of the recipe, built once with debootstrap (root, a reachable Debian mirror)."""
    out = cache() / "rootfs.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        debootstrap(RECIPE, root, say, "the Docker router image")
        # the router's own lab files go to /run/wan-lab at start; the directory must exist
        (root / "run/wan-lab").mkdir(parents=True, exist_ok=True)
        _atomic(out, lambda tmpf: subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root), "-cf", str(tmpf), "."],
            check=True))
    say(f"lab: root file system {out} ({out.stat().st_size // 2**20} MiB) in {time.monotonic() - t0:.0f} s")
    return out


def dockerfile(base: str) -> str:
    """The same recipe from a registry's Debian image (where one can be pulled)."""
    strip = " ".join(f"/{p}" for p in RECIPE["strip"])
    return (f"FROM {base}\n"
            "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            f"{' '.join(RECIPE['packages'])} && rm -rf {strip} && mkdir -p /run/wan-lab\n"
            f"LABEL {LABEL}=image {LABEL}.recipe={recipe_hash()}\n"
            f"ENTRYPOINT {json.dumps(RECIPE['entrypoint'])}\n")


def import_rootfs(client, rootfs: Path) -> None:
    """``docker import`` of the root file system. The SDK sends a file object unframed under a
    "chunked" header (the engine answers "invalid byte in chunk length"): a generator is framed."""
    repo, _, tag = image_tag().partition(":")
    with open(rootfs, "rb") as f:
        client.api.import_image_from_stream(iter(lambda: f.read(1 << 20), b""), repository=repo, tag=tag,
                                            changes=import_changes())


def import_changes() -> list[str]:
    return [f"LABEL {LABEL}=image {LABEL}.recipe={recipe_hash()}", f"ENTRYPOINT {json.dumps(RECIPE['entrypoint'])}"]


def ensure_image(client, say: Callable[[str], None] = print, base: str | None = None) -> str:
    """The image in this engine (the host's, where the host kernel has ESP): imported from
    ``rootfs.tar``, or built from `base` with a Dockerfile. Returns its tag."""
    import docker
    tag = image_tag()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    t0 = time.monotonic()
    if base:
        say(f"lab: building {tag} from {base}")
        client.images.build(fileobj=io.BytesIO(dockerfile(base).encode()), tag=tag, rm=True, forcerm=True,
                            labels={LABEL: "image"})
    else:
        rootfs = build_rootfs(say)
        say(f"lab: docker import {rootfs} as {tag}")
        import_rootfs(client, rootfs)
    say(f"lab: image {tag} ready in {time.monotonic() - t0:.0f} s")
    return tag


def ensure_data_root(say: Callable[[str], None] = print) -> Path:
    """``data-root.tar``: a Docker data-root holding the image, made once in a User-Mode Linux
    kernel (the engine that restores it runs there too). The caller holds the lab lock."""
    out = cache() / "data-root.tar"
    if out.exists():
        return out
    rootfs = build_rootfs(say)
    say("lab: saving a Docker data-root with the image, in the lab kernel (once)")
    repo = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    argv = [sys.executable, "-m", "lab.docker_engine", "snapshot", str(rootfs), str(out)]
    t0 = time.monotonic()
    run = kernels.run_in_guest("uml", argv, out.parent, cwd=repo, env=env, timeout=1800, mem_mb=2048,
                               on_line=lambda line: say(line) if line.startswith("lab: ") else None)
    if run.exit_code != 0 or not out.exists():
        raise RuntimeError(f"saving the Docker data-root failed (exit {run.exit_code}):\n{run.console[-3000:]}")
    say(f"lab: data-root {out} ({out.stat().st_size // 2**20} MiB) in {time.monotonic() - t0:.0f} s")
    return out
