"""Generated WANs: valid sites directories across platform x Libreswan major x DNS mode x topology
(mesh, hub-and-spoke with one or two meshed hubs, spokes reaching each other through a hub) x number
of LANs, for the renderer, `check` and the lab.

One builder, two sources of choices: `from_seed(seed)` (random.Random: `./run lab --generate SEED`
reproduces a WAN) and the hypothesis strategy `wans()` (tests shrink over the same choices). The
builder excludes only what validation refuses: Libreswan 5 on OpenWrt (its feed ships 4.12).
Public addresses come from documentation ranges and, on purpose, from 100.64.0.0/10 (CGNAT) and
198.18.0.0/15, where the lab's own addresses live by default (lab/plan.py picks around them).
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PUBLIC_POOLS = ("192.0.2.{i}", "198.51.100.{i}", "203.0.113.{i}", "100.64.0.{i}", "198.18.0.{i}")
LAN_POOLS = ("10.{i}.{j}.0/24", "172.16.{k}.0/24", "192.168.{k}.0/24")


@dataclass
class SiteSpec:
    name: str
    platform: str
    libreswan: int
    public: str
    lans: list[str]
    router: str
    dns_server: str
    domain: str
    records: dict[str, str]
    dns_mode: str | None  # None: the WAN's default


@dataclass
class WanSpec:
    topology: str
    hubs: list[str]
    default_dns_mode: str
    sites: list[SiteSpec] = field(default_factory=list)

    def describe(self) -> str:
        shape = ", ".join(f"{s.name} {s.platform}/{s.libreswan} {len(s.lans)} LAN{'s' if len(s.lans) > 1 else ''} "
                          f"{s.dns_mode or self.default_dns_mode}{ROUTER_DNS[s.dns_server == s.router]}" for s in self.sites)
        hubs = f" (hubs {', '.join(self.hubs)})" if self.hubs else ""
        return f"{self.topology}{hubs}: {shape}"


ROUTER_DNS = {True: " router-dns", False: ""}  # describe(): a site whose router is its DNS server
Choose = Callable[[str, Sequence[Any]], Any]
# a hub-and-spoke WAN of two meshed hubs and two spokes (one transit pair): build(..., **MESHED_HUBS)
MESHED_HUBS: dict[str, Any] = {"topology": "hub-and-spoke", "n_sites": 4, "n_hubs": 2}


def build(choose: Choose, n_sites: int | None = None, topology: str | None = None, n_hubs: int | None = None) -> WanSpec:
    """A valid WAN from a sequence of choices (`choose(what, options)` returns one of options);
    `n_hubs` fixes the number of hubs of a hub-and-spoke WAN (several are meshed with each other)."""
    n = n_sites or choose("sites", [2, 3, 4])
    topo = topology or choose("topology", ["mesh", "hub-and-spoke"] if n >= 3 else ["mesh"])
    names = [f"s{k}" for k in range(n)]
    hubs = names[:n_hubs or choose("hubs", [1, 2] if n >= 4 else [1])] if topo == "hub-and-spoke" else []
    spec = WanSpec(topology=topo, hubs=hubs, default_dns_mode=choose("default dns mode", ["forward", "hosts"]))
    used_public: set[str] = set()
    k3 = 0
    for i, name in enumerate(names):
        platform = choose(f"{name} platform", ["el", "openwrt"])
        major = choose(f"{name} libreswan", [4, 5]) if platform == "el" else 4  # validation refuses 5 on OpenWrt
        pool = choose(f"{name} public pool", PUBLIC_POOLS)
        public = pool.format(i=10 + i)
        while public in used_public:
            public = pool.format(i=10 + i + 20 * len(used_public))
        used_public.add(public)
        n_lans = choose(f"{name} lans", [1, 1, 2, 3])
        lans = []
        for j in range(n_lans):
            lan_pool = choose(f"{name} lan {j} pool", LAN_POOLS)
            k3 += 1
            lans.append(lan_pool.format(i=i + 1, j=j, k=k3 + 20))
        first = lans[0].rsplit(".", 1)[0]
        dns_lan = choose(f"{name} dns lan", list(range(n_lans)))
        dns_base = lans[dns_lan].rsplit(".", 1)[0]
        records = {}
        for r in range(choose(f"{name} records", [0, 1, 2])):
            where = lans[choose(f"{name} record {r} lan", list(range(n_lans)))].rsplit(".", 1)[0]
            records[f"host{r}"] = f"{where}.{20 + r}"
        spec.sites.append(SiteSpec(
            name=name, platform=platform, libreswan=major, public=public, lans=lans, router=f"{first}.1",
            dns_server=f"{dns_base}.53", domain=f"{name}.gen{i}.example", records=records,
            dns_mode=choose(f"{name} dns mode", [None, "forward", "hosts"])))
    # router-DNS sites (the router's dnsmasq is the DNS server), chosen after every other choice so a seed's
    # WAN stays what it was before this choice existed; only where valid: without records, no site may use
    # hosts mode (render/validate.py)
    any_hosts = any((s.dns_mode or spec.default_dns_mode) == "hosts" for s in spec.sites)
    for s in spec.sites:
        if choose(f"{s.name} dns on the router", [False, True]) and (s.records or not any_hosts):
            s.dns_server = s.router
    return spec


def from_seed(seed: int, **kw) -> WanSpec:
    rng = random.Random(seed)
    return build(lambda what, options: rng.choice(list(options)), **kw)


def wans(**kw):
    """The hypothesis strategy: WanSpec values built from drawn choices."""
    from hypothesis import strategies as st

    @st.composite
    def _wans(draw):
        return build(lambda what, options: draw(st.sampled_from(list(options)), label=what), **kw)

    return _wans()


_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, int(p ** 0.5) + 1))]


def _prime(rng: random.Random, bits: int) -> int:
    """A probable prime of exactly `bits` bits (top two bits set: p*q has 2*bits bits), Miller-Rabin
    with 40 rounds on the candidates that pass trial division."""
    while True:
        n = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if any(n % p == 0 for p in _SMALL_PRIMES):
            continue
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(40):
            x = pow(rng.randrange(2, n - 2), d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            if (n - 1) % 65537:  # e must be invertible mod p-1
                return n


@functools.cache
def site_key(name: str) -> tuple[str, str]:
    """(ckaid, rsasigkey) of a generated site's router: a real 2048-bit RSA public key derived from
    the site's name, so a seed gives the same files byte for byte. Nobody keeps its private half:
    the lab replaces every router's key with a pair of its own (lab/keys.py), and `check` needs
    only the public half."""
    from render.hostkey import ckaid_of, rsasigkey_from_numbers
    rng = random.Random(f"wan-lab generated router key {name}")
    while True:
        p, q = _prime(rng, 1024), _prime(rng, 1024)
        if p != q and (p * q).bit_length() == 2048:
            break
    text = rsasigkey_from_numbers(65537, p * q)
    return ckaid_of(text), text


def write(spec: WanSpec, d: Path) -> Path:
    """The sites directory of a spec (wan.yaml and one file per site)."""
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.yaml"):
        old.unlink()
    lines = ["# Generated by lab/generate.py", "name: generated", f"topology: {spec.topology}"]
    if spec.hubs:
        lines.append(f"hubs: [{', '.join(spec.hubs)}]")
    lines += ["crypto_profiles:", "  modern:", '    ike: ["aes256-sha2_256;dh19"]', '    esp: ["aes_gcm256"]',
              "defaults:", "  crypto_profile: modern", "  dpd: {delay: 10, timeout: 60}", f"  dns_mode: {spec.default_dns_mode}"]
    (d / "wan.yaml").write_text("\n".join(lines) + "\n")
    for s in spec.sites:
        lines = [f"name: {s.name}", "router:", f"  platform: {s.platform}", f"  libreswan: {s.libreswan}",
                 f"  public_address: {s.public}", f"  lan_address: {s.router}"]
        ckaid, rsasigkey = site_key(s.name)
        lines += ["  key:", f"    ckaid: {ckaid}", f"    rsasigkey: {rsasigkey}", "lans:"]
        lines += [f"  - {lan}" for lan in s.lans]
        lines += ["dns:", f"  domain: {s.domain}", f"  server: {s.dns_server}"]
        if s.records:
            lines.append("  records:")
            lines += [f"    {k}: {v}" for k, v in s.records.items()]
        if s.dns_mode:
            lines += ["overrides:", f"  dns_mode: {s.dns_mode}"]
        (d / f"{s.name}.yaml").write_text("\n".join(lines) + "\n")
    return d


def write_generated(seed: int, d: Path, **kw) -> Path:
    """`./run lab --generate SEED`: the WAN of that seed, written to d."""
    return write(from_seed(seed, **kw), d)
