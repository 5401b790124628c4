"""Docker routers for the lab: every site router is a container of the lab's router image.

The rest of the lab is the netns lab's (lab/engine.py): the same plan, the same "internet",
LAN hosts and DNS servers (network namespaces), the same probes, checks, report and diagnostics.
What differs is the router:

- a container (own file system, own PID namespace, only the capabilities in :data:`CAPS`), with
  the router's rendered tree copied to its real paths before it starts;
- its network namespace is the container's: created with ``network_mode=none`` and wired by the
  lab exactly as a netns router (``wan`` veth to the internet, one bridge per LAN with its host and
  DNS server), so both labs prove the same topology. Docker's own bridge networks are not used:
  each would put the engine's namespace on every LAN as a gateway and add NAT and isolation
  rules a real WAN does not have;
- its PID 1 is lab/docker-router.sh, which starts NSS, the firewall, dnsmasq and the XFRM stack,
  then pluto as ipsec.service does, when the lab says so (responders first).

Everything the lab creates carries the label ``wan-lab=<prefix>`` and is removed by that label
at the end; nothing else in the engine is touched.
"""
from __future__ import annotations

import errno
import io
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import docker_engine, docker_image
from .contracts import LabPlan, SitePlan
from .network import Network
from .platform import dnsmasq_base, dnsmasq_conf, enrolled_files, firewall_text
from .proc import LabError, log, progress, run
from .routers import ESTABLISHED_RE, STALE_LOCK, WHACK, BootWaits, parse_spis, parse_traffic, pids_in_mount_ns

HERE = Path(__file__).resolve().parent
INSIDE = Path("/run/wan-lab")  # the lab's files inside a router container
# pluto (XFRM, routes via _updown), nft and the bridges: NET_ADMIN; IKE on 500/4500 and dnsmasq on
# 53: NET_BIND_SERVICE; dnsmasq keeps NET_RAW; the NSS database and file ownership: CHOWN, FOWNER,
# DAC_OVERRIDE; dnsmasq and pluto switch user ids: SETUID, SETGID; pluto trims its own bounding set
# and audits IKE (libcap-ng): SETPCAP, AUDIT_WRITE. Nothing else: Docker's default set minus FSETID,
# MKNOD, SETFCAP, SYS_CHROOT and KILL, plus NET_ADMIN (and --privileged fails on these hosts anyway).
CAPS = ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW", "CHOWN", "FOWNER", "DAC_OVERRIDE", "SETUID", "SETGID",
        "SETPCAP", "AUDIT_WRITE"]


NSS_INSIDE = "var/lib/ipsec/nss"  # Debian's and RHEL's NSS database, where pluto looks (lab/docker-router.sh)


def _tar(files: dict[str, tuple[bytes, int]], tree: Path, nss: Path | None = None) -> bytes:
    """One archive for put_archive: the router tree's etc/ at /etc, the router's own NSS database
    (its lab key pair, lab/keys.py; directory 0700, files 0600) at /var/lib/ipsec/nss, plus the
    lab's own files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def owned_by_root(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            return ti

        def private(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.mode = 0o700 if ti.isdir() else 0o600
            return owned_by_root(ti)
        for p in sorted((tree / "etc").rglob("*")):
            tar.add(p, arcname=str(p.relative_to(tree)), recursive=False, filter=owned_by_root)
        if nss is not None:
            tar.add(nss, arcname=NSS_INSIDE, recursive=False, filter=private)
            for p in sorted(nss.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    tar.add(p, arcname=f"{NSS_INSIDE}/{p.name}", recursive=False, filter=private)
        for name, (data, mode) in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class DockerRouter(BootWaits):
    """A RouterHost in a container: its PID 1 is lab/docker-router.sh; the lab enters it by that PID."""
    boot_files = property(lambda self: self.dir)  # where its setup writes prepared, ready

    def __init__(self, site: SitePlan, fleet: DockerFleet):
        self.site = site
        self.fleet = fleet
        self.container = None
        self.pid = 0
        self.log_offset = 0

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def dir(self) -> Path:
        return Path(f"/proc/{self.pid}/root{INSIDE}")

    def install(self, tree: str) -> None:
        """Create and start the container with the router's tree at its real paths."""
        f = self.fleet
        base = dnsmasq_base(self.site, f.plan.infra.isp_resolver, INSIDE)
        files = {f"{str(INSIDE)[1:]}/router.sh": ((HERE / "docker-router.sh").read_bytes(), 0o755),
                 f"{str(INSIDE)[1:]}/dnsmasq.conf": (dnsmasq_conf(self.site.platform, base, Path(tree)).encode(), 0o644)}
        files |= enrolled_files(self.site.platform)  # the programs (and OpenWrt's hooks), as enrol leaves them
        if f.plan.firewall:
            fw = firewall_text(self.site.platform, Path(tree), tuple(lan.bridge for lan in self.site.lans))
            files[f"{str(INSIDE)[1:]}/firewall.nft"] = (fw.encode(), 0o644)
        c = f.engine.client.containers.create(
            f.plan.docker.image, name=f"{f.plan.prefix}-{self.name}", hostname=self.name,
            labels=f.label, network_mode="none", cap_drop=["ALL"], cap_add=CAPS,
            sysctls={"net.ipv4.ip_forward": "1"}, detach=True)
        c.put_archive("/", _tar(files, Path(tree), Path(self.site.nss) if self.site.nss else None))
        c.start()
        c.reload()
        self.container, self.pid = c, c.attrs["State"]["Pid"]

    def wait_started(self, timeout: float = 60) -> None:
        self._wait_for(lambda: (self.dir / "started").exists(), "started", timeout)

    def boot(self) -> None:
        self._tell("wired")



    def start_pluto(self) -> None:
        self._tell("go")

    def _pluto_log(self) -> str:
        try:
            return (self.dir / "pluto.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""



    def alive(self) -> bool:
        return bool(self.pid) and Path(f"/proc/{self.pid}").exists() and not (self.dir / "failed").exists()

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--"]

    def exec(self, argv, *, check=False, timeout=60, env=None):
        pre = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run(["nsenter", "-t", str(self.pid), "-m", "-n", "--", *pre, *argv], check=check, timeout=timeout)

    def whack(self, *args: str, timeout: float = 60):
        return run([WHACK, "--ctlsocket", f"/proc/{self.pid}/root/run/pluto/pluto.ctl", *args], check=False, timeout=timeout)

    def traffic(self) -> dict[str, dict]:
        return parse_traffic(self.whack("--trafficstatus").stdout)

    def spis(self) -> dict[str, set[str]]:
        return parse_spis(self.whack("--status").stdout)

    def established(self) -> set[str]:
        return set(ESTABLISHED_RE.findall(self._pluto_log()))

    def pids(self, process: str) -> list[int]:
        return pids_in_mount_ns(self.pid, process) + ([self.pid] if process == "router.sh" else [])

    def logs(self) -> dict[str, str]:
        out = {}
        for f in ("pluto.log", "dnsmasq.log", "setup.log"):
            try:
                out[f] = (self.dir / f).read_text(errors="replace")
            except (FileNotFoundError, PermissionError):
                pass
        return out

    def reload_env(self) -> dict[str, str]:
        raise LabError("fetch and reconcile run on netns routers only (the change and release scenarios)")

    def stop(self) -> None:
        self.whack("--shutdown")

    def start_ipsec(self) -> None:
        pluto = f"exec /usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile {INSIDE}/pluto.log"
        self.exec(["sh", "-c", STALE_LOCK + pluto],
                  check=True)

    def kill(self, process: str) -> list[int]:
        pids = self.pids(process)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return pids

    def reboot(self) -> None:
        raise LabError("reboot is offered for netns routers only (a container restart makes a new namespace)")

    def cut_wan(self) -> None:
        self.fleet.network.cut_wan(self.site)

    def restore_wan(self) -> None:
        self.fleet.network.restore_wan(self.site)

    def teardown(self) -> None:
        pass  # the fleet removes the containers by label

    def _tell(self, fifo: str, timeout: float = 60) -> None:
        """Write to one of the router script's FIFOs without hanging on a script that died."""
        path = self.dir / fifo
        end = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: nobody reads yet
                if e.errno != errno.ENXIO or not self.alive() or time.monotonic() > end:
                    raise LabError(f"router {self.name}: its setup does not wait for '{fifo}' ({e})") from e
                time.sleep(0.05)
        try:
            os.write(fd, f"{fifo}\n".encode())
        finally:
            os.close(fd)


class DockerFleet:
    """The engine and the containers of a Docker lab; the routers' namespaces are attached under
    the names the netns lab uses, so the network is wired exactly as for netns routers."""

    def __init__(self, plan: LabPlan, network: Network):
        self.plan = plan
        self.network = network
        self.engine: docker_engine.Engine | None = None
        self.label = {docker_image.LABEL: plan.prefix}
        self.timings: dict[str, float] = {}

    def start_engine(self) -> None:
        d = self.plan.docker
        if d.engine == "guest":
            self.engine = docker_engine.start_guest_engine(Path(d.data_root), say=lambda m: print(m, flush=True))
        else:
            client, why = docker_engine.host_engine()
            if client is None:
                raise LabError(why)
            docker_image.ensure_image(client, say=lambda m: print(m, flush=True))
            self.engine = docker_engine.Engine(client, "host")
        self.timings.update(self.engine.timings)

    def start_containers(self, trees: dict[str, str]) -> dict[str, DockerRouter]:
        sites = self.plan.network_sites
        routers = {s.name: DockerRouter(s, self) for s in sites}
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(lambda s: routers[s.name].install(trees.get(s.name, s.tree)), sites))
        for k, s in enumerate(sites, 1):
            routers[s.name].wait_started()
            progress("containers", k, len(sites), s.name)
        # the router's namespace is the container's: give it the name the netns lab uses
        run(["ip", "-batch", "-"], input="".join(f"netns attach {s.router_ns} {routers[s.name].pid}\n" for s in sites))
        self.network.namespaces += [s.router_ns for s in sites]
        return routers

    def note(self) -> str:
        return (f"routers: {len(self.plan.network_sites)} containers of {self.plan.docker.image} "
                f"({'the host' if self.engine.where == 'host' else 'an engine inside the lab kernel'}), "
                f"capabilities {','.join(CAPS)}")

    def teardown(self) -> None:
        """Containers by label (their namespaces go with them), then our own engine (inside the lab
        kernel; the host's engine keeps running)."""
        if self.engine is None:
            return
        try:
            for c in self.engine.client.containers.list(all=True, filters={"label": f"{docker_image.LABEL}={self.plan.prefix}"}):
                c.remove(force=True)
        except Exception as e:  # the lab's own namespaces and the engine must still go
            log(f"removing the lab's containers failed: {e}")
        self.engine.stop()


def cleanup_host_engine(prefix: str) -> None:
    """After a Docker lab on the host's engine (killed or not): its labelled containers go."""
    client, _ = docker_engine.host_engine()
    if client is None:
        return
    for c in client.containers.list(all=True, filters={"label": f"{docker_image.LABEL}={prefix}"}):
        c.remove(force=True)
