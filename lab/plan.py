"""The lab's plan: from the WAN model and the rendered trees to the typed plan the lab kernel runs.

Addresses: every router's WAN veth holds its public address /32 and routes through an "internet"
namespace (the lab's gateway address on its side of every link); an ISP resolver and, for the
release scenario, a release server sit there too. The lab's own addresses are picked per run
around the WAN's (`pick_infra`): a WAN may use 100.64.0.0/10 (CGNAT) or 198.18.0.0/15 itself.
Each LAN is a bridge in the router's namespace with the router, one LAN host and (in the LAN that
holds it) the site's DNS server host.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from render import paths
from render.manifest import Manifest
from render.model import Wan

from .contracts import Infra, LanPlan, NatPlan, SitePlan, TransitPlan, TunnelPlan, WanView

REBIND_NAME = "rebind-test.example"  # the ISP answers it with a private address: must be blocked
OUTSIDE_NAME = "outside-the-wan.example"

# Where the lab's own addresses come from, in order of preference (the first free one wins).
INFRA_POOL = IPv4Network("100.64.0.0/10")  # the internet's side: gateway, ISP resolver, release server
ANSWER_POOL = IPv4Network("198.18.0.0/15")  # a public answer for names outside the WAN (benchmarking range)
REBIND_POOL = IPv4Network("10.0.0.0/8")  # a private answer from outside (must be dropped by rebind protection)


# A dynamic site's carrier-grade NAT: inside addresses from the CGNAT range (RFC 6598, as a carrier
# numbers its customers), outside ones from the benchmarking range, each well away from the offsets
# pick_infra uses; the link between router and NAT is narrower than the 1500-byte LANs, as on PPPoE,
# DS-Lite or LTE, so TCP across the tunnel needs the MSS clamp.
NAT_INSIDE_OFFSET = 4096
NAT_OUTSIDE_OFFSET = 4096
NAT_MTU = 1400


class AddressesExhausted(ValueError):
    pass


def wan_addresses(wans: list[Wan]) -> tuple[set[IPv4Address], list[IPv4Network]]:
    """Every address and network the WANs use (public, LAN, DNS server, records, IKE ids)."""
    addrs: set[IPv4Address] = set()
    nets: list[IPv4Network] = []
    for wan in wans:
        for s in wan.sites:
            addrs |= {a for a in (s.router.public_address, s.router.lan_address, s.dns.server) if a is not None}
            addrs |= {a for _, a in s.dns.records}
            nets += list(s.lans)
    return addrs, nets


def _free(pool: IPv4Network, taken: set[IPv4Address], nets: list[IPv4Network], start: int, n: int) -> list[IPv4Address]:
    """n addresses of `pool` from offset `start` on, none in `taken` nor inside a WAN network."""
    got = []
    for k in range(start, pool.num_addresses - 1):
        a = pool.network_address + k
        if a in taken or any(a in net for net in nets) or a == pool.broadcast_address:
            continue
        got.append(a)
        if len(got) == n:
            return got
    raise AddressesExhausted(f"no free lab address in {pool} around the WAN's addresses")


def pick_infra(wans: list[Wan], prefix: str) -> Infra:
    """The lab's addresses: 100.64.0.1 / .53 / .80, 198.18.0.1 and 10.66.66.66 where the WAN leaves
    them free, else the next free ones of the same ranges."""
    taken, nets = wan_addresses(wans)
    gw, resolver, server = _free(INFRA_POOL, taken, nets, 1, 1)[0], None, None
    taken.add(gw)
    resolver = _free(INFRA_POOL, taken, nets, 53, 1)[0]
    taken.add(resolver)
    server = _free(INFRA_POOL, taken, nets, 80, 1)[0]
    taken.add(server)
    answer = _free(ANSWER_POOL, taken, nets, 1, 1)[0]
    rebind = _free(REBIND_POOL, taken, nets, (66 << 16) + (66 << 8) + 66, 1)[0]
    return Infra(inet_ns=f"{prefix}inet", inet_gw=str(gw), isp_resolver=str(resolver), isp_answer=str(answer),
                 rebind_name=REBIND_NAME, rebind_answer=str(rebind), outside_name=OUTSIDE_NAME,
                 release_server=str(server))


def _free_host(net: IPv4Network, taken: set[IPv4Address]) -> IPv4Address:
    hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
    for candidate in reversed(hosts[len(hosts) // 2:] or hosts):
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free address for a lab host in {net}")


def start_order(wan: Wan) -> tuple[str, ...]:
    """Responders before their initiators, so no first IKE_SA_INIT meets an unloaded peer (serial start)."""
    order, started = [], set()
    pending = [s.name for s in wan.sites]
    while pending:
        for name in list(pending):
            if all(t.peer_of(name) in started for t in wan.tunnels_of(name) if t.initiator == name):
                order.append(name)
                started.add(name)
                pending.remove(name)
                break
        else:  # a cycle cannot happen with the topology's initiator rule; start the rest anyway
            order.extend(pending)
            break
    return tuple(order)


def wan_view(wan: Wan, out: Path, prefix: str, index: dict[str, int] | None = None,
             targets: dict[str, int] | None = None, nss: dict[str, str] | None = None,
             roots: dict[int, str] | None = None, fw_root: tuple[str, str] | None = None,
             fw_in_roots: dict[int, str] | None = None) -> WanView:
    """The lab's view of one revision of the WAN. `index` numbers the sites (namespace and
    interface names) when several revisions share one lab; `targets`: the Libreswan major each
    site's file asks for, where the lab renders another; `nss`: each router's own NSS database
    (its lab keys, lab/keys.py); `roots`: the root file system per Libreswan major other than the
    lab kernel's own (5: lab/libreswan5.py), where routers rendered for that major run; `fw_root`:
    (directory, firewalld version) of the firewalld root (lab/firewalld.py), where the EL routers with
    `firewall: firewalld` on the lab kernel's own major run; `fw_in_roots`: major -> the firewalld version
    of that major's root where its EL firewalld routers run it for real (the Libreswan 5 root carries one)."""
    sites = []
    taken_all, nets_all = wan_addresses([wan])
    manifests = {s.name: Manifest.read(out / s.name / paths.MANIFEST) for s in wan.sites}
    for s in wan.sites:
        i = index[s.name] if index else wan.sites.index(s)
        lans = []
        for j, net in enumerate(s.lans):
            taken = {s.router.lan_address, s.dns.server} | {a for _, a in s.dns.records}
            router_addr = s.router.lan_address if s.router.lan_address in net else next(h for h in net.hosts() if h not in taken)
            taken.add(router_addr)
            host = _free_host(net, taken)
            lans.append(LanPlan(subnet=str(net), prefixlen=net.prefixlen, bridge="br-lan" if j == 0 else f"br-lan{j}",
                                router_address=str(router_addr), host=str(host), host_ns=f"{prefix}h{i}x{j}",
                                has_dns=s.dns.server in net and not s.router_dns))
        nat = None
        if s.router.dynamic:
            inside, inside_gw = _free(INFRA_POOL, taken_all, nets_all, NAT_INSIDE_OFFSET + 4 * i, 2)
            outside, outside_next = _free(ANSWER_POOL, taken_all, nets_all, NAT_OUTSIDE_OFFSET + 4 * i, 2)
            nat = NatPlan(ns=f"{prefix}n{i}", inside=str(inside), inside_gw=str(inside_gw), outside=str(outside),
                          outside_next=str(outside_next), mtu=NAT_MTU)
        records = {f"{name}.{s.dns.domain}": str(addr) for name, addr in s.dns.records}
        probe = (f"lab-probe.{s.dns.domain}", lans[0].host)
        # real firewalld: an EL firewalld router, in the firewalld root on the lab kernel's own Libreswan,
        # in its major's root (with that root's firewalld) on another
        el_fwd = s.router.platform == "el" and s.router.firewall == "firewalld"
        in_root = s.router.libreswan in (roots or {})
        real_fw = fw_root is not None and el_fwd and not in_root
        fw_version = fw_root[1] if real_fw else ((fw_in_roots or {}).get(s.router.libreswan, "") if el_fwd and in_root else "")
        sites.append(SitePlan(
            name=s.name, index=i, platform=s.router.platform, libreswan=s.router.libreswan,
            target_libreswan=(targets or {}).get(s.name, s.router.libreswan),
            public=nat.inside if nat else str(s.router.public_address), lan_address=str(s.router.lan_address),
            router_ns=f"{prefix}r{i}", dns_ns=f"{prefix}d{i}", inet_if=f"r{i}", lans=tuple(lans),
            domain=s.dns.domain, dns_server=str(s.dns.server), dns_mode=s.dns_mode, records=records,
            probe_record=probe,
            # the name a remote LAN host asks for: a real record where the router can know it
            check_name=(sorted(records.items())[0] if records else probe),
            tree=str((out / s.name).resolve()),
            conns={t.name: tuple(manifests[s.name].tunnels[t.name].conns) for t in wan.tunnels_of(s.name)},
            nss=(nss or {}).get(s.name, ""),
            root=(roots or {}).get(s.router.libreswan, "") or (fw_root[0] if real_fw else ""),
            firewalld=fw_version,
            firewall=s.router.firewall,
            router_dns=s.router_dns, nat=nat,
            shapes=site_shapes(wan, s.name)
            + tuple(word for word, on in (("dynamic", s.router.dynamic), ("router-dns", s.router_dns)) if on),
        ))
    return WanView(name=wan.name, topology=wan.topology, sites=tuple(sites),
                   tunnels=tuple(TunnelPlan(name=t.name, a=t.a, b=t.b, initiator=t.initiator) for t in wan.tunnels),
                   start_order=start_order(wan),
                   transits=tuple(TransitPlan(a=x.a, b=x.b, hub=x.hub) for x in wan.transits))


def site_shapes(wan: Wan, name: str) -> tuple[str, ...]:
    """The shape words of a site (issue 14 item 6): `hub` / `spoke` in hub-and-spoke WANs."""
    if wan.topology != "hub-and-spoke":
        return ()
    return ("hub",) if name in wan.hubs else ("spoke",)
