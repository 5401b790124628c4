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


def _subnets(side: str, lans, version: int) -> str:
    """One subnet: `leftsubnet=`. Several: 4.x wants `leftsubnets={a b}` (one Child SA per pair),
    5.x takes `leftsubnet=a,b` as one Child SA (reference/libreswan.md)."""
    nets = [str(n) for n in lans]
    if len(nets) == 1:
        return f"\t{side}subnet={nets[0]}"
    if version == 4:
        return f"\t{side}subnets={{{' '.join(nets)}}}"
    return f"\t{side}subnet={','.join(nets)}"


def conn_names(t: Tunnel, me: Site, peer: Site) -> list[str]:
    """The connection names pluto will know for this tunnel (4.x expands `subnets=` into aliases)."""
    if me.router.libreswan == 4 and (len(me.lans) > 1 or len(peer.lans) > 1):
        # a side with one `subnet=` counts as 0, a side with `subnets={...}` counts from 1
        left = range(1, len(me.lans) + 1) if len(me.lans) > 1 else [0]
        right = range(1, len(peer.lans) + 1) if len(peer.lans) > 1 else [0]
        return [f"{t.name}/{i}x{j}" for i in left for j in right]
    return [t.name]


def render_router(wan: Wan, site: Site, revision: str, release: str | None = None) -> Tree:
    """Every file of one router, keyed by its path relative to the router's / (plus MANIFEST.json).
    `release`: the text of etc/wan/release.env when the tree goes into a release bundle."""
    e = env()
    source = wan.source_dir
    files: Tree = {}
    tunnels: dict[str, TunnelEntry] = {}

    files[paths.IPSEC_CONF] = RenderedFile(e.get_template("ipsec/ipsec.conf.j2").render().encode(), 0o644)
    conn_t = e.get_template("ipsec/conn.j2")
    my_tunnels = wan.tunnels_of(site.name)
    for t in my_tunnels:
        peer = wan.site(t.peer_of(site.name))
        initiator = t.initiator == site.name
        conf_b = conn_t.render(source=source, t=t, me=site, peer=peer, initiator=initiator).encode()
        files[paths.tunnel_conf(t.name)] = RenderedFile(conf_b, 0o644)
        tunnels[t.name] = TunnelEntry(
            peer=peer.name,
            initiator=initiator,
            conns=tuple(conn_names(t, site, peer)),
            conf_sha256=hashlib.sha256(conf_b).hexdigest(),
            peer_address=str(peer.router.public_address),
            local_subnets=tuple(str(n) for n in site.lans),
            remote_subnets=tuple(str(n) for n in peer.lans),
            crypto_profile=t.crypto.name,
            peer_ike_id=peer.router.ike_id,
            peer_key=peer.router.key.ckaid,
            peer_extra_keys=tuple(k.ckaid for k in peer.router.extra_keys),
        )

    remote = [wan.site(t.peer_of(site.name)) for t in my_tunnels]
    remote.sort(key=lambda s: s.name)
    ctx = dict(
        source=source, me=site, remote=remote,
        peers=sorted({str(s.router.public_address) for s in remote}, key=_ip_key),
        remote_lans=[str(n) for s in remote for n in s.lans],
        hosts_path=paths.HOSTS_OPENWRT, chains=paths.FW4_SNIPPETS,
    )
    if site.router.platform == "el":
        files[paths.DNSMASQ_EL] = RenderedFile(e.get_template("dns/el.j2").render(**ctx).encode(), 0o644)
        files[paths.NFT_EL] = RenderedFile(e.get_template("firewall/el.j2").render(**ctx).encode(), 0o644)
    else:
        files[paths.DHCP_UCI_OPENWRT] = RenderedFile(e.get_template("dns/openwrt.j2").render(**ctx).encode(), 0o644)
        if site.dns_mode == "hosts":
            files[paths.HOSTS_OPENWRT] = RenderedFile(e.get_template("dns/hosts.j2").render(**ctx).encode(), 0o644)
        for chain in paths.FW4_SNIPPETS:
            snippet = e.get_template(f"firewall/openwrt-{chain}.j2").render(**ctx)
            files[paths.fw4_snippet(chain)] = RenderedFile(snippet.encode(), 0o644)
        files[paths.FIREWALL_UCI_OPENWRT] = RenderedFile(e.get_template("firewall/openwrt.j2").render(**ctx).encode(), 0o644)

    if release is not None:
        files[paths.RELEASE_ENV] = RenderedFile(release.encode(), 0o644)
    files[paths.ROUTER_ENV] = RenderedFile(
        f"WAN_ROUTER={site.name}\nWAN_PLATFORM={site.router.platform}\nWAN_LIBRESWAN={site.router.libreswan}\n"
        f"WAN_CKAID={site.router.key.ckaid}\n".encode(), 0o644)
    files[paths.TUNNELS_LIST] = RenderedFile("".join(
        f"{name} {t.conf_sha256} {1 if t.initiator else 0}\n"
        for name, t in sorted(tunnels.items())).encode(), 0o644)
    # keys the peers accept beside the one in their conn during a rollover (docs/keys.md); loading a
    # conn replaces the keys pluto holds for its IKE ids, so reconcile adds these after every add
    files[paths.PEER_KEYS_LIST] = RenderedFile("".join(
        f"{peer.router.ike_id} {k.ckaid} {k.rsasigkey}\n"
        for peer in remote for k in peer.router.extra_keys).encode(), 0o644)
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
        lan_address=str(site.router.lan_address),
        public_address=str(site.router.public_address),
        files={p: FileEntry(hashlib.sha256(f.content).hexdigest(), f"{f.mode:04o}") for p, f in sorted(files.items())},
        tunnels=tunnels,
    )
    files[paths.MANIFEST] = RenderedFile(manifest.to_json().encode(), 0o644)
    return files


def _ip_key(text: str):
    return tuple(int(x) for x in text.split("."))


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
