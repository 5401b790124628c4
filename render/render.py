"""Render the WAN model into each router's tree: out/<router>/ mirrors the router's / .

Pure and deterministic: the same model and revision give byte-identical trees. No secret is
rendered: tunnels authenticate with the routers' raw RSA public keys (render/hostkey.py).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import paths
from .manifest import FileEntry, Manifest, TunnelEntry
from .model import Site, Tunnel, Wan

TEMPLATES = Path(__file__).resolve().parent / "templates"
ROUTER_PROGRAMS = Path(__file__).resolve().parent.parent / "router"  # reconcile's dry run for the plan


@dataclass(frozen=True)
class RenderedFile:
    content: bytes
    mode: int  # 0o644, or 0o755 for the router programs


# router name -> relative path -> file
Tree = dict[str, RenderedFile]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # config files, not HTML; every value was validated by a strict pattern
    )
    env.globals["subnets"] = _subnets
    env.globals["snippet"] = paths.fw4_snippet
    return env


_ENV = None


def env() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = _env()
    return _ENV


def _subnets(side: str, lans) -> str:
    """One subnet: `leftsubnet=`. Several: `leftsubnets={a b}` (one Child SA per pair) for 4.x and 5.x
    alike, so both ends of a tunnel between a 4.x and a 5.x router propose the same Child SAs.
    5.x's `leftsubnet=a,b` would be one Child SA with several selectors, which a 4.x responder narrows to
    one pair (libreswan v4.12 programs/pluto/ikev2_ts.c:1029-1060). 5.x still reads the braces form:
    v5.2 lib/libipsecconf/parser.lex:471-483 strips the braces, keywords.c:395 `subnets`,
    starterwhack.c:152 hands it to pluto, programs/pluto/whack_add.c:94-105 splits it and 180-262 adds
    one conn per pair named <conn>/<i>x<j> exactly as 4.x does (v4.10 lib/libipsecconf/starterwhack.c:882)."""
    nets = [str(n) for n in lans]
    if len(nets) == 1:
        return f"\t{side}subnet={nets[0]}"
    return f"\t{side}subnets={{{' '.join(nets)}}}"


def conn_names(t: Tunnel, local, remote) -> list[str]:
    """The connection names pluto will know for this tunnel (`subnets=` expands into aliases, 4.x and 5.x);
    `local`, `remote`: the tunnel's subnets on this end and the peer's (Wan.selectors)."""
    if len(local) > 1 or len(remote) > 1:
        # a side with one `subnet=` counts as 0, a side with `subnets={...}` counts from 1
        # (v5.2 programs/pluto/whack_add.c:112-114 `start`)
        left = range(1, len(local) + 1) if len(local) > 1 else [0]
        right = range(1, len(remote) + 1) if len(remote) > 1 else [0]
        return [f"{t.name}/{i}x{j}" for i in left for j in right]
    return [t.name]


def render_router(wan: Wan, site: Site, revision: str, release: str | None = None) -> Tree:
    """Every file of one router, keyed by its path relative to the router's / (plus MANIFEST.json).
    `release`: the text of etc/wan/release.env when the tree goes into a release bundle."""
    e = env()
    source = wan.source_dir
    files: Tree = {}
    tunnels: dict[str, TunnelEntry] = {}

    # /etc/ipsec.conf and /etc/ipsec.secrets stay the platform's (paths.PLATFORM_FILES): OpenWrt 24.10's
    # and EL's already include /etc/ipsec.d/*.conf (openwrt-24.10 net/libreswan/files/etc/ipsec.conf:3;
    # RHEL's carries the crypto-policies include and the admin's `config setup`); 23.05's are edited in
    # place by etc/wan/openwrt-23.05-ipsec
    conn_t = e.get_template("ipsec/conn.j2")
    my_tunnels = wan.tunnels_of(site.name)
    for t in my_tunnels:
        peer = wan.site(t.peer_of(site.name))
        initiator = t.initiator == site.name
        # hub-and-spoke transit: a hub's end also carries the spokes it joins to this peer (Wan.selectors)
        local, remote_nets = wan.selectors(t, site.name)
        conf_b = conn_t.render(source=source, t=t, me=site, peer=peer, initiator=initiator, local=local,
                               remote=remote_nets, carried=wan.carried(t, site.name),
                               peer_carried=wan.carried(t, peer.name)).encode()
        files[paths.tunnel_conf(t.name)] = RenderedFile(conf_b, 0o644)
        tunnels[t.name] = TunnelEntry(
            peer=peer.name,
            initiator=initiator,
            conns=tuple(conn_names(t, local, remote_nets)),
            conf_sha256=hashlib.sha256(conf_b).hexdigest(),
            peer_address=peer.router.address,
            local_subnets=tuple(str(n) for n in local),
            remote_subnets=tuple(str(n) for n in remote_nets),
            crypto_profile=t.crypto.name,
            peer_ike_id=peer.router.ike_id,
            peer_key=peer.router.key.ckaid,
            peer_extra_keys=tuple(k.ckaid for k in peer.router.extra_keys),
        )

    peers = sorted((wan.site(t.peer_of(site.name)) for t in my_tunnels), key=lambda s: s.name)
    # every site this one's LANs reach: its tunnel peers and, on a spoke, the spokes reached through a
    # hub (their DNS is forwarded, their LANs are in the firewall's remote set like any other)
    remote = list(wan.reached(site.name))
    # on a hub: the (source, destination) LAN pairs it forwards from one tunnel into another
    transit = sorted(((str(na), str(nb)) for x in wan.transits if x.hub == site.name
                      for sa, sb in ((x.a, x.b), (x.b, x.a))
                      for na in wan.site(sa).lans for nb in wan.site(sb).lans),
                     key=lambda p: (_net_key(p[0]), _net_key(p[1])))
    ctx = dict(
        source=source, me=site, remote=remote,
        peers=sorted({str(s.router.public_address) for s in peers if not s.router.dynamic}, key=_ip_key),
        # peers without a fixed address: IKE and NAT-T are accepted from any address (their ESP comes
        # in UDP 4500: conn.j2 encapsulation=yes); the plan names these routers
        dynamic_peers=[s.name for s in peers if s.router.dynamic],
        remote_lans=[str(n) for s in remote for n in s.lans],
        transit=transit,
        chains=paths.FW4_SNIPPETS,
    )
    if site.router.platform == "el":
        files[paths.DNSMASQ_EL] = RenderedFile(e.get_template("dns/el.j2").render(**ctx).encode(), 0o644)
        files[paths.NFT_EL] = RenderedFile(e.get_template("firewall/el.j2").render(**ctx).encode(), 0o644)
        if site.router.firewall == "firewalld":
            for zone in paths.FIREWALLD_ZONES:
                xml = e.get_template("firewall/firewalld-zone.j2").render(zone=zone, **ctx)
                files[paths.firewalld_zone(zone)] = RenderedFile(xml.encode(), 0o644)
            for policy in paths.firewalld_policies(any(s.router.dynamic for s in peers)):
                xml = e.get_template("firewall/firewalld-policy.j2").render(policy=policy, **ctx)
                files[paths.firewalld_policy(policy)] = RenderedFile(xml.encode(), 0o644)
            files[paths.FIREWALL_UNIT_EL] = RenderedFile(e.get_template("firewall/el-unit.j2").render(**ctx).encode(), 0o644)
    else:
        files[paths.DNSMASQ_OPENWRT] = RenderedFile(e.get_template("dns/openwrt.j2").render(**ctx).encode(), 0o644)
        if site.router_dns:
            files[paths.DHCP_UCI_OPENWRT] = RenderedFile(e.get_template("dns/openwrt-dhcp.j2").render(**ctx).encode(), 0o644)
        for chain in paths.FW4_SNIPPETS:
            snippet = e.get_template(f"firewall/openwrt-{chain}.j2").render(**ctx)
            files[paths.fw4_snippet(chain)] = RenderedFile(snippet.encode(), 0o644)
        files[paths.FIREWALL_UCI_OPENWRT] = RenderedFile(e.get_template("firewall/openwrt.j2").render(**ctx).encode(), 0o644)

    if release is not None:
        files[paths.RELEASE_ENV] = RenderedFile(release.encode(), 0o644)
    files[paths.ROUTER_ENV] = RenderedFile(
        f"WAN_ROUTER={site.name}\nWAN_PLATFORM={site.router.platform}\nWAN_PLATFORM_RELEASE={site.router.release}\n"
        f"WAN_LIBRESWAN={site.router.libreswan}\n"
        f"WAN_CKAID={site.router.key.ckaid}\n".encode(), 0o644)
    files[paths.TUNNELS_LIST] = RenderedFile("".join(
        f"{name} {t.conf_sha256} {1 if t.initiator else 0}\n"
        for name, t in sorted(tunnels.items())).encode(), 0o644)
    # keys the peers accept beside the one in their conn during a rollover (docs/keys.md); loading a
    # conn replaces the keys pluto holds for its IKE ids, so reconcile adds these after every add
    files[paths.PEER_KEYS_LIST] = RenderedFile("".join(
        f"{peer.router.ike_id} {k.ckaid} {k.rsasigkey}\n"
        for peer in peers for k in peer.router.extra_keys).encode(), 0o644)
    files[paths.FILES_LIST] = RenderedFile("".join(
        f"{hashlib.sha256(f.content).hexdigest()} {f.mode:04o} {p}\n" for p, f in sorted(files.items())).encode(), 0o644)

    manifest = Manifest(
        wan=wan.name,
        router=site.name,
        platform=site.router.platform,
        libreswan=site.router.libreswan,
        source_revision=revision,
        key=site.router.key.ckaid,
        extra_keys=tuple(k.ckaid for k in site.router.extra_keys),
        platform_release=site.router.release,
        firewall=site.router.firewall,
        lan_address=str(site.router.lan_address),
        public_address=site.router.address,
        files={p: FileEntry(hashlib.sha256(f.content).hexdigest(), f"{f.mode:04o}") for p, f in sorted(files.items())},
        tunnels=tunnels,
    )
    files[paths.MANIFEST] = RenderedFile(manifest.to_json().encode(), 0o644)
    return files


def _ip_key(text: str):
    return tuple(int(x) for x in text.split("."))


def _net_key(text: str):
    addr, _, plen = text.partition("/")
    return _ip_key(addr) + (int(plen or 32),)


def render_wan(wan: Wan, revision: str = "unknown", release: str | None = None) -> dict[str, Tree]:
    """Every router's tree, keyed by router (site) name."""
    return {s.name: render_router(wan, s, revision, release) for s in wan.sites}


def write_trees(trees: dict[str, Tree], out: Path) -> None:
    """Write all trees to `out` atomically: into a temp dir beside it, then renamed into place.

    On any error nothing is written and a previous `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        for router, files in trees.items():
            made: set[str] = set()
            base = str(tmp / router)
            for rel, f in files.items():
                d = os.path.dirname(rel)
                if d not in made:
                    os.makedirs(os.path.join(base, d), exist_ok=True)
                    made.add(d)
                fd = os.open(os.path.join(base, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)
                try:
                    os.write(fd, f.content)
                finally:
                    os.close(fd)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
