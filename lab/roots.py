"""Lab roots: Debian root file systems built by the project with debootstrap (lab/docker_image.py's
builder) and cached as directories on the host, which both lab kernels see at the same path (they
boot the host's / read-only). A router's holder (lab/router-setup.sh) chroots into one.

Two exist: the Libreswan 5 root (lab/libreswan5.py: Debian 13, Libreswan 5.2) and the firewalld root
(lab/firewalld.py: Debian 12 with firewalld and D-Bus, for the EL routers of the QEMU lab). Each is a
`Root`: its recipe (its hash keys the cache directory, ~/.cache/wan-lab/root-<suite>[-<name>]-<hash>/),
what its routers' holders bind over, and a probe that reads the versions that matter from the built
root into its metadata file (written last: a root without it is not built).
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
from dataclasses import dataclass, field
from pathlib import Path

from . import docker_image, kernels

META = "wan-lab-root.json"  # in the root: the recipe, the probed versions, build time and size
# mount points and directories a router's holder binds over (lab/router-setup.sh)
MOUNT_POINTS = ("run/wan-lab", "var/lib/ipsec/nss", "var/prometheus", "wanhost")
# where a firewalld router's holder binds lab/el-systemctl (a placeholder in the root, so the stand-in
# can change without a rebuild): in every root that carries firewalld
SYSTEMCTL = "usr/local/sbin/systemctl"
SYSTEMCTL_PLACEHOLDER = "#!/bin/sh\n# lab/router-setup.sh binds lab/el-systemctl over this file\nexit 1\n"


def firewalld_version(root: Path, label: str) -> str:
    """The firewalld version a built root carries ("" if it has none)."""
    if not (root / "usr/sbin/firewalld").exists():
        return ""
    fw = run_in(root, ["python3", "-c", "import firewall.config as c; print(c.VERSION)"], label).strip()
    if not fw or not fw[0].isdigit():
        raise RuntimeError(f"{label} {root}: firewalld's version reads {fw!r}")
    return fw


@dataclass
class Root:
    recipe: dict  # suite, variant, packages, strip (and no_daemons): docker_image.debootstrap's input
    label: str  # "the Libreswan 5 root": in progress lines and errors
    name: str = ""  # part of the directory name after the suite ("fw": root-bookworm-fw-<hash>)
    # the built root -> what the metadata records of it (versions); raises RuntimeError when it is wrong
    probe: Callable[[Path], dict] = field(default=lambda root: {})
    # files written into the root after debootstrap: path in the root -> (text, mode); part of the hash
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    switch: str = ""  # the environment variable that, set to 0, keeps the lab from using this root

    def wanted(self) -> bool:
        return not self.switch or os.environ.get(self.switch, "1") != "0"

    def unavailable(self) -> str | None:
        """Why this root cannot be used in this run, None if it can (built, or buildable here)."""
        return f"{self.switch}=0" if not self.wanted() else self.buildable()

    def obtain(self, say: Callable[[str], None] = print) -> tuple[Path | None, str | None]:
        """The root, built if need be, or None and why not (the verdict says it)."""
        why = self.unavailable()
        if why:
            return None, why
        try:
            return self.ensure(say), None
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            say(f"lab: no {self.label.removeprefix('the ')}: {e}")
            return None, f"building {self.label} failed: {str(e).splitlines()[0]}"

    def recipe_hash(self) -> str:
        doc = {**self.recipe, **({"files": self.files} if self.files else {})}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def root_dir(self) -> Path:
        middle = f"-{self.name}" if self.name else ""
        return kernels.cache_dir() / f"root-{self.recipe['suite']}{middle}-{self.recipe_hash()}"

    def built(self) -> Path | None:
        """The root if it is built (its metadata file is written last)."""
        root = self.root_dir()
        return root if (root / META).exists() else None

    def buildable(self) -> str | None:
        """Why this root can be neither used nor built here, None if it can."""
        if self.built():
            return None
        if shutil.which("debootstrap") is None:
            return "debootstrap is not installed (./run installs it; apt-get install debootstrap)"
        if os.geteuid() != 0:
            return f"building {self.label} needs root (debootstrap)"
        return None

    def ensure(self, say: Callable[[str], None] = print) -> Path:
        """The root, built once per recipe (minutes; the caller may hold the lab lock, another process
        building the same root is waited for). Raises RuntimeError naming what failed."""
        root = self.root_dir()
        if self.built():
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.built():
                return root
            t0 = time.monotonic()
            tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                docker_image.debootstrap(self.recipe, tmp, say, f"{self.label} ({self.recipe['suite']})")
                for d in MOUNT_POINTS:
                    (tmp / d).mkdir(parents=True, exist_ok=True)
                for rel, (text, mode) in self.files.items():
                    f = tmp / rel
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_text(text)
                    f.chmod(mode)
                probed = self.probe(tmp)
                size = int(subprocess.run(["du", "-sxk", str(tmp)], capture_output=True, text=True).stdout.split()[0]) * 1024
                seconds = round(time.monotonic() - t0, 1)
                (tmp / META).write_text(json.dumps({"recipe": self.recipe, "hash": self.recipe_hash(), **probed,
                                                    "build_seconds": seconds, "bytes": size}, indent=1) + "\n")
                shutil.rmtree(root, ignore_errors=True)  # a half-built root of an earlier, killed build
                os.rename(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            say(f"lab: {self.label} {root} ({size // 2**20} MiB, {', '.join(f'{k} {v}' for k, v in probed.items())}) "
                f"built in {seconds:.0f} s")
        return root


def meta(root: Path) -> dict:
    return json.loads((Path(root) / META).read_text())


def run_in(root: Path, argv: list[str], what: str) -> str:
    """`argv` run in the root (chroot, no network needed); its output, or RuntimeError naming `what`."""
    r = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{what} {root}: `{' '.join(argv)}` exited {r.returncode}: {(r.stdout + r.stderr).strip()[:300]!r}")
    return r.stdout


def libreswan_version(root: Path, label: str) -> str:
    """`ipsec --version` of the root's Libreswan, run in the root ("Libreswan 5.2" -> "5.2")."""
    out = run_in(root, ["/usr/sbin/ipsec", "--version"], label)
    words = out.split()
    if len(words) < 2 or words[0] != "Libreswan":
        raise RuntimeError(f"{label} {root}: `ipsec --version` answered {out.strip()[:200]!r}")
    return words[1]
