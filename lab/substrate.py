"""Where a lab runs: the kernel (host, QEMU, User-Mode Linux) and router kind chosen for a request,
and the machine-wide lock that keeps to one lab kernel at a time."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import docker_engine, kernels
from .proc import LabError

KINDS = ("host", "qemu", "uml")
ROUTERS = ("netns", "docker")


class KernelUnavailable(LabError):
    """No kernel (or engine) that the request asks for can run here; the message says what to install."""


_lock_depth = 0
LOCK_HELD = "WAN_LAB_LOCK_HELD"  # the pid holding the lock, for the processes it starts


@contextlib.contextmanager
def one_lab_at_a_time(say: Callable[[str], None]):
    """Hold a machine-wide lock while a lab kernel runs. Two labs at once on a small machine starve
    each other's IKE exchanges (a QEMU lab under contention lost a Child SA), so a second run waits.
    Re-entrant within a process: a test session may hold it across all its labs."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    path = kernels.cache_dir() / "lab.lock"
    held = os.environ.get(LOCK_HELD)
    try:
        by_parent = bool(held) and path.read_text().strip() == f"pid {held}" and alive(int(held))
    except (OSError, ValueError):
        by_parent = False
    if by_parent:  # a process of ours that holds it started this one (lab.up's background lab)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            say(f"lab: another lab is running ({f.read().strip() or 'unknown'}); waiting for it to finish")
            while True:  # polled, not a blocking flock: ^C (SIGINT) ends the wait at once under invoke too
                time.sleep(0.5)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        _lock_depth = 1
        os.environ[LOCK_HELD] = str(os.getpid())
        try:
            yield
        finally:
            _lock_depth = 0
            os.environ.pop(LOCK_HELD, None)
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)



def installed_libreswan_version() -> str:
    """The lab kernel's own Libreswan (the host's: "4.10" on Debian 12)."""
    r = subprocess.run(["ipsec", "--version"], capture_output=True, text=True)
    m = re.search(r"Libreswan (?:U)?(\d+\.[0-9.]+\w*)", r.stdout + r.stderr)
    if not m:
        raise KernelUnavailable("Libreswan is not installed: apt-get install libreswan (./run does it)")
    return m.group(1)


def installed_libreswan_major() -> int:
    return int(installed_libreswan_version().split(".")[0])


def choose_kernel(wanted: str | None) -> str:
    """The kernel to run in: the one asked for, else host where it has ESP, else QEMU."""
    avail = kernels.available_kernels()
    if wanted:
        if wanted not in KINDS:
            raise KernelUnavailable(f"--kernel {wanted}: choose one of {', '.join(KINDS)}")
        if avail[wanted] is not None:
            raise KernelUnavailable(f"--kernel {wanted} cannot run here: {avail[wanted]}")
        return wanted
    if os.geteuid() == 0 and avail["host"] is None:
        return "host"
    if avail["qemu"] is None:
        return "qemu"
    if avail["uml"] is None:
        return "uml"
    raise KernelUnavailable("no kernel with ESP can run the lab here:\n" + "\n".join(f"  {k}: {v}" for k, v in avail.items()))


def choose_docker_kernel(wanted: str | None) -> str:
    """Docker routers share their engine's kernel: the host's engine where the host kernel has
    ESP, else an engine started inside User-Mode Linux (the recipe of reference/lab-substrate.md)."""
    if wanted not in (None, "host", "uml"):
        raise KernelUnavailable(f"--routers docker runs on --kernel host or uml, not {wanted}")
    avail = kernels.available_kernels()
    if wanted != "uml" and os.geteuid() == 0 and avail["host"] is None:
        client, why = docker_engine.host_engine()
        if client is not None:
            return "host"
        if wanted == "host":
            raise KernelUnavailable(f"--kernel host --routers docker: {why}")
    elif wanted == "host":
        raise KernelUnavailable(f"--kernel host cannot run here: {avail['host']}")
    if avail["uml"] is not None:
        raise KernelUnavailable(f"--routers docker needs a kernel with ESP: {avail['uml']}")
    if shutil.which("dockerd") is None:
        raise KernelUnavailable("--routers docker needs the Docker engine: apt-get install docker.io (./run does it)")
    return "uml"



def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of nobody we know is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def cleanup_host(prefix: str) -> None:
    """After a lab on the host kernel (killed or not): end the processes still running in the
    lab's own namespaces and delete those namespaces. A lab kernel needs none of this: powering it
    off ends everything in it."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    ours = [ns for ns in listed if re.fullmatch(rf"{prefix}(inet|r\d+|d\d+|h\d+x\d+)", ns)]
    for ns in ours:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (OSError, ValueError):
                pass
    for ns in ours:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
