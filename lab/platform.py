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
from ipaddress import IPv4Network
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
    The platform's own /etc/ipsec.conf is the lab kernel's (Debian's stock file: `config setup`
    with every option commented out and `include /etc/ipsec.d/*.conf`, the shape EL's and OpenWrt
    24.10's stock files have, docs/platforms.md); the trees carry none."""
    out = {path: ((REPO / "router" / name).read_bytes(), 0o755) for path, name in paths.PROGRAMS.items()}
    if platform == "openwrt":
        out |= {hook: out[program] for hook, program in paths.OPENWRT_HOOKS.items()}
    return out


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
        lan = s.lans[0]
        net = IPv4Network(lan.subnet)
        # a /24 or larger: the stock .100-.249; smaller: its second quarter (the lab's LAN host sits in the
        # upper half, lab/plan.py; dnsmasq pings an address before offering it, so a record's host is skipped)
        first, last = (100, 249) if net.num_addresses >= 256 else (net.num_addresses // 4, net.num_addresses // 2 - 1)
        first, last = net.network_address + first, net.network_address + last
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
