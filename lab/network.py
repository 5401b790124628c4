"""The lab's network: namespaces, veths, bridges, the "internet" between the routers, its ISP
resolver, each site's DNS server, and the gate that holds IKE back until every router is ready.

One `ip -batch` per namespace (each process start costs 0.1-0.2 s in a lab kernel). Every
namespace made here is deleted again by `teardown`; every daemon started here is ended by PID.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .contracts import Infra, LabPlan, LanPlan, SitePlan
from .probes import in_netns
from .proc import LabError, run


def ns_path(ns: str) -> str:
    return f"/run/netns/{ns}"


def in_ns(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return run(["nsenter", f"--net={ns_path(ns)}", "--"] + argv, **kw)


def popen_ns(ns: str, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", f"--net={ns_path(ns)}", "--"] + argv, **kw)


def enable_forwarding(ns: str) -> None:
    """net.ipv4.ip_forward=1 in a namespace, written from this process (no process start): /proc/sys/net
    shows the namespace of the thread that opens it."""
    with in_netns(ns_path(ns)):
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")


def _batch(ns: str | None, cmds: list[str], force: bool = False) -> None:
    if cmds:
        run(["ip"] + (["-n", ns] if ns else []) + (["-force"] if force else []) + ["-batch", "-"], input="\n".join(cmds) + "\n")


class Network:
    """The lab's wiring for the sites of a plan (all revisions of a change included)."""

    def __init__(self, plan: LabPlan, state: Path, make_router_ns: bool = True):
        self.plan = plan
        self.infra: Infra = plan.infra
        self.state = state
        self.make_router_ns = make_router_ns  # a container router's namespace is its container's
        self.namespaces: list[str] = []
        self.pidfiles: list[Path] = []
        self.gated = False
        # a dynamic site's current outside address (its NAT's): the address the internet routes to it
        self.outside = {s.name: s.nat.outside for s in plan.network_sites if s.nat}

    def reach(self, s: SitePlan) -> str:
        """The address the internet routes to this site: its public address, or its NAT's outside one."""
        return self.outside.get(s.name, s.public) if s.nat else s.public

    # ---- building -------------------------------------------------------------------------------
    def _namespaces_of(self, s: SitePlan, router: bool) -> list[str]:
        return (([s.router_ns] if router else []) + [s.dns_ns] + [lan.host_ns for lan in s.lans]
                + ([s.nat.ns] if s.nat else []))

    def _links_of(self, s: SitePlan, rewire: bool = False) -> list[str]:
        if s.nat:  # router -> its carrier's NAT -> the internet (a reboot remakes only the router's link)
            cmds = [f"link add wan netns {s.router_ns} type veth peer name in0 netns {s.nat.ns}"]
            if not rewire:
                cmds.append(f"link add out0 netns {s.nat.ns} type veth peer name {s.inet_if} netns {self.infra.inet_ns}")
        else:
            cmds = [f"link add wan netns {s.router_ns} type veth peer name {s.inet_if} netns {self.infra.inet_ns}"]
        for j, lan in enumerate(s.lans):
            cmds.append(f"link add h{j} netns {s.router_ns} type veth peer name eth0 netns {lan.host_ns}")
        cmds.append(f"link add d0 netns {s.router_ns} type veth peer name eth0 netns {s.dns_ns}")
        return cmds

    def _inet_side(self, s: SitePlan, gated: bool) -> list[str]:
        to = self.reach(s)
        route = f"route add blackhole {to}/32" if gated else f"route add {to}/32 dev {s.inet_if}"
        return [f"link set {s.inet_if} up", f"addr add {self.infra.inet_gw}/32 dev {s.inet_if}", route]

    def _nat_inside(self, s: SitePlan) -> list[str]:
        n = s.nat
        return [f"link set in0 mtu {n.mtu}", "link set in0 up", f"addr add {n.inside_gw}/32 dev in0",
                f"route add {n.inside}/32 dev in0"]

    def _nat_outside(self, s: SitePlan) -> list[str]:
        gw = self.infra.inet_gw
        return ["link set lo up", "link set out0 up", f"addr add {self.reach(s)}/32 dev out0",
                f"route add {gw}/32 dev out0", f"route add default via {gw} dev out0"]

    def _nat_rules(self, s: SitePlan) -> None:
        """The carrier's NAT: masquerade behind its outside address (iptables-legacy: the User-Mode Linux
        kernel has no nftables ip family, docs/reference lab-substrate), and, as many carriers' paths do,
        no ICMP 'fragmentation needed' back to the internet: path MTU discovery across it fails, so
        TCP through the narrower link works only with the MSS clamp (a PMTU black hole)."""
        for rule in (["-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j", "MASQUERADE"],
                     ["-A", "OUTPUT", "-o", "out0", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"]):
            in_ns(s.nat.ns, ["iptables-legacy", "-w"] + rule)

    def _router_side(self, s: SitePlan) -> list[str]:
        gw = s.nat.inside_gw if s.nat else self.infra.inet_gw
        cmds = ["link set lo up"] + ([f"link set wan mtu {s.nat.mtu}"] if s.nat else []) + [
                "link set wan up", f"addr add {s.public}/32 dev wan",
                f"route add {gw}/32 dev wan", f"route add default via {gw} dev wan"]
        dns_lan: LanPlan | None = None
        for j, lan in enumerate(s.lans):
            cmds += [f"link add {lan.bridge} type bridge", f"link set {lan.bridge} up",
                     f"addr add {lan.router_address}/{lan.prefixlen} dev {lan.bridge}",
                     f"link set h{j} master {lan.bridge}", f"link set h{j} up"]
            if (lan.has_dns or (s.router_dns and j == 0)) and dns_lan is None:
                dns_lan = lan
                cmds += [f"link set d0 master {lan.bridge}", "link set d0 up"]
        return cmds

    def _hosts_of(self, s: SitePlan) -> None:
        for lan in s.lans:
            _batch(lan.host_ns, ["link set lo up", "link set eth0 up", f"addr add {lan.host}/{lan.prefixlen} dev eth0",
                                 f"route add default via {lan.router_address}"])
        if s.router_dns:  # no DNS host: a DHCP client host on the first LAN (it takes its address by DHCP)
            _batch(s.dns_ns, ["link set lo up", "link set eth0 up"])
            return
        dns_lan = next(lan for lan in s.lans if lan.has_dns)
        _batch(s.dns_ns, ["link set lo up", "link set eth0 up", f"addr add {s.dns_server}/{dns_lan.prefixlen} dev eth0",
                          f"route add default via {dns_lan.router_address}"])

    def build(self, gated: bool = False) -> None:
        """Every namespace and link. `gated`: the internet drops what goes to a router's public
        address (a blackhole route) until `open_gate`."""
        inet = self.infra.inet_ns
        sites = self.plan.network_sites
        made = [inet] + [ns for s in sites for ns in self._namespaces_of(s, self.make_router_ns)]
        _batch(None, [f"netns add {ns}" for ns in made] + [c for s in sites for c in self._links_of(s)])
        self.namespaces += made
        cmds = ["link set lo up", f"addr add {self.infra.isp_resolver}/32 dev lo"]
        if self.plan.serve_release:
            cmds.append(f"addr add {self.infra.release_server}/32 dev lo")
        for s in sites:
            cmds += self._inet_side(s, gated)
        _batch(inet, cmds)
        self.gated = gated
        for s in sites:
            if s.nat:
                _batch(s.nat.ns, self._nat_outside(s) + self._nat_inside(s))
                self._nat_rules(s)
            _batch(s.router_ns, self._router_side(s))
            self._hosts_of(s)
        for ns in [inet] + [s.router_ns for s in sites] + [s.nat.ns for s in sites if s.nat]:
            enable_forwarding(ns)

    def open_gate(self) -> None:
        """Let IKE through: real routes to every router's public address in place of the blackholes."""
        if self.gated:
            _batch(self.infra.inet_ns, [f"route replace {self.reach(s)}/32 dev {s.inet_if}" for s in self.plan.network_sites])
            self.gated = False

    def rewire_router(self, s: SitePlan) -> None:
        """After a router's namespace was deleted (a reboot): a new one, wired as before. Its LAN
        hosts and DNS server keep their namespaces; their ends of the links come back new."""
        _batch(None, [f"netns add {s.router_ns}"] + self._links_of(s, rewire=True))
        if s.nat:  # the NAT and its uplink stay; only the link to the router is new
            _batch(s.nat.ns, self._nat_inside(s))
        else:
            _batch(self.infra.inet_ns, self._inet_side(s, self.gated))
        _batch(s.router_ns, self._router_side(s))
        self._hosts_of(s)
        enable_forwarding(s.router_ns)

    def delete_router_ns(self, s: SitePlan) -> None:
        run(["ip", "netns", "del", s.router_ns])

    def readdress(self, before: SitePlan, after: SitePlan) -> None:
        """A site's LANs renumbered (a change widened or moved them): the router's bridge address,
        its LAN hosts and its DNS server get the new ones, as the operator's LAN change and DHCP
        would. The number of LANs must stay (a LAN added to a running site is not modelled yet)."""
        if len(before.lans) != len(after.lans):
            raise LabError(f"site {after.name}: a change that adds or removes a LAN is not modelled by the lab yet")
        cmds = []
        for old, new in zip(before.lans, after.lans, strict=True):
            if (old.router_address, old.prefixlen, old.host) == (new.router_address, new.prefixlen, new.host):
                continue
            cmds += [f"addr del {old.router_address}/{old.prefixlen} dev {old.bridge}",
                     f"addr add {new.router_address}/{new.prefixlen} dev {new.bridge}"]
            _batch(old.host_ns, ["addr flush dev eth0", f"addr add {new.host}/{new.prefixlen} dev eth0",
                                 f"route replace default via {new.router_address}"])
        _batch(after.router_ns, cmds)
        if before.router_dns or after.router_dns:
            return
        old_dns = next(lan for lan in before.lans if lan.has_dns)
        new_dns = next(lan for lan in after.lans if lan.has_dns)
        moved = (old_dns.prefixlen, old_dns.router_address, before.dns_server) != (new_dns.prefixlen, new_dns.router_address,
                                                                                   after.dns_server)
        if moved:
            _batch(after.dns_ns, ["addr flush dev eth0", f"addr add {after.dns_server}/{new_dns.prefixlen} dev eth0",
                                  f"route replace default via {new_dns.router_address}"])

    # ---- the WAN link ----------------------------------------------------------------------------
    def cut_wan(self, s: SitePlan) -> None:
        """The router's line goes dead: its link's far end (the internet's) goes down; the router
        sees no carrier, as with a pulled cable or a dead modem."""
        run(["ip", "-n", self.infra.inet_ns, "link", "set", s.inet_if, "down"])

    def restore_wan(self, s: SitePlan) -> None:
        """The line comes back: the link up, and the internet's route to the router again (the
        kernel dropped it with the link)."""
        route = "blackhole " if self.gated else ""
        dev = "" if self.gated else f" dev {s.inet_if}"
        _batch(self.infra.inet_ns, [f"link set {s.inet_if} up", f"route replace {route}{self.reach(s)}/32{dev}"])

    def renat(self, s: SitePlan) -> tuple[str, str]:
        """The carrier gives the site's NAT another outside address (a new lease, a CGNAT pool change):
        the old one is gone from the internet; deleting it makes the masquerade drop every conntrack
        entry that was mapped to it (Linux net/netfilter/nf_nat_masquerade.c, masq_inet_event), so the
        router's next packet leaves from the new address. Returns (old, new); a second call swaps back."""
        old = self.reach(s)
        new = s.nat.outside_next if old == s.nat.outside else s.nat.outside
        gw = self.infra.inet_gw
        _batch(s.nat.ns, [f"addr add {new}/32 dev out0", f"addr del {old}/32 dev out0",
                          f"route replace {gw}/32 dev out0", f"route replace default via {gw} dev out0"])
        _batch(self.infra.inet_ns, [f"route del {old}/32", f"route replace {new}/32 dev {s.inet_if}"])
        self.outside[s.name] = new
        return old, new

    # ---- the ISP resolver and the sites' DNS servers ----------------------------------------------
    def start_isp_resolver(self) -> None:
        i = self.infra
        d = self.state / "isp"
        d.mkdir()
        conf = d / "dnsmasq.conf"
        conf.write_text("\n".join([
            "no-resolv", "no-hosts", f"listen-address={i.isp_resolver}", "bind-interfaces", "user=root",
            f"pid-file={d}/dnsmasq.pid", f"log-facility={d}/dnsmasq.log", "log-queries",
            f"address=/{i.rebind_name}/{i.rebind_answer}", f"address=/#/{i.isp_answer}", ""]))
        in_ns(i.inet_ns, ["dnsmasq", f"--conf-file={conf}"])
        self.pidfiles.append(d / "dnsmasq.pid")

    def start_dns_servers(self) -> None:
        for s in self.plan.network_sites:
            if s.router_dns:  # the router's own dnsmasq serves the domain (lab/platform.py dnsmasq_base)
                continue
            d = self.state / f"dns-{s.name}"
            d.mkdir()
            records = dict(s.records)
            records[s.probe_record[0]] = s.probe_record[1]
            lines = ["no-resolv", "no-hosts", f"listen-address={s.dns_server}", "bind-interfaces", "user=root",
                     f"pid-file={d}/dnsmasq.pid", f"log-facility={d}/dnsmasq.log", "log-queries",
                     f"local=/{s.domain}/"]
            lines += [f"host-record={name},{addr}" for name, addr in sorted(records.items())]
            (d / "dnsmasq.conf").write_text("\n".join(lines) + "\n")
            in_ns(s.dns_ns, ["dnsmasq", f"--conf-file={d / 'dnsmasq.conf'}"])
            self.pidfiles.append(d / "dnsmasq.pid")

    def dns_log(self, site: str) -> str:
        try:
            return (self.state / f"dns-{site}" / "dnsmasq.log").read_text()
        except FileNotFoundError:
            return ""

    # ---- teardown ---------------------------------------------------------------------------------
    def teardown(self) -> None:
        for pf in self.pidfiles:
            try:
                os.kill(int(pf.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        if self.namespaces:
            gone = "".join(f"netns del {ns}\n" for ns in reversed(self.namespaces))
            subprocess.run(["ip", "-force", "-batch", "-"], input=gone, capture_output=True, text=True)
