"""The firewalld root: a Debian 12 (bookworm) root file system with firewalld 1.3.3, D-Bus, Libreswan
4.10 (the lab kernel's own major), dnsmasq, nftables and the router programs' tools, built by the
project with debootstrap (lab/roots.py) and cached as a directory on the host.

In the QEMU lab (a kernel with nftables' inet/ip families), the EL routers of sites with
`firewall: firewalld` (EL's default) run in it: their holder (lab/router-setup.sh) starts a D-Bus
system bus of the router's own (`dbus-daemon --system`, its socket in the router's /run tmpfs) and
`firewalld --nofork` (nftables backend), then what systemd would start after firewalld: the units
enabled in /etc/systemd/system/multi-user.target.wants (the WAN's wan-firewall.service). reconcile
then runs its real firewalld path (`firewall-cmd --reload`, `systemctl ... wan-firewall`), with a
stand-in for systemctl (lab/el-systemctl: no systemd in the lab). Under User-Mode Linux (no inet/ip
nftables) nothing changes: the firewall is not exercised. A Libreswan 5.x EL site keeps the
Libreswan 5 root (lab/libreswan5.py) and the lab's firewall model (lab/platform.py): firewalld is
not exercised there.

    root = ensure_root(say)       # ~/.cache/wan-lab/root-bookworm-fw-<hash>/
    why = unavailable()           # None, or why no firewalld root can be had here

$WAN_LAB_FIREWALLD=0 keeps every EL router on the lab's firewall model (the verdict says so).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import docker_image, libreswan5, roots

# libreswan5's list (pluto, the router programs' tools, ip, nft, dnsmasq) and firewalld with its
# D-Bus system bus (`dbus`: dbus-daemon, its launch helper and the system bus policy, messagebus
# user). firewalld's Depends (Debian 12: dbus, gir1.2-glib-2.0, gir1.2-nm-1.0, polkitd | policykit-1,
# python3-dbus, python3-gi, python3-nftables, python3-firewall) come with it; its Recommends (ipset,
# iptables) do not: the nftables backend needs neither. polkitd depends on `default-logind | logind`,
# virtual packages debootstrap does not resolve: libpam-systemd provides both (it brings systemd,
# which never runs here: the holder is the router's init; elogind's library conflicts with
# libsystemd0, which minbase has). As on EL, polkitd answers firewalld's authorization checks: the
# bus starts it on demand (its D-Bus service file) and it authorizes uid 0. radvd (Debian 12: 2.19) is
# the operator's router advertisement daemon (RHEL ships the same program in AppStream): the holder
# starts it when the router's disk has /etc/radvd.conf (`operator_files`). (libreswan5.FIREWALLD: the
# Libreswan 5 root carries the same, for its EL routers.)
PACKAGES = (*libreswan5.PACKAGES, *libreswan5.FIREWALLD)

RECIPE = {
    "version": 1,
    "suite": "bookworm",  # Debian 12: firewalld 1.3.3, Libreswan 4.10
    "variant": "minbase",
    "packages": list(PACKAGES),
    "strip": list(docker_image.STRIP),
    # firewalld's and dbus's maintainer scripts must start nothing on the build host (docker_image.debootstrap)
    "no_daemons": True,
}
SYSTEMCTL, SYSTEMCTL_PLACEHOLDER = roots.SYSTEMCTL, roots.SYSTEMCTL_PLACEHOLDER  # lab/el-systemctl's place


def _probe(root: Path) -> dict:
    fw = roots.firewalld_version(root, "the firewalld root")
    if not fw:
        raise RuntimeError(f"the firewalld root {root} has no firewalld")
    return {"firewalld": fw, "libreswan": roots.libreswan_version(root, "the firewalld root")}


ROOT = roots.Root(recipe=RECIPE, label="the firewalld root", name="fw", probe=_probe,
                  files={SYSTEMCTL: (SYSTEMCTL_PLACEHOLDER, 0o755)}, switch="WAN_LAB_FIREWALLD")


def wanted() -> bool:
    return ROOT.wanted()


def root_dir() -> Path:
    return ROOT.root_dir()


def built() -> Path | None:
    return ROOT.built()


def unavailable() -> str | None:
    """Why no firewalld root can be used in this run, None if one can (built, or buildable here)."""
    return ROOT.unavailable()


def ensure_root(say: Callable[[str], None] = print) -> Path:
    return ROOT.ensure(say)


def wants_root(site) -> bool:
    """A site (lab.model's Site) whose router runs real firewalld in the lab, given a kernel with the
    firewall: EL with `firewall: firewalld`."""
    return site.router.platform == "el" and site.router.firewall == "firewalld"


def choose(sites, lab_major: int, firewall: bool, say: Callable[[str], None] = print) -> tuple[Path | None, str | None]:
    """For a run with these sites: the firewalld root (built if need be), or None and why not.
    Nothing is built when the lab loads no firewall (User-Mode Linux) or no router wants firewalld on
    the lab kernel's Libreswan major (a 5.x EL router runs in the Libreswan 5 root)."""
    if not firewall or not any(wants_root(s) and s.router.libreswan == lab_major for s in sites):
        return None, None
    return ROOT.obtain(say)


# ---- the router's own firewalld configuration (the operator's, not the WAN's) ----------------------
# What an EL router's administrator has set up before the WAN arrives, as the lab models it: the WAN
# side in the stock `external` zone (masquerade, ssh; firewalld config/zones/external.xml), the LANs in
# the stock `internal` zone (ssh, mdns, samba-client, dhcpv6-client; config/zones/internal.xml) with
# DNS and DHCP added for the router's own dnsmasq, a port forward (TCP 8080 of the WAN address to a
# LAN host: a zone's forward-port, firewalld.zone(5)), and a policy that forwards the LANs to the internet:
# zones filter only input, forwarding between zones takes a policy (firewalld.policies(5), "Similarity
# to Zones"; a zone's masquerade only adds the nat rule, nftables.py build_policy_masquerade_rules).
# firewalld binds an interface named in a zone file when it loads its configuration (no NetworkManager
# here). The WAN's own zones and policies (render/templates/firewall/firewalld-*.j2) come on top.
EXTERNAL_ZONE = """<?xml version="1.0" encoding="utf-8"?>
<!-- the lab's EL operator: the stock external zone with the router's WAN interface (lab/firewalld.py) -->
<zone>
  <short>External</short>
  <service name="ssh"/>
  <masquerade/>
  <forward/>
  <forward-port port="{dnat_port}" protocol="tcp" to-port="{dnat_port}" to-addr="{dnat_to}"/>
  <interface name="{wan}"/>
</zone>
"""
INTERNAL_ZONE = """<?xml version="1.0" encoding="utf-8"?>
<!-- the lab's EL operator: the stock internal zone with the LANs, DNS and DHCP for the router's dnsmasq (lab/firewalld.py) -->
<zone>
  <short>Internal</short>
  <service name="ssh"/>
  <service name="mdns"/>
  <service name="samba-client"/>
  <service name="dhcpv6-client"/>
  <service name="dns"/>
  <service name="dhcp"/>
  <forward/>
{interfaces}</zone>
"""
LAN_OUT_POLICY = """<?xml version="1.0" encoding="utf-8"?>
<!-- the lab's EL operator: the LANs to the internet (lab/firewalld.py) -->
<policy target="ACCEPT">
  <short>lab-lans-out</short>
  <ingress-zone name="internal"/>
  <egress-zone name="external"/>
</policy>
"""


# The operator's router advertisements on the first LAN: radvd's configuration as radvd.conf(5) (radvd
# 2.19, EXAMPLES) writes it: an interface block with AdvSendAdvert on and a prefix block (on-link,
# autonomous: the LAN hosts configure an address from it, SLAAC). AdvRASolicitedUnicast on (said
# here so the check rests on no default; radvd.conf(5)) answers a Router Solicitation with a unicast
# RA to the soliciting host (RFC 7772; seen from 2.19 here), which is how lab/fwcheck.py tells
# an answer to its own solicitation from radvd's periodic multicast RAs (those leave the router even
# when its input drops the solicitation). The prefix is IPv6 documentation space (RFC 3849): the WAN
# is IPv4; this is the platform's own IPv6 next to it. radvd starts without IPv6 forwarding on the
# router (it logs "IPv6 forwarding seems to be disabled, but continuing anyway") and still advertises
# a router lifetime of 1800 s (seen in the QEMU lab: boot/radvd.log, the check's evidence).
RADVD_CONF = """# the lab's EL operator: router advertisements on the first LAN (lab/firewalld.py; radvd.conf(5))
interface {bridge}
{{
	AdvSendAdvert on;
	AdvRASolicitedUnicast on;
	prefix {prefix}
	{{
		AdvOnLink on;
		AdvAutonomous on;
	}};
}};
"""
RA_PREFIX = "2001:db8:1::/64"

DNAT_PORT = 8080  # the operator's port forward: the router's WAN address, TCP 8080 -> the first LAN's host
SSH_PORT = 22


def operator_files(wan: str, bridges: tuple[str, ...], dnat_to: str) -> dict[str, str]:
    """path under the router's / -> text: the operator's firewalld files (zones of its interfaces, a port
    forward to `dnat_to`) and its radvd.conf for the first LAN (the holder starts radvd when it is there)."""
    ifaces = "".join(f'  <interface name="{b}"/>\n' for b in bridges)
    return {"etc/firewalld/zones/external.xml": EXTERNAL_ZONE.format(wan=wan, dnat_port=DNAT_PORT, dnat_to=dnat_to),
            "etc/firewalld/zones/internal.xml": INTERNAL_ZONE.format(interfaces=ifaces),
            "etc/firewalld/policies/lab-lans-out.xml": LAN_OUT_POLICY,
            "etc/radvd.conf": RADVD_CONF.format(bridge=bridges[0], prefix=RA_PREFIX)}


def enabled_links(tree: Path) -> dict[str, str]:
    """What `systemctl enable` left for the units of a tree (the first reconcile ran it, docs/platforms.md):
    link path under / -> its target, per [Install] WantedBy= of each unit in etc/systemd/system."""
    out = {}
    for unit in sorted((Path(tree) / "etc/systemd/system").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("WantedBy="):
                for target in line.split("=", 1)[1].split():
                    out[f"etc/systemd/system/{target}.wants/{unit.name}"] = f"/etc/systemd/system/{unit.name}"
    return out
