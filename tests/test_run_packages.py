"""./run's choice of Debian packages (tools/choose-packages) against recorded package lists of
Debian 12 and Ubuntu 24.04, under every shell it must run in; and ./run calling apt only when a
needed package is missing (apt-get, apt-cache and dpkg-query are stand-ins there: installing
packages for real is what CI's fresh machine does)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import REPO

CHOOSE = REPO / "tools/choose-packages"
DEBIAN12 = REPO / "tests/data/pkgnames-debian12.txt"
NOBLE = REPO / "tests/data/pkgnames-ubuntu2404.txt"
SHELLS = [s for s in (["dash"], ["bash", "--posix"], ["busybox", "sh"]) if shutil.which(s[0])]
BASE = ["python3", "python3-venv", "libreswan", "dnsmasq-base", "nftables", "iproute2", "busybox-static", "kmod",
        "iputils-ping", "bind9-dnsutils", "tcpdump", "signify-openbsd", "procps", "util-linux", "cpio", "gzip", "curl",
        "nodejs", "docker.io optional", "debootstrap"]


def choose(shell: list[str], listing: str | Path, *args: str) -> subprocess.CompletedProcess:
    text = listing.read_text() if isinstance(listing, Path) else listing
    return subprocess.run([*shell, str(CHOOSE), *args], input=text, capture_output=True, text=True)


@pytest.fixture(params=SHELLS, ids=lambda s: s[0])
def shell(request):
    return request.param


def test_debian_12_gets_everything_with_both_lab_kernels_optional(shell):
    r = choose(shell, DEBIAN12)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == BASE + ["user-mode-linux optional", "qemu-system-x86 optional"]


def test_ubuntu_noble_has_no_user_mode_linux_and_needs_no_update(shell):
    r = choose(shell, NOBLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == BASE + ["qemu-system-x86 optional"]
    assert "skipped user-mode-linux" in r.stderr


def test_the_lab_kernel_in_use_decides_uml_and_qemu(shell):
    uml = choose(shell, DEBIAN12, "--kernel", "uml")
    assert uml.returncode == 0 and "user-mode-linux" in uml.stdout.splitlines() and "qemu-system-x86" not in uml.stdout
    qemu = choose(shell, NOBLE, "--kernel=qemu")
    assert qemu.returncode == 0 and "qemu-system-x86" in qemu.stdout.splitlines() and "user-mode-linux" not in qemu.stdout
    host = choose(shell, NOBLE, "--kernel", "host")
    assert host.returncode == 0 and host.stdout.splitlines() == BASE
    # the UML lab asked for where the distribution has no UML: an answer, not an endless apt-get update
    no_uml = choose(shell, NOBLE, "--kernel", "uml")
    assert no_uml.returncode == 3 and "apt knows no user-mode-linux" in no_uml.stderr
    assert choose(shell, NOBLE, "--kernel", "kvm").returncode == 2


def test_alternatives_and_missing_lists(shell):
    old = "\n".join(l for l in NOBLE.read_text().splitlines() if l != "bind9-dnsutils")
    assert "dnsutils" in choose(shell, old).stdout.splitlines()  # dig from the transitional name
    # the lab builds its Libreswan 5 root with debootstrap: required, so a fresh machine gets it
    no_debootstrap = "\n".join(line for line in DEBIAN12.read_text().splitlines() if line != "debootstrap")
    r = choose(shell, no_debootstrap)
    assert r.returncode == 3 and "apt knows no debootstrap" in r.stderr
    empty = choose(shell, "")  # a fresh machine whose apt has no lists yet
    assert empty.returncode == 3 and "apt knows no libreswan" in empty.stderr


def test_the_kernel_image_the_qemu_lab_can_fetch(shell):
    assert choose(shell, DEBIAN12, "--kernel-image").stdout == "linux-image-amd64\n"
    assert choose(shell, NOBLE, "--kernel-image").stdout == "linux-image-generic\n"
    assert choose(shell, "linux-image-6.8.0-1007-azure\nlinux-image-azure\n", "--kernel-image").stdout == "linux-image-azure\n"
    assert choose(shell, "linux-headers-generic\n", "--kernel-image").returncode == 3


def _stub_bin(tmp: Path, installed: list[str], listing: str) -> dict:
    """apt-get, apt-cache and dpkg-query stand-ins: they log every call; `apt-get update` makes the
    full Debian 12 list known; dpkg-query reports `installed`."""
    b = tmp / "bin"
    b.mkdir(parents=True)
    log, lists = tmp / "apt.log", tmp / "lists"
    lists.write_text(listing)
    (b / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {log}\n'
                               f'[ "$1" = update ] && cp {DEBIAN12} {lists}\nexit 0\n')
    (b / "apt-cache").write_text(f'#!/bin/sh\necho "apt-cache $*" >> {log}\n'
                                 f'if [ -n "${{2:-}}" ]; then grep "^$2" {lists}; else cat {lists}; fi\nexit 0\n')
    (b / "dpkg-query").write_text("#!/bin/sh\n" + "".join(f'echo "ii  {p}"\n' for p in installed))
    for f in b.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "LOG": str(log)}


def _run_list(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    # `--list` first: invoke lists the tasks (or refuses the extra flags) and never starts a lab
    r = subprocess.run(["sh", str(REPO / "run"), "--list", *args], capture_output=True, text=True, env=env, cwd=REPO)
    log = Path(env["LOG"])
    return r, (log.read_text().splitlines() if log.exists() else [])


@pytest.mark.skipif(os.geteuid() != 0 or not (REPO / ".venv/bin/invoke").exists(), reason="./run installs as root")
def test_run_calls_apt_only_when_a_needed_package_is_missing(tmp_path):
    everything = [l.split()[0] for l in BASE] + ["user-mode-linux", "qemu-system-x86"]
    # all there: no apt at all (the kernel image is known to apt's lists)
    r, calls = _run_list(_stub_bin(tmp_path / "a", everything, DEBIAN12.read_text()))
    assert r.returncode == 0, r.stderr
    assert not [c for c in calls if c.startswith("apt-get")], calls
    # libreswan missing, apt knows it: installed without an update
    r, calls = _run_list(_stub_bin(tmp_path / "b", [p for p in everything if p != "libreswan"], DEBIAN12.read_text()))
    assert r.returncode == 0, r.stderr
    gets = [c for c in calls if c.startswith("apt-get")]
    assert gets == ["apt-get install -y -qq --no-install-recommends libreswan"], gets
    # a fresh machine: apt knows nothing yet, so one update, then one install of what is missing
    r, calls = _run_list(_stub_bin(tmp_path / "c", [], ""), "--kernel", "uml")
    gets = [c for c in calls if c.startswith("apt-get")]
    assert gets[0] == "apt-get update -qq" and gets.count("apt-get update -qq") == 1, gets
    assert gets[1].startswith("apt-get install") and "user-mode-linux" in gets[1] and "libreswan" in gets[1], gets
