"""The lab's typed contracts: the plan the host gives the lab kernel, and the result it gives back.

Every JSON document that crosses the kernel boundary is one of these dataclasses; only this module
spells their keys (`to_json` / `from_json`, derived from the fields). Scenario data travels inside
the plan as an opaque mapping that only its scenario module reads (each has its own dataclass).
docs/lab.md documents both documents for CI and reviewers.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Record")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _decode(args[0], value)
    if dataclasses.is_dataclass(tp):
        return tp.from_dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if origin is list:
        return [_decode(typing.get_args(tp)[0], v) for v in value]
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _decode(vt, v) for k, v in value.items()}
    return value


class Record:
    """A dataclass that round-trips through JSON: nested records, tuples, lists, dicts, optionals."""

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        hints = typing.get_type_hints(cls)
        kw = {f.name: _decode(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
        return cls(**kw)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def read(cls: type[T], path: Path) -> T:
        return cls.from_json(path.read_text())


# ---- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LanPlan(Record):
    subnet: str
    prefixlen: int
    bridge: str  # the bridge in the router's namespace: br-lan, br-lan1, ...
    router_address: str
    host: str  # the LAN host's address
    host_ns: str
    has_dns: bool  # the site's DNS server sits in this LAN


@dataclass(frozen=True)
class NatPlan(Record):
    """A dynamic site's carrier-grade NAT: a namespace between its router and the internet that
    masquerades the router's traffic behind an outside address, which changes mid-run (lab/scenarios/nat.py)."""

    ns: str
    inside: str  # the router's own WAN address (inside the NAT): SitePlan.public of the site
    inside_gw: str  # the NAT's inside address, the router's gateway
    outside: str  # the NAT's public address at the start
    outside_next: str  # its public address after the change
    mtu: int  # the link between the router and the NAT (smaller than the LANs' 1500: the MSS clamp is needed)


@dataclass(frozen=True)
class SitePlan(Record):
    name: str
    index: int
    platform: str  # el | openwrt
    libreswan: int  # the major the lab renders and runs
    target_libreswan: int  # the major the site's file asks for (a 5.x site runs a 4.x rendering here)
    public: str
    lan_address: str
    router_ns: str
    dns_ns: str
    inet_if: str  # its link's name in the internet namespace
    lans: tuple[LanPlan, ...]
    domain: str
    dns_server: str
    dns_mode: str
    records: dict[str, str]  # fqdn -> address, served by the site's DNS server
    probe_record: tuple[str, str]  # a name the lab adds to the site's DNS server
    check_name: tuple[str, str]  # the name a remote LAN host asks for, and its answer
    tree: str  # the rendered tree (out/<router>)
    conns: dict[str, tuple[str, ...]]  # tunnel -> its conn names on this router
    # the router's own NSS database holding the private halves of its lab keys (lab/keys.py),
    # copied onto the router's disk at first boot; "": an empty database (a router with no key)
    nss: str = ""
    # the root file system the router runs in: "" the lab kernel's own (Debian 12, Libreswan 4.10);
    # else a directory holding another Libreswan (lab/libreswan5.py: Debian 13, 5.2), that its holder
    # chroots into (lab/router-setup.sh)
    root: str = ""
    # the site's router is its LAN's DNS server (dns.server is its LAN address): no DNS host; the dns_ns
    # namespace is a DHCP client host on its first LAN instead (lab/proofs.py router_dns)
    router_dns: bool = False
    # the firewalld version this router runs for real (lab/firewalld.py: an EL router with `firewall:
    # firewalld` in a lab kernel with the firewall, in the firewalld root `root`); "": none
    firewalld: str = ""
    firewall: str = ""  # the site's router.firewall: fw4 (OpenWrt), firewalld or nftables (EL)
    nat: NatPlan | None = None  # a dynamic site sits behind a carrier-grade NAT in the lab
    shapes: tuple[str, ...] = ()  # the site's shapes: "hub", "spoke", "dynamic", "router-dns" (the verdict's site lines)

    def all_conns(self) -> set[str]:
        return {c for cs in self.conns.values() for c in cs}


@dataclass(frozen=True)
class TunnelPlan(Record):
    name: str
    a: str
    b: str
    initiator: str

    def peer_of(self, site: str) -> str:
        return self.b if site == self.a else self.a


@dataclass(frozen=True)
class TransitPlan(Record):
    """Hub-and-spoke transit: spokes a and b (a < b) reach each other's LANs through `hub`."""

    a: str
    b: str
    hub: str


@dataclass(frozen=True)
class WanView(Record):
    """One revision of the WAN as the lab sees it: sites, tunnels, and the order routers start in."""

    name: str
    topology: str
    sites: tuple[SitePlan, ...]
    tunnels: tuple[TunnelPlan, ...]
    start_order: tuple[str, ...]  # responders before their initiators
    transits: tuple[TransitPlan, ...] = ()  # spoke-to-spoke pairs and the hub each goes through

    def site(self, name: str) -> SitePlan:
        return next(s for s in self.sites if s.name == name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def tunnel_between(self, a: str, b: str) -> TunnelPlan | None:
        name = "-".join(sorted((a, b)))
        return next((t for t in self.tunnels if t.name == name), None)

    def joined_pairs(self) -> list[tuple[SitePlan, SitePlan]]:
        """Ordered pairs of sites the topology joins by a tunnel (mesh: all; hub-and-spoke: spoke-hub)."""
        return [(s, o) for s in self.sites for o in self.sites if s.name != o.name and self.tunnel_between(s.name, o.name)]

    def transit_hub(self, a: str, b: str) -> str | None:
        """The hub spoke a reaches spoke b through, None if the pair is not a transit pair."""
        a, b = sorted((a, b))
        return next((x.hub for x in self.transits if (x.a, x.b) == (a, b)), None)

    def transit_pairs(self) -> list[tuple[SitePlan, SitePlan, str]]:
        """Ordered (spoke, other spoke, hub) of every transit pair, both directions."""
        return [(s, o, hub) for s in self.sites for o in self.sites
                if s.name != o.name and (hub := self.transit_hub(s.name, o.name))]

    def reached_pairs(self) -> list[tuple[SitePlan, SitePlan]]:
        """Ordered pairs whose LANs reach each other: joined by a tunnel, or through a hub."""
        return [(s, o) for s in self.sites for o in self.sites if s.name != o.name
                and (self.tunnel_between(s.name, o.name) or self.transit_hub(s.name, o.name))]

    def unjoined_pairs(self) -> list[tuple[str, str]]:
        return [(s.name, o.name) for s in self.sites for o in self.sites
                if s.name < o.name and not self.tunnel_between(s.name, o.name) and not self.transit_hub(s.name, o.name)]


@dataclass(frozen=True)
class Infra(Record):
    """The lab's own addresses, picked per run so that none is one of the WAN's (lab/plan.py)."""

    inet_ns: str
    inet_gw: str  # the internet's side of every router's link
    isp_resolver: str
    isp_answer: str  # what the ISP resolver answers for any name outside the WAN
    rebind_name: str
    rebind_answer: str  # a private answer from outside: routers must drop it
    outside_name: str
    release_server: str


@dataclass(frozen=True)
class ScenarioCall(Record):
    name: str  # a key of lab.scenarios.REGISTRY
    data: dict  # the scenario's own document (its prepare() made it; only its play() reads it)


@dataclass(frozen=True)
class DockerPlan(Record):
    engine: str  # host | guest
    image: str
    data_root: str | None = None


@dataclass(frozen=True)
class LabPlan(Record):
    prefix: str  # namespace names start with it; unique per run
    firewall: bool
    libreswan_major: int
    routers: str  # netns | docker
    infra: Infra
    wan: WanView  # the WAN the routers start as
    network_sites: tuple[SitePlan, ...]  # every site wired (a change adds sites later)
    install: dict[str, str] = field(default_factory=dict)  # router -> tree installed at first boot, if not its rendering
    serve_release: bool = False
    scenarios: tuple[ScenarioCall, ...] = ()
    start: str = "gated"  # gated (all routers at once, IKE held back until all are loaded) | serial
    tunnel_timeout: float | None = None  # the bound on the tunnel wait; None: lab/proofs.py's default
    hold: str | None = None  # lab.up: the control directory
    docker: DockerPlan | None = None
    # router -> which Libreswan runs it (the shape of LabResult.libreswan; lab/run.py libreswan_per_router)
    libreswan: dict[str, dict] = field(default_factory=dict)
    # router -> which firewall runs on it (the shape of LabResult.firewalls; lab/run.py firewalls_per_router)
    firewalls: dict[str, str] = field(default_factory=dict)


# ---- the result ----------------------------------------------------------------------------------

@dataclass
class Check(Record):
    kind: str  # tunnel, ping, router_ping, dns, dns_outside, dns_rebind, capture, firewall, or a scenario's
    src: str
    dst: str
    ok: bool
    evidence: dict


@dataclass
class LabResult(Record):
    ok: bool = False
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    firewall_exercised: bool = False
    error: str | None = None
    scenarios: dict[str, dict] = field(default_factory=dict)  # scenario name -> its report
    unjoined_pairs: list[tuple[str, str]] = field(default_factory=list)  # pairs no tunnel joins: not proven
    transit_pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (spoke, spoke, hub): proven through the hub
    shapes: dict[str, list[str]] = field(default_factory=dict)  # site -> SitePlan.shapes
    other_major: dict[str, str] = field(default_factory=dict)  # router -> "targets 5, ran a 4.x rendering"
    # router -> which Libreswan ran it: {"target": 5, "ran": "5.2", "root": "/...root-trixie-..."|"" (the lab
    # kernel's own), "why": why a router that targets another major ran the lab kernel's, else ""}
    libreswan: dict[str, dict] = field(default_factory=dict)
    # router -> which firewall ran on it: "firewalld 1.3.3" (real, lab/firewalld.py), "the lab's model of
    # EL's firewall", "the lab's model of fw4", or "not exercised (why)"
    firewalls: dict[str, str] = field(default_factory=dict)
    # which keys the routers used: {"origin": "lab", "why": ..., "ckaids": {router: [CKAID, ...]}}
    # (public fingerprints only; the private halves stay in the routers' NSS databases)
    keys: dict = field(default_factory=dict)
    key_generation_seconds: dict[str, list[float]] = field(default_factory=dict)  # keys made during this run
    # the commit and the digest of the site files this result proves: {"revision", "sites_digest"}
    source: dict = field(default_factory=dict)
    kernel: str = ""
    kernel_origin: str = ""  # which build of it: "Debian 13's user-mode-linux 6.12um1+b22 (6.12.113)"
    routers: str = "netns"
    boot_seconds: float = 0.0
    total_seconds: float = 0.0

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> tuple[int, int]:
        return sum(c.ok for c in self.checks), len(self.checks)
