"""The WAN model: the only vocabulary templates, the lab, the plan and the release read.

Everything here is immutable and already validated; nothing downstream reads raw YAML.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network

from .hostkey import HostKey


@dataclass(frozen=True)
class CryptoProfile:
    name: str
    ike: tuple[str, ...]
    esp: tuple[str, ...]
    ikelifetime: int = 28800
    salifetime: int = 3600
    insecure: tuple[str, ...] = ()  # weak algorithms allowed on purpose (wan.yaml `insecure:`); the plan shows them


@dataclass(frozen=True)
class Dpd:
    delay: int = 10
    timeout: int = 60


@dataclass(frozen=True)
class Router:
    platform: str  # "openwrt" | "el"
    libreswan: int  # 4 | 5
    public_address: IPv4Address | None  # None: dynamic (behind NAT/CGNAT or changing; known by its ike_id)
    lan_address: IPv4Address
    ike_id: str  # "@name" or the public address as text
    key: HostKey  # the key it signs with (its private half is in the router's NSS database only)
    next_key: HostKey | None = None  # rollover step 1: made, accepted by the peers, not used yet
    previous_key: HostKey | None = None  # rollover step 2: no longer used, still accepted by the peers
    release: str = "24.10"  # the platform's release: OpenWrt "23.05" | "24.10", EL "8" | "9" | "10"
    firewall: str = "fw4"  # OpenWrt "fw4"; EL "firewalld" | "nftables"

    @property
    def dynamic(self) -> bool:
        """Its public address is not known: it sits behind NAT or carrier-grade NAT, or its address
        changes. It always starts its tunnels; its peers accept it from any address by its IKE id."""
        return self.public_address is None

    @property
    def address(self) -> str:
        """The public address as the plan, the manifest and the graph show it: an address or 'dynamic'."""
        return "dynamic" if self.public_address is None else str(self.public_address)

    @property
    def extra_keys(self) -> tuple[HostKey, ...]:
        """The keys its peers accept beside `key` during a rollover (whack --addkey on each peer)."""
        return tuple(k for k in (self.previous_key, self.next_key) if k is not None)


@dataclass(frozen=True)
class Dns:
    domain: str
    server: IPv4Address
    records: tuple[tuple[str, IPv4Address], ...]  # (name relative to domain, address), sorted


@dataclass(frozen=True)
class Site:
    name: str
    file: str
    router: Router
    lans: tuple[IPv4Network, ...]
    dns: Dns
    crypto_profile: str | None  # the site's own override, None = WAN default
    dpd: Dpd
    dns_mode: str  # "forward" | "hosts"

    @property
    def router_dns(self) -> bool:
        """The router's own dnsmasq is the site's DNS server (dns.server is its LAN address): it serves the
        domain from its records and DHCP leases, and answers the other sites' LANs through the tunnels."""
        return self.dns.server == self.router.lan_address


@dataclass(frozen=True)
class Tunnel:
    """One IKEv2 tunnel between two sites; `a` < `b` by name, so both ends share the name."""

    name: str
    a: str
    b: str
    initiator: str  # the one end that has auto=start
    crypto: CryptoProfile

    def peer_of(self, site: str) -> str:
        return self.b if site == self.a else self.a


@dataclass(frozen=True)
class Transit:
    """Spoke-to-spoke traffic in hub-and-spoke: the LANs of spokes `a` and `b` (a < b by name) reach
    each other through `hub`, whose tunnels to both carry the pair's selectors (render/topology.py)."""

    a: str
    b: str
    hub: str

    def other(self, site: str) -> str:
        return self.b if site == self.a else self.a


@dataclass(frozen=True)
class Wan:
    name: str
    topology: str  # "mesh" | "hub-and-spoke"
    hubs: tuple[str, ...]
    sites: tuple[Site, ...]  # sorted by name
    tunnels: tuple[Tunnel, ...]  # sorted by name
    source_dir: str
    release_valid_days: int = 90  # wan.yaml release.valid_days: how long a signed release stays valid
    transits: tuple[Transit, ...] = ()  # hub-and-spoke: every spoke-to-spoke pair and its hub, sorted

    @cached_property
    def _by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}

    @cached_property
    def _tunnels_by_site(self) -> dict[str, tuple[Tunnel, ...]]:
        out: dict[str, list[Tunnel]] = {s.name: [] for s in self.sites}
        for t in self.tunnels:
            out[t.a].append(t)
            out[t.b].append(t)
        return {k: tuple(v) for k, v in out.items()}

    def site(self, name: str) -> Site:
        return self._by_name[name]

    def tunnels_of(self, site: str) -> tuple[Tunnel, ...]:
        return self._tunnels_by_site[site]

    # ---- transit (hub-and-spoke): spoke LANs reach each other through one hub ------------------

    def transits_of(self, site: str) -> tuple[Transit, ...]:
        """The transit pairs `site` is an end of (a spoke) or carries (a hub)."""
        return tuple(x for x in self.transits if site in (x.a, x.b, x.hub))

    def carried(self, tunnel: Tunnel, site: str) -> tuple[str, ...]:
        """The sites whose LANs travel on `site`'s side of `tunnel` besides its own: on a hub's end of
        a hub-spoke tunnel, the spokes whose transit to that spoke goes through this hub."""
        peer = tunnel.peer_of(site)
        return tuple(sorted(x.other(peer) for x in self.transits if x.hub == site and peer in (x.a, x.b)))

    def selectors(self, tunnel: Tunnel, site: str) -> tuple[tuple[IPv4Network, ...], tuple[IPv4Network, ...]]:
        """(this end's subnets, the peer's subnets) of `tunnel` as `site`'s conn names them: each
        end's own LANs, and on a hub's end also the LANs of the spokes it carries to the peer."""
        def side(end: str) -> tuple[IPv4Network, ...]:
            return self.site(end).lans + tuple(n for s in self.carried(tunnel, end) for n in self.site(s).lans)
        return side(site), side(tunnel.peer_of(site))

    def reached(self, site: str) -> tuple[Site, ...]:
        """Every other site whose LANs `site`'s LANs reach: its tunnel peers and, for a spoke, the
        spokes reached through a hub; sorted by name."""
        names = {t.peer_of(site) for t in self.tunnels_of(site)}
        names |= {x.other(site) for x in self.transits if site in (x.a, x.b)}
        return tuple(self.site(n) for n in sorted(names))

    def transit_hub(self, a: str, b: str) -> str | None:
        """The hub that carries spoke a <-> spoke b, None when the two are not a transit pair."""
        a, b = sorted((a, b))
        return next((x.hub for x in self.transits if (x.a, x.b) == (a, b)), None)
