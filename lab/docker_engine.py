"""The Docker engine the Docker lab's routers run on.

- ``host``: the host's own engine (where the host kernel has ESP): reached as the Docker SDK's
  ``from_env()`` does; the lab only adds and removes what carries its label.
- ``guest``: a private engine started inside the lab kernel (User-Mode Linux here: the host kernel
  has no ESP, and containers share their engine's kernel). Its data-root is a tmpfs, filled from a
  saved, tarred data-root that already holds the router image (seconds, where ``docker load``
  took minutes), and it makes no bridge and no iptables rules: the lab wires the routers itself.
  Everything in it vanishes when the lab kernel powers off.

``python -m lab.docker_engine snapshot ROOTFS_TAR OUT_TAR`` (run inside the lab kernel by
``lab.image``) makes that saved data-root: a fresh engine, ``docker import`` of the root file
system, engine stopped, data-root tarred.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE = Path("/run/wan-lab/docker")  # inside the lab kernel: a tmpfs of its own
# The modules the engine needs beyond the lab's own (guest-init.sh loads ESP, XFRM, veth).
MODULES = ("overlay",)


@dataclass
class Engine:
    client: object
    where: str  # "host" | "guest"
    pid: int = 0  # dockerd's PID (guest only)
    timings: dict[str, float] = field(default_factory=dict)
    log: Path | None = None

    def stop(self) -> None:
        """Stop our own dockerd (guest only; the host's engine is never stopped), by its PID."""
        if self.where != "guest" or not self.pid:
            return
        try:
            self.client.close()
        except Exception:
            pass
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _sh(argv: list[str], timeout: float = 300) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:1500]}")


def _client(base_url: str | None, timeout: float = 120):
    import docker
    # "auto": the engine says which API version it speaks (Debian's 20.10 engine: 1.41)
    if base_url:
        return docker.DockerClient(base_url=base_url, version="auto", timeout=timeout)
    return docker.from_env(version="auto", timeout=timeout)


def host_engine():
    """The host's engine, or None with the reason."""
    try:
        client = _client(None, timeout=10)
        client.ping()
        return client, ""
    except Exception as e:
        return None, f"no Docker engine answers here ({type(e).__name__}: {str(e)[:200]})"


def _prepare_guest() -> None:
    """The kernel side: cgroup v2, the overlay module, writable directories the engine expects."""
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        _sh(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"])
    subprocess.run(["modprobe", "-qa", *MODULES], capture_output=True)
    # dockerd 20.10 writes /etc/docker/key.json; the guest's /etc is the host's, read-only
    if Path("/etc/docker").is_dir():
        _sh(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", "/etc/docker"])
    STATE.mkdir(parents=True, exist_ok=True)
    _sh(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(STATE)])
    for d in ("data", "exec"):
        (STATE / d).mkdir(mode=0o711)


def start_guest_engine(data_root_tar: Path | None, say=print) -> Engine:
    """A private dockerd inside the lab kernel, its data-root restored from `data_root_tar`."""
    timings = {}
    t = time.monotonic()
    _prepare_guest()
    if data_root_tar is not None:
        _sh(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(STATE / "data"), "-xpf", str(data_root_tar)])
    timings["engine restore"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    (STATE / "daemon.json").write_text("{}\n")
    sock = STATE / "docker.sock"
    log = STATE / "dockerd.log"
    argv = ["dockerd", "--config-file", str(STATE / "daemon.json"), "--data-root", str(STATE / "data"),
            "--exec-root", str(STATE / "exec"), "--pidfile", str(STATE / "dockerd.pid"), "--host", f"unix://{sock}",
            "--storage-driver", "overlay2", "--bridge", "none", "--iptables=false", "--ip-masq=false",
            "--userland-proxy=false", "--exec-opt", "native.cgroupdriver=cgroupfs", "--log-level", "warn"]
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = None
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if sock.exists():
            try:
                client = _client(f"unix://{sock}")
                client.ping()
                break
            except Exception:
                client = None
        time.sleep(0.2)
    if client is None:
        proc.kill()
        raise RuntimeError(f"dockerd did not answer within 120 s: {log.read_text()[-2000:]}")
    timings["engine start"] = round(time.monotonic() - t, 2)
    say(f"lab: Docker engine {client.version().get('Version')} up in the lab kernel "
        f"(restore {timings['engine restore']} s, start {timings['engine start']} s)")
    return Engine(client, "guest", proc.pid, timings, log)


def snapshot(rootfs: Path, out: Path) -> None:
    """Inside the lab kernel: a fresh engine, the image imported, the data-root saved to `out`."""
    from lab import docker_image
    engine = start_guest_engine(None)
    try:
        t = time.monotonic()
        docker_image.import_rootfs(engine.client, rootfs)
        print(f"lab: docker import {time.monotonic() - t:.1f} s", flush=True)
    finally:
        engine.stop()
    t = time.monotonic()
    tmp = out.with_name(f".{out.name}.tmp")
    # containerd's runtime state is not part of an image store: leave the engine's contents only
    _sh(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(STATE / "data"), "-cf", str(tmp), "."],
        timeout=900)
    os.replace(tmp, out)
    print(f"lab: data-root saved ({out.stat().st_size // 2**20} MiB) in {time.monotonic() - t:.1f} s", flush=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "snapshot":
    snapshot(Path(sys.argv[2]), Path(sys.argv[3]))
