"""Lab routers: the `RouterHost` protocol, the network-namespace implementation, and starting a
fleet of them (all at once behind the network's gate, or one at a time).

A router has a disk (its flash: the files installed on it and its NSS database) that outlives a
reboot, and a run time (pluto, dnsmasq, the firewall, XFRM state, tmpfs) that a reboot drops.
Scenarios drive routers only through the protocol: exec, whack, stop, kill -9 of a named process,
reboot, cut and restore the WAN link.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .contracts import SitePlan, WanView
from .network import Network
from .platform import (
    EL_STOCK_FILES,
    dnsmasq_base,
    dnsmasq_conf,
    el_stock_files,
    enrolled_files,
    firewall_text,
    openwrt_2305_files,
    platform_release,
)
from .proc import LabError, progress, run

HERE = Path(__file__).resolve().parent
WHACK = "/usr/libexec/ipsec/whack"
# an instance of a right=%any conn (a dynamic peer) is logged with its number and the peer's address:
# '"acme-home"[1] 198.18.16.8 #3: responder established Child SA'
ESTABLISHED_RE = re.compile(r'"([^"]+)"(?:\[\d+\])?(?: [0-9.]+)? #\d+: (?:initiator|responder) established Child SA')


ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a router's PATH in its own root
STALE_LOCK = 'p=$(cat /run/pluto/pluto.pid 2>/dev/null) && ! kill -0 "$p" 2>/dev/null && rm -f /run/pluto/pluto.pid; '


class RouterFailed(LabError):
    pass


def make_nss(nssdir: Path) -> None:
    """An empty NSS database, as `ipsec initnss` makes one."""
    nssdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run(["certutil", "-N", "-d", f"sql:{nssdir}", "--empty-password"])


def prepare_nss(router: RouterHost, nssdir: Path, template: Path) -> None:
    """The router's NSS database at first boot: a copy of the router's own lab database (its lab
    key pair, made by lab/keys.py on the host; the plan names it in site.nss), else of an empty one.
    A copy: the router may write to its database, the cache stays as it was."""
    shutil.copytree(router.site.nss or template, nssdir, dirs_exist_ok=True)
    os.chmod(nssdir, 0o700)


class RouterHost(Protocol):
    """One lab router, whatever carries it (a namespace pair, a container)."""

    site: SitePlan

    @property
    def name(self) -> str: ...
    def install(self, tree: str) -> None: ...  # first boot: the router's files onto its disk
    def boot(self) -> None: ...  # start what the platform starts at boot; pluto waits for start_pluto
    def wait_prepared(self, timeout: float = 60) -> None: ...
    def start_pluto(self) -> None: ...
    def wait_loaded(self, timeout: float = 60) -> None: ...  # pluto has added every conn of its tunnels
    def wait_ready(self, timeout: float = 60) -> None: ...  # pluto runs (conns or not)
    def exec(self, argv: list[str], *, check: bool = False, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess: ...
    def whack(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess: ...
    def enter(self) -> list[str]: ...  # the argv prefix that runs a command inside the router
    def traffic(self) -> dict[str, dict]: ...  # conn -> in/out bytes of its established Child SAs
    def spis(self) -> dict[str, set[str]]: ...  # conn -> ESP SPIs pluto holds
    def established(self) -> set[str]: ...  # conns whose Child SA pluto logged as established this boot
    def pids(self, process: str) -> list[int]: ...  # the router's processes of that name
    def stop(self) -> None: ...  # IPsec stopped as `ipsec stop` does (pluto shuts down)
    def start_ipsec(self) -> None: ...  # pluto started again as the platform's service starts it
    def respawn_ipsec(self) -> float: ...  # after pluto died: what the platform's service manager does; its delay
    def kill(self, process: str) -> list[int]: ...  # kill -9 every process of that name, by its PID
    def reboot(self) -> None: ...  # down and up again from the files on its disk
    def cut_wan(self) -> None: ...
    def restore_wan(self) -> None: ...
    def logs(self) -> dict[str, str]: ...  # pluto.log, dnsmasq.log, setup.log
    def reload_env(self) -> dict[str, str]: ...  # WAN_RELOAD_* for fetch/reconcile on this platform
    def alive(self) -> bool: ...
    def teardown(self) -> None: ...


def wait_router(router: RouterHost, what: Callable[[], bool], label: str, timeout: float) -> None:
    """Until `what()`, while the router lives (its setup.log's end says why it died), within the timeout."""
    end = time.monotonic() + timeout
    while not what():
        if not router.alive():
            raise RouterFailed(f"router {router.name} failed to start: {router.logs().get('setup.log', '')[-2000:]}")
        if time.monotonic() > end:
            raise RouterFailed(f"router {router.name}: {label} not within {timeout:.0f} s")
        time.sleep(0.05)


class BootWaits:
    """The waits both router kinds share: on the files their setup writes into `boot_files`
    (prepared, ready) and on pluto's log (`_pluto_log`), while the router lives (`alive`)."""
    name: str
    site: SitePlan

    @property
    def boot_files(self) -> Path:
        raise NotImplementedError

    def _wait_for(self, what: Callable[[], bool], label: str, timeout: float) -> None:
        wait_router(self, what, label, timeout)

    def wait_prepared(self, timeout: float = 60) -> None:
        self._wait_for(lambda: (self.boot_files / "prepared").exists(), "prepared", timeout)

    def wait_loaded(self, timeout: float = 60) -> None:
        want = sum(len(c) for c in self.site.conns.values())
        self._wait_for(lambda: len(loaded_conns(self._pluto_log())) >= want,
                       f"pluto loading its {want} connections", timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        self._wait_for(lambda: (self.boot_files / "ready").exists(), "pluto started", timeout)


def loaded_conns(log: str) -> set[str]:
    """The conns pluto's log says it added. 4.10 logs '"c": added IKEv2 connection' once; 5.2 logs it
    and then again as addconn's own output ('addconn: "c": added IKEv2 connection'), so names are
    counted, not lines (both recorded in tests/data/pluto-5.2/)."""
    return set(re.findall(r'"([^"]+)": added IKEv2 connection', log))


def pids_in_mount_ns(ns_of: int, process: str) -> list[int]:
    """PIDs whose mount namespace is that of `ns_of` and whose name is `process` (comm or argv[0])."""
    try:
        want = os.stat(f"/proc/{ns_of}/ns/mnt").st_ino
    except OSError:
        return []
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == ns_of:
            continue
        try:
            if os.stat(p / "ns/mnt").st_ino != want:
                continue
            comm = (p / "comm").read_text().strip()
            argv0 = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if process in (comm, os.path.basename(argv0)):
            found.append(int(p.name))
    return found


def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in pids):
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def parse_traffic(text: str) -> dict[str, dict]:
    out = {}
    for line in text.splitlines():
        m = re.search(r'"([^"]+)".*inBytes=(\d+), outBytes=(\d+)', line)
        if m:
            out[m.group(1)] = {"in": int(m.group(2)), "out": int(m.group(3))}
    return out


def parse_spis(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        # 4.x: '000 #7: "acme-home" esp.c750ec95@192.0.2.10 esp.bd907973@198.51.100.20 tun.0@...'
        m = re.search(r'#\d+: "([^"]+)"(?:\[\d+\])?(?::\d+)? .*?(esp\.[0-9a-f]+@\S+)', line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r"esp\.([0-9a-f]+)@", line))
    return out


class NetnsRouter(BootWaits):
    """A router in a network namespace and a mount namespace of its own, held by router-setup.sh."""
    boot_files = property(lambda self: self.bootdir)  # where its setup writes prepared, ready

    def __init__(self, site: SitePlan, network: Network, state: Path, isp_resolver: str, firewall: bool,
                 nss_template: Path, shared: tuple[str, ...] = ()):
        self.site = site
        # seen at their own paths by a router in a root of its own (the repository, the lab's results
        # with the trees the scenarios apply); a router on the lab kernel's root sees them anyway
        self.shared = (str(HERE.parent), *shared)
        self.network = network
        self.dir = state / f"router-{site.name}"
        self.flash = self.dir / "flash"
        self.bootdir = self.dir / "boot"
        self.isp_resolver = isp_resolver
        self.firewall = firewall
        self.nss_template = nss_template
        self.holder: subprocess.Popen | None = None
        self.log_offset = 0
        self.platform_files: str | None = None  # the platform's stock files were laid and edited (install)
        self.el_stock = False  # RHEL's stock ipsec.conf and crypto-policy back-end were laid (install)

    @property
    def name(self) -> str:
        return self.site.name

    # ---- disk and boot ------------------------------------------------------------------------
    def install(self, tree: str) -> None:
        """The router's files onto its disk: the tree's etc/ as real files, the lab kernel's other
        /etc entries as symlinks (through hostetc, bound inside the router), an NSS database."""
        etc = self.flash / "etc"
        etc.mkdir(parents=True)
        extra = enrolled_files(self.site.platform)  # the programs (and OpenWrt's hooks), as enrol leaves them
        mine = {p.name for p in (Path(tree) / "etc").iterdir()} | {p.split("/")[1] for p in extra}
        if self.site.firewalld:
            mine |= {"firewalld", "systemd"}  # the router's own (written below), not the root's read-only ones
        if self.site.platform == "el":
            mine |= {p.split("/")[1] for p in EL_STOCK_FILES}  # RHEL's stock files (written below)
        # a router in a root of its own (Libreswan 5) sees that root's /etc through hostetc
        for e in sorted(os.listdir(Path(self.site.root or "/") / "etc")):
            if e not in mine:
                (etc / e).symlink_to(self.dir / "hostetc" / e)
        shutil.copytree(Path(tree) / "etc", etc, symlinks=True, dirs_exist_ok=True)
        for path, (data, mode) in extra.items():
            f = self.flash / path
            if not f.exists():  # a tree laid out as a router already enrolled keeps its own
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                f.chmod(mode)
        if self.site.firewalld:
            self._install_firewalld(tree)
        prepare_nss(self, self.flash / "nss", self.nss_template)
        if self.site.platform == "el":
            el_stock_files(self.flash)
            self.el_stock = True
        if self.site.platform == "openwrt" and platform_release(Path(tree)) == "23.05":
            # the package's stock ipsec.conf/secrets, edited by our program as the first reconcile does
            self.platform_files = openwrt_2305_files(self.flash)

    def _install_firewalld(self, tree: str) -> None:
        """A router that runs real firewalld (lab/firewalld.py): its /etc/firewalld as a fresh EL
        install has it (the root's stock files) with the operator's zones of its interfaces, and the
        units the first reconcile enabled (`systemctl enable wan-firewall`), on its disk."""
        from . import firewalld
        etc = self.flash / "etc"
        stock = Path(self.site.root) / "etc/firewalld"
        if stock.is_dir():
            for src in sorted(stock.rglob("*")):
                dst = etc / "firewalld" / src.relative_to(stock)
                if src.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                elif not dst.exists():
                    shutil.copy2(src, dst)
        for path, text in firewalld.operator_files("wan", self._bridges(), self.site.lans[0].host).items():
            (self.flash / path).parent.mkdir(parents=True, exist_ok=True)
            (self.flash / path).write_text(text)
        for link, target in firewalld.enabled_links(Path(tree)).items():
            (self.flash / link).parent.mkdir(parents=True, exist_ok=True)
            (self.flash / link).unlink(missing_ok=True)
            (self.flash / link).symlink_to(target)

    def boot(self) -> None:
        b = self.bootdir
        b.mkdir(parents=True, exist_ok=True)
        for marker in ("prepared", "ready", "go", "failed"):
            (b / marker).unlink(missing_ok=True)
        os.mkfifo(b / "go")
        base = dnsmasq_base(self.site, self.isp_resolver, b)
        (b / "dnsmasq.base").write_text("\n".join(base) + "\n")  # `python3 -m lab.platform dns` starts from it
        (b / "dnsmasq.conf").write_text(dnsmasq_conf(self.site.platform, base, self.flash))
        fw = "-"
        if self.firewall and self.site.firewalld:
            fw = "firewalld"  # real firewalld in the router's root (lab/firewalld.py, lab/router-setup.sh)
        elif self.firewall:
            (b / "firewall.nft").write_text(firewall_text(self.site.platform, self.flash, self._bridges()))
            fw = str(b / "firewall.nft")
        logf = open(b / "setup.log", "a")
        self.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.site.router_ns}", "unshare", "--mount", "--propagation", "private",
             "sh", str(HERE / "router-setup.sh"), self.name, str(self.dir), str(b / "dnsmasq.conf"), fw,
             self.site.root or "-", ":".join(self.shared)],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()

    def wait_prepared(self, timeout: float = 60) -> None:
        # firewalld's start (Python, its whole configuration, one nft transaction) took 20-60 s per router
        # in QEMU with three starting at once on its one CPU (hub lab: 60 s were not enough)
        super().wait_prepared(timeout * 4 if self.site.firewalld and self.firewall else timeout)

    def _bridges(self) -> tuple[str, ...]:
        return tuple(lan.bridge for lan in self.site.lans)



    def start_pluto(self) -> None:
        try:
            self.log_offset = (self.bootdir / "pluto.log").stat().st_size
        except FileNotFoundError:
            self.log_offset = 0
        with open(self.bootdir / "go", "w") as fifo:
            fifo.write("go\n")

    def _pluto_log(self) -> str:
        try:
            with open(self.bootdir / "pluto.log", errors="replace") as f:
                f.seek(self.log_offset)
                return f.read()
        except FileNotFoundError:
            return ""



    def alive(self) -> bool:
        return self.holder is not None and self.holder.poll() is None and not (self.bootdir / "failed").exists()

    # ---- inside the router --------------------------------------------------------------------
    def enter(self) -> list[str]:
        # a router in a root of its own: its holder's root and working directory (-r -w) too
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", *(["-r", "-w"] if self.site.root else []), "--"]

    def exec(self, argv: list[str], *, check: bool = False, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        pre = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run([*self.enter(), *pre, *argv], check=check, timeout=timeout)

    def whack(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # pluto's control socket, seen through the holder's root: one process, no nsenter. A router
        # in a root of its own runs that root's whack (4.10's whack and 5.2's pluto refuse each
        # other's messages): chroot into the holder's root, one process too.
        if self.site.root:
            return run(["chroot", f"/proc/{self.holder.pid}/root", WHACK, "--ctlsocket", "/run/pluto/pluto.ctl", *args],
                       check=False, timeout=timeout)
        ctl = f"/proc/{self.holder.pid}/root/run/pluto/pluto.ctl"
        return run([WHACK, "--ctlsocket", ctl, *args], check=False, timeout=timeout)

    def traffic(self) -> dict[str, dict]:
        return parse_traffic(self.whack("--trafficstatus").stdout)

    def spis(self) -> dict[str, set[str]]:
        return parse_spis(self.whack("--status").stdout)

    def established(self) -> set[str]:
        """Read from pluto's log (a file read costs no process)."""
        return set(ESTABLISHED_RE.findall(self._pluto_log()))

    def pids(self, process: str) -> list[int]:
        return pids_in_mount_ns(self.holder.pid, process) if self.holder else []

    def logs(self) -> dict[str, str]:
        out = {}
        for f in ("pluto.log", "dnsmasq.log", "setup.log", "firewalld.log", "radvd.log"):
            try:
                out[f] = (self.bootdir / f).read_text(errors="replace")
            except FileNotFoundError:
                pass
        return out

    def reload_env(self) -> dict[str, str]:
        b = self.bootdir
        # the lab's models are Python of the lab kernel's root: a router in a root of its own reaches
        # it in /wanhost (lab/router-setup.sh), and names the router by its holder's PID (a process in the
        # router's root, current at each call: a reboot makes a new holder) so the model finds that root
        # (lab/platform.py router_root)
        pid = f" WAN_LAB_ROUTER_PID={self.holder.pid}" if self.holder else ""  # (not booted: nothing to reload yet)
        py = (f"chroot /wanhost env PYTHONPATH={HERE.parent}{pid} {sys.executable}" if self.site.root else sys.executable)
        env = {"WAN_RELOAD_DNS": f"{py} -m lab.platform dns {b} {self.site.platform}"}
        if not self.firewall:
            env["WAN_RELOAD_FIREWALL"] = "true"  # the lab kernel has no nftables for it (UML)
        elif self.site.firewalld:
            # real firewalld: reconcile's own path (firewall-cmd --reload; systemctl: lab/el-systemctl, bound
            # over /usr/local/sbin/systemctl, first on systemd's default PATH, as here)
            env["PATH"] = ROOT_PATH
        else:  # the lab has neither systemd/firewalld nor fw4: its models load what they would (lab/platform.py),
            # and reconcile's own check of the rules in effect (nft) runs as on a router
            bridges = f" {' '.join(self._bridges())}" if self.site.platform == "openwrt" else ""
            env["WAN_RELOAD_FIREWALL"] = f"{py} -m lab.platform firewall {b} {self.site.platform}{bridges}"
            env["WAN_CHECK_FIREWALL"] = "builtin"
        return env

    # ---- the primitives the fault scenarios use ------------------------------------------------
    def stop(self) -> None:
        pids = self.pids("pluto")
        self.whack("--shutdown", timeout=60)
        _wait_gone(pids, 30)

    def start_ipsec(self) -> None:
        """pluto started again as the platform's service would. A pluto killed with -9 leaves its
        lock file; ipsec.service runs pluto with --nofork, and then pluto wipes a stale lock itself
        (libreswan programs/pluto/plutomain.c, create_lock: "if we did not fork ... wipe it"); the
        lab starts pluto daemonised, so it removes a lock whose PID is gone first."""
        self.log_offset = (self.bootdir / "pluto.log").stat().st_size if (self.bootdir / "pluto.log").exists() else 0
        pluto = f'exec /usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile "{self.bootdir}/pluto.log"'
        self.exec(["sh", "-c", STALE_LOCK + pluto],
                  check=True)

    def respawn_ipsec(self) -> float:
        """pluto died (kill -9): what the platform's service manager does, as the lab models it.
        EL: libreswan's ipsec.service has `Restart=always` and no RestartSec (systemd's default: 100 ms)
        and `ExecStopPost=/sbin/ip xfrm policy flush` and `... state flush`, which systemd runs when
        the main process dies, before the restart (libreswan initsystems/systemd/ipsec.service.in, read
        at commit 00c8c8e; the 4.x/5.x RHEL unit is the same file, not checked here line by line).
        OpenWrt: /etc/init.d/ipsec (openwrt/packages net/libreswan/files/etc/init.d/ipsec, start_service)
        runs pluto --nofork under procd with `procd_set_param respawn` and no values: procd.sh's
        defaults, threshold 3600 s, timeout 5 s, retry 5 (openwrt/openwrt package/system/procd/files/
        procd.sh, _procd_set_param respawn), so procd starts it again 5 s later; no stop hook runs, the
        kernel's XFRM state stays. Returns the modelled delay in seconds."""
        if self.site.platform == "el":
            self.exec(["sh", "-c", "ip xfrm policy flush; ip xfrm state flush"], check=True)
            delay = 0.1
        else:
            delay = 5.0
        time.sleep(delay)
        self.start_ipsec()
        return delay

    def kill(self, process: str) -> list[int]:
        pids = self.pids(process)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(pids)
        return pids

    def _power_off(self) -> None:
        """Every process of the router ends at once (SIGKILL), its namespaces go: run time lost."""
        if self.holder is None:
            return
        everyone = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _same_mnt(int(p.name), self.holder.pid)]
        for pid in everyone:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.holder.wait()
        _wait_gone(everyone)
        self.holder = None

    def reboot(self) -> None:
        """Power off (every process killed, the namespace with its XFRM state, routes and firewall
        deleted, the tmpfs dropped), then power on: the same links, the platform's boot from the
        files on the router's disk, pluto started as the platform starts it."""
        self._power_off()
        self.network.delete_router_ns(self.site)
        self.network.rewire_router(self.site)
        self.boot()
        self.wait_prepared()
        self.start_pluto()
        self.wait_ready()

    def cut_wan(self) -> None:
        self.network.cut_wan(self.site)

    def restore_wan(self) -> None:
        self.network.restore_wan(self.site)

    def teardown(self) -> None:
        self._power_off()


def _same_mnt(pid: int, ref: int) -> bool:
    try:
        return pid != os.getpid() and os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(f"/proc/{ref}/ns/mnt").st_ino
    except OSError:
        return False


# ---- the fleet ------------------------------------------------------------------------------------

def wait_initiated(router: RouterHost, view: WanView) -> None:
    """Until this router's own initiations are established, bounded by 15 s or 3 s per conn it
    initiates, whichever is more (a 24-site mesh's later routers initiate 11 to 23 each)."""
    mine = {c for t in view.tunnels if t.initiator == router.name for c in router.site.conns.get(t.name, ())}
    end = time.monotonic() + max(15.0, 3.0 * len(mine))
    while mine and not mine <= router.established() and time.monotonic() < end:
        time.sleep(0.05)


def start_fleet(routers: dict[str, RouterHost], order: list[str], network: Network, mode: str, view: WanView,
                without_conns: set[str] = frozenset()) -> None:
    """Boot the routers and start their plutos.

    - "gated": every pluto at once while the internet drops IKE (blackhole routes to every public
      address); once every pluto has loaded its conns, real routes. No IKE_AUTH can meet a peer
      that has not loaded the conn (what made an all-at-once start lose Child SAs with
      TS_UNACCEPTABLE), and no router waits for another.
    - "serial": one pluto at a time, responders first, each once the previous one's own
      initiations are up (the lab before the gate; kept to compare).
    `without_conns`: routers that start with no tunnel (enrolment only): wait until pluto runs.
    """
    for name in order:
        routers[name].boot()
    for k, name in enumerate(order, 1):
        routers[name].wait_prepared()
        progress("routers prepared", k, len(order), name)
    if mode == "gated":
        for name in order:
            routers[name].start_pluto()
        for k, name in enumerate(order, 1):
            (routers[name].wait_ready if name in without_conns else routers[name].wait_loaded)()
            progress("routers", k, len(order), name)
        network.open_gate()
        return
    network.open_gate()
    for k, name in enumerate(order, 1):
        r = routers[name]
        r.start_pluto()
        if name in without_conns:
            r.wait_ready()
        else:
            r.wait_loaded()
            wait_initiated(r, view)
        progress("routers", k, len(order), name)
