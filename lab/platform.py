"""What a router's platform makes of the files installed on it, as the lab models it.

- dnsmasq: EL reads /etc/dnsmasq.d (conf-dir); on OpenWrt /etc/wan/openwrt-dns copies
  /etc/wan/dnsmasq.conf into the first instance's conf-dir (render/openwrt.py, router/openwrt-dns cite
  the init script). The ISP resolver stands in for resolv.conf.
- the firewall: EL gets the router's own masquerade on the WAN side (as firewalld or the admin's
  table would) and the rendered table loaded from its real path; OpenWrt gets a minimal fw4 ruleset
  with our snippets at their include positions.

Both are computed from the router's installed files (its flash), so a reboot or a reconcile that
changed them gives the platform's new view. Run inside a router's mount namespace as the reload
hooks fetch/reconcile call:

    python3 -m lab.platform dns BOOT_DIR el|openwrt
    python3 -m lab.platform firewall BOOT_DIR el|openwrt BRIDGE...
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from render import paths
from render.openwrt import dnsmasq_options, fw4_ruleset, uci_dnsmasq_options

from .contracts import SitePlan

EL_NAT = ("table ip labnat\ndelete table ip labnat\ntable ip labnat {\n"
          "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
          '\t\toifname "wan" masquerade\n\t}\n}\ninclude "/etc/nftables/wan.nft"\n')


REPO = Path(__file__).resolve().parent.parent


def enrolled_files(platform: str) -> dict[str, tuple[bytes, int]]:
    """What a router holds besides its tree once `enrol --install` and its first reconcile ran:
    every program of the program release in /etc/wan (render/paths.py PROGRAMS) and, on OpenWrt,
    the hooks reconcile copies where rc.common and hotplug-call look (paths.OPENWRT_HOOKS).
    The platform's own /etc/ipsec.conf is RHEL's stock file on EL (el_stock_files), OpenWrt 23.05's
    package files on 23.05 (openwrt_2305_files), else the lab kernel's (Debian's stock file: `config
    setup` with every option commented out and `include /etc/ipsec.d/*.conf`, the shape OpenWrt 24.10's
    stock file has, docs/platforms.md); the trees carry none."""
    out = {path: ((REPO / "router" / name).read_bytes(), 0o755) for path, name in paths.PROGRAMS.items()}
    if platform == "openwrt":
        out |= {hook: out[program] for hook, program in paths.OPENWRT_HOOKS.items()}
    return out


STOCK_2305 = REPO / "lab/stock-openwrt-23.05"  # the 23.05 libreswan package's files, verbatim (its SOURCE)


def platform_release(tree: Path) -> str:
    """The platform release the router's own files name (etc/wan/router.env WAN_PLATFORM_RELEASE, which
    reconcile reads), "" if none."""
    env = tree / paths.ROUTER_ENV
    for line in env.read_text().splitlines() if env.exists() else ():
        if line.startswith("WAN_PLATFORM_RELEASE="):
            return line.split("=", 1)[1].strip().strip("'\"")
    return ""


def openwrt_pluto_defaults(conf: str) -> str:
    """An ipsec.conf as OpenWrt's pluto reads it, for Debian's pluto: OpenWrt builds Libreswan with
    upstream defaults (openwrt/packages net/libreswan/Makefile sets no USE_IKEv1, and 4.12's
    mk/config.mk:393 `USE_IKEv1 ?= true`), where `ikev1-policy` defaults to accept (v4.12
    configs/d.ipsec.conf/ikev1-policy.xml); Debian's 4.10 is patched to default to drop ("ikev1-policy
    defaults to drop", Debian's patch), so its pluto refuses to load an IKEv1 conn at all. The lab's
    OpenWrt routers get the upstream default written into `config setup`, so a stock IKEv1 conn loads
    as it does on the router."""
    line = ("\t# the lab: OpenWrt's pluto default (upstream Libreswan: accept); Debian's own is drop\n"
            "\tikev1-policy=accept\n")
    head, sep, rest = conf.partition("config setup\n")
    return head + sep + line + rest if sep else "config setup\n" + line + "\n" + conf


STOCK_EL = REPO / "lab/stock-el"  # RHEL's stock ipsec.conf and a crypto-policies back-end (lab/stock-el/SOURCE)
EL_STOCK_FILES = {"etc/ipsec.conf": "ipsec.conf", "etc/crypto-policies/back-ends/libreswan.config": "libreswan.config"}


def el_stock_files(flash: Path) -> None:
    """An EL router's disk as its libreswan and crypto-policies packages leave it: RHEL's stock
    /etc/ipsec.conf (upstream configs/ipsec.conf.in with the Fedora/RHEL spec's edit that enables
    `include /etc/crypto-policies/back-ends/libreswan.config`, field-facts W6) and a system-wide
    policy back-end (`conn %default` with ikev2, pfs, ike, esp and authby lists: crypto-policies'
    libreswan generator; lab/stock-el/SOURCE names both). The WAN leaves both alone (render/paths.py
    PLATFORM_FILES); its conns set what the %default would otherwise give them."""
    for path, name in EL_STOCK_FILES.items():
        f = flash / path
        if f.is_symlink() or f.exists():
            f.unlink()  # the lab kernel's own file, linked by install()
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes((STOCK_EL / name).read_bytes())
        f.chmod(0o644)


def openwrt_2305_files(flash: Path) -> str:
    """An OpenWrt 23.05 router's disk as its libreswan package leaves it, then as the router's first
    reconcile leaves it. The package ships /etc/ipsec.conf with `conn ikev1`/`ikev1-nat` (an IKEv1 L2TP
    responder for any peer: right=%any, authby=secret), `uniqueids=no` and the include of
    /etc/ipsec.d/*.conf commented out, and /etc/ipsec.secrets with the catch-all `: PSK "SsEeCcRrEeTt"`
    (openwrt/packages openwrt-23.05 net/libreswan/files/, lines cited in router/openwrt-23.05-ipsec;
    copies in lab/stock-openwrt-23.05). reconcile runs router/openwrt-23.05-ipsec before it adds a
    conn (router/reconcile, step openwrt-23.05-ipsec); the lab runs that program itself on the disk
    (WAN_ROOT, as reconcile passes it). pluto then starts from the edited files: the lab proves our
    conns load through the include and the stock ones do not (proofs.platform_files). Returns its output."""
    etc = flash / "etc"
    for name, mode in (("ipsec.conf", 0o644), ("ipsec.secrets", 0o600)):
        f = etc / name
        if f.is_symlink() or f.exists():
            f.unlink()  # the lab kernel's own file, linked by install()
        text = (STOCK_2305 / name).read_text()
        f.write_text(openwrt_pluto_defaults(text) if name == "ipsec.conf" else text)
        f.chmod(mode)
    r = subprocess.run(["sh", str(etc / "wan/openwrt-23.05-ipsec")], env={"WAN_ROOT": str(flash), "PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openwrt-23.05-ipsec on {flash}: exit {r.returncode}: {r.stdout}{r.stderr}")
    return r.stdout


def dhcp_pool(s: SitePlan) -> tuple[IPv4Address, IPv4Address, IPv4Network]:
    """The DHCP pool of a router-DNS site's first LAN in the lab: OpenWrt's stock `config dhcp lan`
    (start 100, limit 150: .100-.249) on a /24 or larger, the second quarter of a smaller LAN; then the
    longest run of it that holds no address the lab or the site gives a name: the site's records, the
    router, the lab's LAN hosts. dnsmasq names a lease after a host-record of its address ("DHCPACK ...
    host0", seen in CI with generated seed 817444: the client's own name was then NXDOMAIN) and pings
    an address before offering it only to skip a host that answers; a record's host is not running in
    the lab. In the field the operator's pool and the records' static hosts are theirs to keep apart."""
    lan = s.lans[0]
    net = IPv4Network(lan.subnet)
    first, last = (100, 249) if net.num_addresses >= 256 else (net.num_addresses // 4, net.num_addresses // 2 - 1)
    taken = {IPv4Address(a) for a in (*s.records.values(), s.probe_record[1], s.lan_address,
                                      *(x for lan_ in s.lans for x in (lan_.router_address, lan_.host)))}
    runs, run = [], []
    for i in range(first, last + 1):
        a = net.network_address + i
        if a in taken:
            runs.append(run)
            run = []
        else:
            run.append(a)
    runs.append(run)
    best = max(runs, key=len)
    if not best:
        raise ValueError(f"{s.name}: no free address for the lab's DHCP pool in {net}")
    return best[0], best[-1], net


def dnsmasq_base(s: SitePlan, isp_resolver: str, boot: Path) -> list[str]:
    """The options dnsmasq gets whatever the WAN files say (boot: where its pid and log go)."""
    if s.platform == "el":
        listen = [f"listen-address={','.join(lan.router_address for lan in s.lans)}", "bind-interfaces"]
    else:
        # OpenWrt's stock `option nonwildcard 1` and no interface list: --bind-dynamic on every interface
        # (dnsmasq.init: `append_bool "$cfg" nonwildcard "--bind-dynamic" 1`), the WAN side included;
        # --local-service (or not) comes from the UCI model in dnsmasq_conf
        listen = ["bind-dynamic"]
    base = listen + ["no-resolv", "no-hosts", f"server={isp_resolver}", "user=root",
                     f"pid-file={boot}/dnsmasq.pid", f"log-facility={boot}/dnsmasq.log", "log-queries"]
    if s.router_dns:
        # the operator's DHCP service on the first LAN (OpenWrt's stock `config dhcp lan`: start 100,
        # limit 150, leasetime 12h), and the lab's probe name, which a DNS host would otherwise serve
        first, last, net = dhcp_pool(s)
        base += [f"dhcp-range={first},{last},{net.netmask},12h", f"dhcp-leasefile={boot}/dhcp.leases",
                 f"host-record={s.probe_record[0]},{s.probe_record[1]}"]
    if s.platform == "el":
        # rebind protection is the operator's choice on EL (the WAN's files only whitelist its own
        # domains: rebind-domain-ok); this lab's EL operators turn it on, as OpenWrt's stock config does
        base += ["conf-dir=/etc/dnsmasq.d", "stop-dns-rebind"]
    else:
        # OpenWrt's stock /etc/config/dhcp ships `option rebind_protection 1` and `option
        # rebind_localhost 1` (openwrt/openwrt package/network/services/dnsmasq/files/dhcp.conf; seen
        # in builds that sed them off, the line itself not checked here); its init script makes
        # them --stop-dns-rebind and --rebind-localhost-ok. EL's dnsmasq has neither by default.
        base += ["stop-dns-rebind", "rebind-localhost-ok"]
    return base


def rebind_protected(s: SitePlan) -> bool:
    """Whether the router drops private answers from upstream: the platform's setting (OpenWrt's
    stock config; the lab's EL operators, dnsmasq_base above) in every DNS mode."""
    return "stop-dns-rebind" in dnsmasq_base(s, "192.0.2.1", Path("/"))


def dnsmasq_conf(platform: str, base: list[str], root: Path) -> str:
    """The whole dnsmasq configuration from the base options and the installed files under `root`."""
    lines = list(base)
    if platform == "openwrt":
        lines += uci_dnsmasq_options(root)  # /etc/config/dhcp as the WAN's etc/wan/dhcp.uci leaves it
        lines += dnsmasq_options(root, stock=())  # the stock options are in `base` already
    return "\n".join(lines) + "\n"


def firewall_text(platform: str, root: Path, bridges: tuple[str, ...]) -> str:
    """The ruleset the platform loads at boot, from the installed files under `root`."""
    if platform == "el":
        return EL_NAT
    return fw4_ruleset(root, "wan", bridges)


def router_root() -> Path:
    """The router's own root file system. A router of a Libreswan-5 site runs in a root of its own
    (lab/libreswan5.py) and reaches these models, Python of the lab kernel's root, through `chroot
    /wanhost` (lab/routers.py reload_env): WAN_LAB_ROUTER_PID then names a process of the router
    (its holder), whose root its files and its dnsmasq are in. Seen with
    berlin on 5.2 in the rotation lab: the model restarted the lab kernel's dnsmasq with the lab
    kernel's /etc ("cannot access directory /etc/dnsmasq.d") and the router's DNS stopped."""
    pid = os.environ.get("WAN_LAB_ROUTER_PID", "")
    return Path(f"/proc/{int(pid)}/root") if pid else Path("/")


def _restart_dnsmasq(boot: Path, root: Path = Path("/")) -> int:
    try:
        pid = int((boot / "dnsmasq.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            os.kill(pid, 0)
            time.sleep(0.02)
    except (OSError, ValueError):
        pass  # not running (or gone now)
    in_root = [] if root == Path("/") else ["chroot", str(root)]  # the router's own dnsmasq and /etc
    return subprocess.run([*in_root, "dnsmasq", f"--conf-file={boot / 'dnsmasq.conf'}"]).returncode


def main(argv: list[str]) -> int:
    what, boot = argv[0], Path(argv[1])
    if what == "dns":
        base = (boot / "dnsmasq.base").read_text().splitlines()
        root = router_root()
        (boot / "dnsmasq.conf").write_text(dnsmasq_conf(argv[2], base, root))
        return _restart_dnsmasq(boot, root)
    if what == "firewall":  # EL: what wan-firewall.service / the nftables include load; OpenWrt: fw4 reload
        fw = boot / "firewall.nft"
        fw.write_text(firewall_text(argv[2], Path("/"), tuple(argv[3:])))
        return subprocess.run(["nft", "-f", str(fw)]).returncode
    print(f"usage: python3 -m lab.platform dns|firewall BOOT_DIR ...; not {what!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
