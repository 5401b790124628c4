"""Docker routers for the lab: every site router is a container of the lab's router image.

The rest of the lab is the netns lab's (lab/inner.py): the same plan, the same "internet",
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

from lab import docker_engine, docker_image
from lab.inner import Lab, log, progress, run

HERE = Path(__file__).resolve().parent
INSIDE = Path("/run/wan-lab")  # the lab's files inside a router container
# pluto (XFRM, routes via _updown), nft and the bridges: NET_ADMIN; IKE on 500/4500 and dnsmasq on
# 53: NET_BIND_SERVICE; dnsmasq keeps NET_RAW; the NSS database and file ownership: CHOWN, FOWNER,
# DAC_OVERRIDE; dnsmasq and pluto switch user ids: SETUID, SETGID; pluto trims its own bounding set
# and audits IKE (libcap-ng): SETPCAP, AUDIT_WRITE. Nothing else: Docker's default set minus FSETID,
# MKNOD, SETFCAP, SYS_CHROOT and KILL, plus NET_ADMIN (and --privileged fails on these hosts anyway).
CAPS = ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW", "CHOWN", "FOWNER", "DAC_OVERRIDE", "SETUID", "SETGID",
        "SETPCAP", "AUDIT_WRITE"]


class ContainerHolder:
    """What the netns lab keeps of a router holder process: its PID (the container's init, seen
    from the lab), whether it still runs."""

    def __init__(self, container, pid: int):
        self.container = container
        self.pid = pid

    def poll(self):
        return None if Path(f"/proc/{self.pid}").exists() else 1

    def kill(self) -> None:  # containers are removed by label in teardown
        pass

    def wait(self) -> None:
        pass


def _tar(files: dict[str, tuple[bytes, int]], tree: Path) -> bytes:
    """One archive for put_archive: the router tree's etc/ at /etc, plus the lab's own files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def owned_by_root(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            return ti
        for p in sorted((tree / "etc").rglob("*")):
            tar.add(p, arcname=str(p.relative_to(tree)), recursive=False, filter=owned_by_root)
        for name, (data, mode) in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class DockerLab(Lab):
    ROUTER_NS_MADE_HERE = False

    def __init__(self, plan: dict, results: Path):
        super().__init__(plan, results)
        self.engine: docker_engine.Engine | None = None
        self.label = {docker_image.LABEL: plan["prefix"]}

    def router_dir(self, name: str) -> Path:
        holder = self.holders.get(name)
        return Path(f"/proc/{holder.pid}/root{INSIDE}") if holder else self.state / f"router-{name}"

    def setup_phases(self) -> list:
        return [("engine", self.start_engine), ("containers", self.start_containers)] + super().setup_phases()

    # ---- the engine and the containers ------------------------------------------------------
    def start_engine(self) -> None:
        d = self.plan["docker"]
        if d["engine"] == "guest":
            self.engine = docker_engine.start_guest_engine(Path(d["data_root"]), say=lambda m: print(m, flush=True))
        else:
            client, why = docker_engine.host_engine()
            if client is None:
                raise RuntimeError(why)
            docker_image.ensure_image(client, say=lambda m: print(m, flush=True))
            self.engine = docker_engine.Engine(client, "host")
        self.timings.update(self.engine.timings)

    def _sweep(self, prefix: str) -> None:
        """Remove this lab's containers (label wan-lab=<prefix>) and nothing else."""
        for c in self.engine.client.containers.list(all=True, filters={"label": f"{docker_image.LABEL}={prefix}"}):
            c.remove(force=True)

    def _container(self, s: dict):
        d = self.router_dir(s["name"])  # the lab's side, before start: a scratch directory
        d.mkdir(parents=True, exist_ok=True)
        dnsconf = self._router_dnsmasq_conf(s, d, inside=INSIDE).read_bytes()
        files = {f"{str(INSIDE)[1:]}/router.sh": ((HERE / "docker-router.sh").read_bytes(), 0o755),
                 f"{str(INSIDE)[1:]}/dnsmasq.conf": (dnsconf, 0o644)}
        fw = self._router_firewall_text(s)
        if fw is not None:
            files[f"{str(INSIDE)[1:]}/firewall.nft"] = (fw.encode(), 0o644)
        c = self.engine.client.containers.create(
            self.plan["docker"]["image"], name=f"{self.plan['prefix']}-{s['name']}", hostname=s["name"],
            labels=self.label, network_mode="none", cap_drop=["ALL"], cap_add=CAPS,
            sysctls={"net.ipv4.ip_forward": "1"}, detach=True)
        c.put_archive("/", _tar(files, Path(s["tree"])))
        c.start()
        c.reload()
        return c, c.attrs["State"]["Pid"]

    def start_containers(self) -> None:
        sites = self.plan.get("network_sites", self.plan["sites"])
        with ThreadPoolExecutor(max_workers=4) as ex:
            made = list(ex.map(self._container, sites))
        for k, (s, (c, pid)) in enumerate(zip(sites, made), 1):
            self.holders[s["name"]] = ContainerHolder(c, pid)
            progress("containers", k, len(sites), s["name"])
        self.notes.append(f"routers: {len(sites)} containers of {self.plan['docker']['image']} "
                          f"({'the host' if self.engine.where == 'host' else 'an engine inside the lab kernel'}), "
                          f"capabilities {','.join(CAPS)}")
        for s in sites:
            self._wait_file(s["name"], "started")
        # the router's namespace is the container's: give it the name the netns lab uses
        run(["ip", "-batch", "-"], input="".join(f"netns attach {s['router_ns']} {self.holders[s['name']].pid}\n" for s in sites))
        self.namespaces += [s["router_ns"] for s in sites]

    def start_routers(self, order: list[str] | None = None) -> None:
        """The links are in place: every router prepares at once (NSS, firewall, dnsmasq), then
        the plutos start one by one, responders first, as in the netns lab."""
        order = order or self.plan["start_order"]
        for name in order:
            self._tell(name, "wired")
        for k, name in enumerate(order, 1):
            self._wait_file(name, "prepared")
            progress("routers prepared", k, len(order), name)
        for k, name in enumerate(order, 1):
            self._tell(name, "go")
            self._wait_loaded(name, self.router_dir(name))
            self._wait_initiated(name)
            progress("routers", k, len(order), name)

    def _tell(self, name: str, fifo: str, timeout: float = 60) -> None:
        """Write to one of the router script's FIFOs without hanging on a script that died."""
        path = self.router_dir(name) / fifo
        end = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: nobody reads yet
                if e.errno != errno.ENXIO or self.holders[name].poll() is not None or time.monotonic() > end \
                        or (self.router_dir(name) / "failed").exists():
                    raise RuntimeError(f"router {name}: its setup does not wait for '{fifo}' ({e})") from e
                time.sleep(0.05)
        try:
            os.write(fd, f"{fifo}\n".encode())
        finally:
            os.close(fd)

    # ---- teardown ---------------------------------------------------------------------------
    def teardown(self) -> None:
        """Containers by label first (their namespaces go with them), then the lab's namespaces,
        then our own engine (inside the lab kernel; the host's engine keeps running)."""
        if self.engine is not None:
            try:
                self._sweep(self.plan["prefix"])
            except Exception as e:
                log(f"removing the lab's containers failed: {e}")
        self.holders = {}
        super().teardown()
        if self.engine is not None:
            self.engine.stop()


def cleanup_host_engine(prefix: str) -> None:
    """After a Docker lab on the host's engine (killed or not): its labelled containers go."""
    client, _ = docker_engine.host_engine()
    if client is None:
        return
    for c in client.containers.list(all=True, filters={"label": f"{docker_image.LABEL}={prefix}"}):
        c.remove(force=True)
