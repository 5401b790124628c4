"""Generated WANs: valid sites directories across every site shape the schema allows, for the
renderer, `check` and the lab: topology (mesh; hub-and-spoke with one or more meshed hubs, spokes
reaching each other through a hub) x platform, release and firewall x Libreswan major x fixed or
dynamic public address and IKE id x LANs (count, prefix, the router's) x DNS (mode, router-DNS,
records, nested domains) x crypto profile and liveness x key rollover (docs/lab.md "Generated WANs").

One builder, two sources of choices: `from_seed(seed)` (random.Random: `./run lab --generate SEED`
reproduces a WAN) and the hypothesis strategy `wans()` (tests shrink over the same choices). The
builder excludes only what validation refuses (two dynamic ends of one tunnel, two profiles named
by the ends of one tunnel, Libreswan 5 on OpenWrt, overlapping LANs, ...).
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
# A LAN's prefix: the generator numbers hosts .1 (router), .20-.21 (records) and .53 (DNS server), so a
# /26 is the narrowest that holds them; /23 widens the LAN over its neighbour where no other LAN is there.
LAN_PREFIXES = (24, 24, 26, 23)
# The platform releases the schema and validation accept (render/validate.py RELEASES; None: the key is
# left out, the default 24.10 / 9). OpenWrt's is written quoted (YAML reads 24.10 as 24.1), EL's as a number.
RELEASES: dict[str, tuple[Any, ...]] = {"openwrt": (None, "23.05", "24.10"), "el": (None, 8, 9, 10)}
FIREWALLS = (None, "firewalld", "nftables")  # EL only (validation refuses firewall: on OpenWrt)
# crypto profiles every generated wan.yaml defines; the WAN's default and each site's override pick among them
PROFILES: dict[str, list[str]] = {
    "modern": ['ike: ["aes256-sha2_256;dh19"]', 'esp: ["aes_gcm256"]'],
    "compatible": ['ike: ["aes256-sha2_256;dh19", "aes256-sha2_256;modp2048"]', 'esp: ["aes_gcm256", "aes256-sha2_256"]',
                   "ikelifetime: 3600", "salifetime: 1800"],
    # a weak algorithm allowed on purpose (validation refuses it without insecure:)
    "legacy": ['ike: ["aes128-sha1;modp2048"]', 'esp: ["aes128-sha1"]', "insecure: [sha1]"],
}
SHORT_DPD = (5, 30)  # overrides.dpd of a site that chooses its own


@dataclass
class SiteSpec:
    name: str
    platform: str
    libreswan: int
    public: str  # an address, or "dynamic" (behind the lab's carrier-grade NAT; ike_id is then an @name)
    lans: list[str]
    router: str
    dns_server: str
    domain: str
    records: dict[str, str]
    dns_mode: str | None  # None: the WAN's default
    release: str | int | None = None  # router.platform_release; None: left out (the default)
    firewall: str | None = None  # router.firewall (EL); None: left out (firewalld)
    ike_id: str | None = None  # router.ike_id; None: left out (the public address)
    dpd: tuple[int, int] | None = None  # overrides.dpd (delay, timeout)
    crypto_profile: str | None = None  # overrides.crypto_profile
    key_fields: tuple[str, ...] = ("key",)  # ("key", "next_key") / ("key", "previous_key"): a key rollover
    parent: str | None = None  # the site whose domain this site's domain lies under (a nested domain)

    @property
    def dynamic(self) -> bool:
        return self.public == "dynamic"


@dataclass
class WanSpec:
    topology: str
    hubs: list[str]
    default_dns_mode: str
    sites: list[SiteSpec] = field(default_factory=list)
    default_profile: str = "modern"
    valid_days: int | None = None  # release.valid_days; None: left out
    dpd: tuple[int, int] = (10, 60)  # defaults.dpd (delay, timeout)

    def joined(self, a: str, b: str) -> bool:
        """Whether the topology gives a and b a tunnel of their own (render/topology.py plan_tunnels)."""
        return a != b and (self.topology == "mesh" or a in self.hubs or b in self.hubs)

    def describe(self) -> str:
        hubs = f" (hubs {', '.join(self.hubs)})" if self.hubs else ""
        wide = f", profile {self.default_profile}, dpd {self.dpd[0]}/{self.dpd[1]}" \
            + (f", valid_days {self.valid_days}" if self.valid_days else "")
        return f"{self.topology}{hubs}{wide}: " + ", ".join(_describe_site(s, self) for s in self.sites)


def _describe_site(s: SiteSpec, spec: WanSpec) -> str:
    release = f" {s.release}" if s.release is not None else ""
    fw = f" {s.firewall}" if s.firewall else ""
    prefixes = "/".join(lan.rsplit("/", 1)[1] for lan in s.lans)
    words = [f"{s.name} {s.platform}{release}{fw}/{s.libreswan} {len(s.lans)} LAN{'s' if len(s.lans) > 1 else ''} "
             f"/{prefixes} {s.dns_mode or spec.default_dns_mode}"]
    words += [w for w, on in ((ROUTER_DNS[True].strip(), s.dns_server == s.router), ("dynamic", s.dynamic)) if on]
    router_lan = next((j for j, lan in enumerate(s.lans) if _within(s.router, lan)), 0)
    if router_lan:
        words.append(f"router in LAN {router_lan}")
    if s.ike_id:
        words.append(f"id {s.ike_id}")
    if s.dpd:
        words.append(f"dpd {s.dpd[0]}/{s.dpd[1]}")
    if s.crypto_profile:
        words.append(f"profile {s.crypto_profile}")
    if len(s.key_fields) > 1:
        words.append(s.key_fields[1])
    if s.parent:
        words.append(f"domain under {s.parent}'s")
    if any("." in r for r in s.records):
        words.append("dotted records")
    return " ".join(words)


def _within(address: str, lan: str) -> bool:
    from ipaddress import ip_address, ip_network
    return ip_address(address) in ip_network(lan)


ROUTER_DNS = {True: " router-dns", False: ""}  # describe(): a site whose router is its DNS server
Choose = Callable[[str, Sequence[Any]], Any]
# a hub-and-spoke WAN of two meshed hubs and two spokes (one transit pair): build(..., **MESHED_HUBS)
MESHED_HUBS: dict[str, Any] = {"topology": "hub-and-spoke", "n_sites": 4, "n_hubs": 2}


def build(choose: Choose, n_sites: int | None = None, topology: str | None = None, n_hubs: int | None = None) -> WanSpec:
    """A valid WAN from a sequence of choices (`choose(what, options)` returns one of options);
    `n_hubs` fixes the number of hubs of a hub-and-spoke WAN (several are meshed with each other).
    Where validation refuses a combination, the options offered leave out only that combination."""
    n = n_sites or choose("sites", [2, 3, 4])
    topo = topology or choose("topology", ["mesh", "hub-and-spoke"] if n >= 3 else ["mesh"])
    names = [f"s{k}" for k in range(n)]
    hubs = names[:n_hubs or choose("hubs", list(range(1, n)))] if topo == "hub-and-spoke" else []
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
    # router-DNS sites (the router's dnsmasq is the DNS server); only where valid: without records, no
    # site may use hosts mode (render/validate.py)
    any_hosts = any((s.dns_mode or spec.default_dns_mode) == "hosts" for s in spec.sites)
    for s in spec.sites:
        if choose(f"{s.name} dns on the router", [False, True]) and (s.records or not any_hosts):
            s.dns_server = s.router
    # Every choice below came later than those above: a seed's sites keep their platforms, LANs and DNS.
    spec.default_profile = choose("default crypto profile", list(PROFILES))
    spec.valid_days = choose("release valid days", [None, 30])
    for s in spec.sites:
        _platform_choices(choose, s)
        _address_choices(choose, s, spec)
        _lan_choices(choose, s, spec)
        _dns_choices(choose, s, spec)
        s.dpd = choose(f"{s.name} dpd", [None, None, SHORT_DPD])
        s.crypto_profile = choose(f"{s.name} crypto profile", _profile_options(s, spec))
        s.key_fields = choose(f"{s.name} keys", [("key",), ("key",), ("key", "next_key"), ("key", "previous_key")])
    # an address as IKE id that is not the router's own (a router behind a 1:1 NAT that announces the
    # address it holds): any unicast address no other router has (render/validate.py)
    for i, s in enumerate(spec.sites):
        if s.ike_id == s.public and choose(f"{s.name} ike id address", ["its own", "another"]) == "another":
            s.ike_id = f"192.0.2.{200 + i}"
    # the WAN's liveness default: a dynamic site's tunnels come back after its address changes once its
    # peers declare the old address dead, so this also sets how long the lab's nat scenario takes
    spec.dpd = choose("default dpd", [(10, 60), SHORT_DPD])
    return spec


def _profile_options(s: SiteSpec, spec: WanSpec) -> list[str | None]:
    """The crypto profile overrides validation accepts for s (render/topology.py): both ends of a tunnel
    that name a profile name the same one; and the tunnels of a fixed router to its dynamic peers all
    use one profile (it answers them from any address and picks the conn before it knows the peer),
    so a dynamic site whose fixed peer names none takes the profile its other dynamic peers' tunnels
    have (the later of them are held to it when they choose)."""
    named = {o.crypto_profile for o in spec.sites if o.crypto_profile and spec.joined(s.name, o.name)}
    options = [None, None, *sorted(named or PROFILES)]
    if not s.dynamic:
        return options
    earlier = spec.sites[:spec.sites.index(s)]
    want = {o.crypto_profile or spec.default_profile
            for x in spec.sites if not x.dynamic and not x.crypto_profile and spec.joined(s.name, x.name)
            for o in earlier if o.dynamic and spec.joined(x.name, o.name)}
    return [p for p in options if not want or {p or spec.default_profile} == want]


def _platform_choices(choose: Choose, s: SiteSpec) -> None:
    s.release = choose(f"{s.name} platform release", RELEASES[s.platform])
    if s.platform == "el":
        s.firewall = choose(f"{s.name} firewall", FIREWALLS)


def _address_choices(choose: Choose, s: SiteSpec, spec: WanSpec) -> None:
    """Dynamic (behind NAT, known by an @name IKE id) unless a site the topology joins it to is dynamic
    already: validation refuses two dynamic ends of one tunnel (render/validate.py _dynamic_pairs), so a
    mesh holds at most one dynamic site, a dynamic hub no other, and any number of spokes under fixed hubs
    (where a crypto profile is left for it: `_profile_options`)."""
    fixed = s.public
    s.public = "dynamic"  # would a profile be left for it (its fixed peers' other dynamic peers)?
    dynamic_ok = not any(o.dynamic and spec.joined(s.name, o.name) for o in spec.sites if o is not s) \
        and bool(_profile_options(s, spec))
    s.public = fixed
    if dynamic_ok and choose(f"{s.name} public address", ["fixed", "fixed", "dynamic"]) == "dynamic":
        s.public = "dynamic"
        s.ike_id = choose(f"{s.name} ike id", [f"@{s.name}-gw.{s.domain}", f"@{s.name}"])
    else:  # the default id (its address), an @name, or its address written out
        s.ike_id = choose(f"{s.name} ike id", [None, None, f"@{s.name}-gw.{s.domain}", s.public])


def _lan_choices(choose: Choose, s: SiteSpec, spec: WanSpec) -> None:
    """Each LAN's prefix (a /23 only where it overlaps no other LAN of the WAN) and the LAN the router
    sits in (its address .1 there; a router-DNS site's server moves with it)."""
    from ipaddress import ip_network
    for j, lan in enumerate(s.lans):
        prefix = choose(f"{s.name} lan {j} prefix", LAN_PREFIXES)
        wide = ip_network(lan).supernet(new_prefix=prefix) if prefix < 24 else None
        if wide is not None and any(wide.overlaps(ip_network(o)) for t in spec.sites for o in t.lans if o != lan):
            continue
        s.lans[j] = str(wide) if wide is not None else f"{lan.rsplit('/', 1)[0]}/{prefix}"
    router_lan = choose(f"{s.name} router lan", list(range(len(s.lans))))
    router = f"{_base(s.lans[router_lan])}.1"
    if s.dns_server == s.router:
        s.dns_server = router
    s.router = router


def _base(lan: str) -> str:
    """The first three octets of a generated LAN's first /24 (the router's .1 there; the DNS server
    and records keep their addresses in the /24 the pool gave, inside a widened /23 too)."""
    return lan.split("/")[0].rsplit(".", 1)[0]


def _dns_choices(choose: Choose, s: SiteSpec, spec: WanSpec) -> None:
    """A domain under an earlier site's (nested domains: dnsmasq picks the longest match, so each name
    goes to the right server) and record names with a dot (host0.lab under the site's domain)."""
    earlier = spec.sites[:spec.sites.index(s)]
    parent = choose(f"{s.name} domain under", [None, None, *[o.name for o in earlier]])
    if parent:
        s.parent = parent
        s.domain = f"{s.name}.{next(o for o in spec.sites if o.name == parent).domain}"
    if s.records and choose(f"{s.name} dotted record names", [False, True]):
        s.records = {f"{k}.lab": v for k, v in s.records.items()}


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
    lines.append("crypto_profiles:")
    for name, body in PROFILES.items():
        lines += [f"  {name}:"] + [f"    {x}" for x in body]
    if spec.valid_days:
        lines += ["release:", f"  valid_days: {spec.valid_days}"]
    lines += ["defaults:", f"  crypto_profile: {spec.default_profile}",
              f"  dpd: {{delay: {spec.dpd[0]}, timeout: {spec.dpd[1]}}}", f"  dns_mode: {spec.default_dns_mode}"]
    (d / "wan.yaml").write_text("\n".join(lines) + "\n")
    for s in spec.sites:
        lines = [f"name: {s.name}", "router:", f"  platform: {s.platform}", f"  libreswan: {s.libreswan}"]
        if s.release is not None:
            lines.append(f"  platform_release: {s.release!r}")  # '23.05' quoted, 9 a number
        if s.firewall:
            lines.append(f"  firewall: {s.firewall}")
        lines.append(f"  public_address: {s.public}")
        if s.ike_id:
            lines.append(f'  ike_id: "{s.ike_id}"')
        lines.append(f"  lan_address: {s.router}")
        for f in s.key_fields:
            ckaid, rsasigkey = site_key(s.name if f == "key" else f"{s.name} second")  # one more key per site
            lines += [f"  {f}:", f"    ckaid: {ckaid}", f"    rsasigkey: {rsasigkey}"]
        lines.append("lans:")
        lines += [f"  - {lan}" for lan in s.lans]
        lines += ["dns:", f"  domain: {s.domain}", f"  server: {s.dns_server}"]
        if s.records:
            lines.append("  records:")
            lines += [f"    {k}: {v}" for k, v in s.records.items()]
        overrides = ([f"  dns_mode: {s.dns_mode}"] if s.dns_mode else []) \
            + ([f"  dpd: {{delay: {s.dpd[0]}, timeout: {s.dpd[1]}}}"] if s.dpd else []) \
            + ([f"  crypto_profile: {s.crypto_profile}"] if s.crypto_profile else [])
        if overrides:
            lines += ["overrides:", *overrides]
        (d / f"{s.name}.yaml").write_text("\n".join(lines) + "\n")
    return d


def write_generated(seed: int, d: Path, **kw) -> Path:
    """`./run lab --generate SEED`: the WAN of that seed, written to d."""
    return write(from_seed(seed, **kw), d)
