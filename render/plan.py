"""The plan: what a change of the sites does to each router, for reviewers and machines.

No secret is rendered (tunnels authenticate with the routers' public keys), so the plan shows
everything; each router's key change is named by fingerprint (the key's CKAID): added (peers
accept it beside the current one), rolled (the router signs with another key), retired (peers
no longer accept it), and a change that skips the overlap is flagged as the flag day it is.
"""
from __future__ import annotations

import difflib
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .graph import mermaid
from .manifest import Manifest, TunnelEntry
from .model import Wan
from .render import ROUTER_PROGRAMS, RenderedFile, Tree, render_wan, write_trees
from .validate import load_sites

TUNNEL_FILES = (paths.IPSEC_D + "/",)


@dataclass
class RouterPlan:
    router: str
    libreswan: int
    added: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # tunnel -> reasons
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    other_files: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    new_router: bool = False
    gone_router: bool = False
    diff: str = ""  # unified diff of the configuration files (programs left out)
    keys: list[str] = field(default_factory=list)  # this router's key changes, by fingerprint (CKAID)
    dns_settings: list[str] = field(default_factory=list)  # dnsmasq settings added/removed, by option (dns_settings())
    # hub-and-spoke: the spoke-to-spoke paths this router is an end or the hub of ("a -> hub -> b";
    # " (new)" when the base revision did not have that path)
    transit: list[str] = field(default_factory=list)

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.other_files or self.new_router or self.gone_router
                    or self.keys or self.dns_settings)


def _manifest(tree: Tree | None) -> Manifest | None:
    return Manifest.from_json(tree[paths.MANIFEST].content) if tree else None


def _reasons(old: TunnelEntry, new: TunnelEntry, old_conf: bytes, new_conf: bytes) -> list[str]:
    why = []
    if old.local_subnets != new.local_subnets or old.remote_subnets != new.remote_subnets:
        why.append("subnets")
    crypto = ("ike=", "esp=", "ikelifetime", "salifetime")
    if old.crypto_profile != new.crypto_profile or _lines(old_conf, crypto) != _lines(new_conf, crypto):
        why.append("crypto")
    if old.peer_address != new.peer_address:
        why.append("peer address")
    if old.peer_key != new.peer_key:
        why.append(f"peer key {old.peer_key[:12]} -> {new.peer_key[:12]}")
    if old.peer_ike_id != new.peer_ike_id:
        why.append("peer IKE id")
    if old.conf_sha256 != new.conf_sha256 and not why:
        why.append("settings (" + ", ".join(_changed_keys(old_conf, new_conf)) + ")")
    return why


def _lines(conf: bytes, keys: tuple[str, ...]) -> list[str]:
    return [line.strip() for line in conf.decode().splitlines() if line.strip().startswith(keys)]


def _changed_keys(a: bytes, b: bytes) -> list[str]:
    def kv(t: bytes) -> dict:
        return dict(line.strip().split("=", 1) for line in t.decode().splitlines()
                    if "=" in line and not line.lstrip().startswith("#"))
    ka, kb = kv(a), kv(b)
    return sorted(k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)) or ["comments"]


def reconcile_commands(old: Tree | None, new: Tree) -> list[str]:
    """The commands the router's own `reconcile` would run to go from `old` (None: a router with
    nothing installed) to `new`, in its order: its dry run (`reconcile --dry-run --root ROOT TREE`,
    router/reconcile) on the two rendered trees, `old` installed under a throw-away ROOT. Each
    `would run: CMD` line of its output is one command, with ROOT taken out of the paths."""
    with tempfile.TemporaryDirectory(prefix="wan-plan-") as tmp:
        work = Path(tmp)
        # the root is a router as enrol left it: every program in /etc/wan and OpenWrt's hooks in place
        # (render/paths.py PROGRAMS, OPENWRT_HOOKS), with the old tree installed on top
        programs = {path: RenderedFile((ROUTER_PROGRAMS / name).read_bytes(), 0o755) for path, name in paths.PROGRAMS.items()}
        programs |= {hook: programs[program] for hook, program in paths.OPENWRT_HOOKS.items()}
        installed = old or {paths.FILES_LIST: _EMPTY, paths.TUNNELS_LIST: _EMPTY}
        write_trees({"root": {**programs, **installed}, "staged": new}, work / "trees")
        root, staged = work / "trees/root", work / "trees/staged"
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": tmp, "LC_ALL": "C"}
        reconcile = ROUTER_PROGRAMS / paths.PROGRAMS[paths.RECONCILE]  # the program routers run (trees carry none)
        r = subprocess.run(["sh", str(reconcile), "--dry-run", "--root", str(root), str(staged)],
                           capture_output=True, text=True, env=env, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"reconcile --dry-run exited {r.returncode}: {r.stderr.strip()}")
        return [line[len(_WOULD_RUN):].replace(f"{root}/", "/") for line in r.stdout.splitlines() if line.startswith(_WOULD_RUN)]


_WOULD_RUN = "would run: "
_EMPTY = RenderedFile(b"", 0o644)


def plan_trees(old: dict[str, Tree], new: dict[str, Tree]) -> list[RouterPlan]:
    """Per router, what differs between two rendered revisions."""
    plans = []
    for router in sorted(set(old) | set(new)):
        o, n = old.get(router), new.get(router)
        mo, mn = _manifest(o), _manifest(n)
        current = mn or mo
        assert current is not None  # the router is on at least one side
        to, tn = (mo.tunnels if mo else {}), (mn.tunnels if mn else {})
        fo, fn = (mo.files if mo else {}), (mn.files if mn else {})
        p = RouterPlan(router, current.libreswan, new_router=o is None, gone_router=n is None)
        p.keys = key_changes(mo, mn)
        p.dns_settings = dns_settings(o, n)
        for t in sorted(set(tn) | set(to)):
            if t not in to:
                p.added.append(t)
            elif t not in tn:
                p.removed.append(t)
            else:
                a, b = to[t], tn[t]
                if a.conf_sha256 != b.conf_sha256:
                    p.changed[t] = _reasons(a, b, o[paths.tunnel_conf(t)].content, n[paths.tunnel_conf(t)].content)
                else:
                    p.unchanged += 1
        for f in sorted(set(fo) | set(fn)):
            if f.startswith(TUNNEL_FILES) or f in (paths.TUNNELS_LIST, paths.FILES_LIST):
                continue
            if (fo[f].sha256 if f in fo else None) != (fn[f].sha256 if f in fn else None):
                p.other_files.append(f)
        # a router that leaves the WAN gets no new tree: nothing runs on it (its peers drop their ends)
        p.commands = reconcile_commands(o, n) if n is not None else []
        p.diff = _diff(o or {}, n or {})
        plans.append(p)
    return plans


def key_changes(old: Manifest | None, new: Manifest | None) -> list[str]:
    """One router's key changes between two revisions, each naming the key by its CKAID.

    A router's peers accept its `key` and, during a rollover, its `next_key` or `previous_key`
    (the manifest's extra_keys). Routers fetch a release each on its own schedule, so a change is
    safe only when the key the router signs with on either side is accepted on both sides."""
    if new is None:
        return [f"retired {k} (the router leaves the WAN)" for k in ((old.key,) + old.extra_keys if old else ())]
    if old is None:
        return [f"added {k}" + (" (signs with it)" if k == new.key else " (accepted beside it)")
                for k in (new.key,) + new.extra_keys]
    accepted_old, accepted_new = {old.key, *old.extra_keys}, {new.key, *new.extra_keys}
    out = [f"added {k} (its peers accept it beside {new.key})" for k in sorted(accepted_new - accepted_old)]
    if old.key != new.key:
        out.append(f"rolled {old.key} -> {new.key} (the router signs with the new key)")
        if new.key not in accepted_old or old.key not in accepted_new:
            out.append("WARNING: rolled without an overlap: a peer on the other release refuses this router until "
                       "both have fetched (a flag day); add next_key in one release, roll in the next (docs/keys.md)")
    out += [f"retired {k} (its peers refuse it from this release on)" for k in sorted(accepted_old - accepted_new)]
    return out


DNS_FILES = (paths.DNSMASQ_EL, paths.DNSMASQ_OPENWRT)


def _dns_lines(tree: Tree | None) -> set[tuple[str, str]]:
    """(setting, value) for every dnsmasq option line of the router's DNS file, and every UCI `set` of
    etc/wan/dhcp.uci as (its option name, value)."""
    out: set[tuple[str, str]] = set()
    for f in DNS_FILES:
        if tree and f in tree:
            for line in tree[f].content.decode().splitlines():
                if line.strip() and not line.startswith("#"):
                    k, _, v = line.partition("=")
                    out.add((k, v))
    if tree and paths.DHCP_UCI_OPENWRT in tree:
        for line in tree[paths.DHCP_UCI_OPENWRT].content.decode().splitlines():
            if line.startswith("set "):
                k, _, v = line[4:].partition("=")
                out.add((f"{k.rsplit('.', 1)[-1]} (uci {k})", v.strip("'")))
    return out


def dns_settings(old: Tree | None, new: Tree | None) -> list[str]:
    """The dnsmasq settings a change adds or removes on one router, one line per option: `local: +/home.lan/`,
    `localservice (uci dhcp.@dnsmasq[0].localservice): +0`. A site whose router becomes its LAN's DNS
    server changes `local`, `domain`, `host-record` and `localservice` (OpenWrt) or `listen-address` (EL)."""
    a, b = _dns_lines(old), _dns_lines(new)
    out = []
    for opt in sorted({k for k, _ in a ^ b}):
        changes = [f"+{v}" for k, v in sorted(b - a) if k == opt] + [f"-{v}" for k, v in sorted(a - b) if k == opt]
        note = ""
        if opt.endswith(")") and not any(k == opt for k, _ in b):
            note = " (the router's own value, kept by reconcile before the first apply, is put back)"
        out.append(f"{opt}: {', '.join(changes)}{note}")
    return out


def _diff(old: Tree, new: Tree) -> str:
    out = []
    for f in sorted(set(old) | set(new)):
        if f in (paths.MANIFEST, paths.FILES_LIST, paths.TUNNELS_LIST, paths.RECONCILE, paths.FETCH):
            continue
        a = old[f].content.decode(errors="replace").splitlines(keepends=True) if f in old else []
        b = new[f].content.decode(errors="replace").splitlines(keepends=True) if f in new else []
        if a != b:
            out += difflib.unified_diff(a, b, f"a/{f}" if f in old else "/dev/null", f"b/{f}" if f in new else "/dev/null")
    return "".join(x if x.endswith("\n") else x + "\n" for x in out)


def plan(base_sites: Path, sites: Path, base: str = "base") -> tuple[Wan, list[RouterPlan]]:
    """Per router, what the sites in `sites` change against the sites in `base_sites` (the same
    sites at revision `base`)."""
    old_wan = load_sites(base_sites)
    old = render_wan(old_wan, base)
    new_wan = load_sites(sites)
    new = render_wan(new_wan, "work tree")
    plans = plan_trees(old, new)
    add_transit_paths(plans, old_wan, new_wan)
    return new_wan, plans


def transit_path(a: str, hub: str, b: str) -> str:
    return f"{a} -> {hub} -> {b}"


def add_transit_paths(plans: list[RouterPlan], old: Wan | None, new: Wan) -> None:
    """Name on each router the spoke-to-spoke paths it is an end or the hub of (both directions
    share one line: traffic returns the same way)."""
    before = {transit_path(x.a, x.hub, x.b) for x in (old.transits if old else ())}
    for p in plans:
        p.transit = [transit_path(x.a, x.hub, x.b) + ("" if transit_path(x.a, x.hub, x.b) in before else " (new)")
                     for x in new.transits if p.router in (x.a, x.b, x.hub)]


def transit_table(wan: Wan) -> list[str]:
    """Markdown lines: every spoke-to-spoke pair and the hub its traffic crosses."""
    if not wan.transits:
        return []
    hubs = ", ".join(wan.hubs)
    return ["", f"Spoke to spoke (hub-and-spoke, hubs {hubs}): each pair crosses the first hub by name both spokes "
            "have a tunnel to; no other hub takes over while it is down (docs/topologies.md).", "",
            "| spokes | path |", "|---|---|",
            *(f"| {x.a}, {x.b} | {transit_path(x.a, x.hub, x.b)} |" for x in wan.transits)]


def as_json(plans: list[RouterPlan]) -> str:
    return json.dumps([{**p.__dict__, "touched": p.touched} for p in plans], indent=1, sort_keys=True) + "\n"


def as_text(plans: list[RouterPlan]) -> str:
    out = []
    for p in plans:
        head = f"{p.router}: " + ("new router, " if p.new_router else "removed router, " if p.gone_router else "")
        if not p.touched:
            out.append(f"{p.router}: no change ({p.unchanged} tunnels unchanged)")
            out += [f"  path {t}" for t in p.transit]
            continue
        out.append(head + f"+{len(p.added)} ~{len(p.changed)} -{len(p.removed)} tunnels, {p.unchanged} unchanged")
        out += [f"  + {t}" for t in p.added]
        out += [f"  ~ {t} ({', '.join(w)})" for t, w in p.changed.items()]
        out += [f"  - {t}" for t in p.removed]
        out += [f"  key {k}" for k in p.keys]
        out += [f"  dnsmasq {d}" for d in p.dns_settings]
        out += [f"  path {t}" for t in p.transit]
        out += [f"  file {f}" for f in p.other_files]
        out += [f"  $ {c}" for c in p.commands]
    return "\n".join(out) + "\n"


def insecure_crypto(wan: Wan) -> list[str]:
    """A warning line per crypto profile that allows weak algorithms on purpose (wan.yaml `insecure:`)."""
    profiles = {t.crypto.name: t.crypto for t in wan.tunnels if t.crypto.insecure}
    return [f"**Weak crypto on purpose:** profile `{n}` allows {', '.join(p.insecure)} (tunnels: "
            f"{', '.join(t.name for t in wan.tunnels if t.crypto.name == n)}).\n" for n, p in sorted(profiles.items())]


def dynamic_sites(wan: Wan) -> list[str]:
    """The shape of each site without a fixed address, and the routers that accept IKE and NAT-T from
    any address because of it (their other peers stay on the per-peer allow list)."""
    out = []
    for s in wan.sites:
        if not s.router.dynamic:
            continue
        peers = sorted(t.peer_of(s.name) for t in wan.tunnels_of(s.name))
        out.append(f"{s.name}: dynamic (behind NAT or on a changing address, IKE id {s.router.ike_id}): it starts "
                   f"all its tunnels, ESP in UDP 4500; {', '.join(peers) or 'no router'} accept IKE and NAT-T "
                   "(UDP 500/4500) from any address for it")
    return out


def as_markdown(wan: Wan, plans: list[RouterPlan], base: str) -> str:
    changed = frozenset(t for p in plans for t in p.added + list(p.changed))
    touched = [p for p in plans if p.touched]
    lines = [f"## WAN plan against `{base}`", "",
             f"{len(touched)} of {len(plans)} routers change; tunnels changed or added are drawn thick.", "",
             *insecure_crypto(wan),
             *[f"**Site shape:** {line}.\n" for line in dynamic_sites(wan)],
             "```mermaid", mermaid(wan, changed).rstrip(), "```", "",
             "| router | added | changed (why) | removed | unchanged | other files | key |", "|---|---|---|---|---|---|---|"]
    for p in plans:
        status = " (new)" if p.new_router else " (removed)" if p.gone_router else ""
        lines.append(f"| {p.router}{status} | {', '.join(p.added) or '-'} | "
                     + (", ".join(f"{t} ({'; '.join(w)})" for t, w in p.changed.items()) or "-")
                     + f" | {', '.join(p.removed) or '-'} | {p.unchanged} | {', '.join(p.other_files) or '-'} | "
                     + ("<br>".join(p.keys) or "-") + " |")
    lines += transit_table(wan)
    for p in touched:
        if p.dns_settings:
            lines += ["", f"<details><summary>{p.router}: dnsmasq settings</summary>", "",
                      *[f"- `{d.split(': ', 1)[0]}`: {d.split(': ', 1)[1]}" for d in p.dns_settings], "</details>"]
        lines += ["", f"<details><summary>{p.router}: commands</summary>", "", "```sh", *p.commands, "```", "</details>"]
        if p.diff:
            summary = f"{p.router}: file changes ({p.diff.count('+++ ')} files)"
            lines += ["", f"<details><summary>{summary}</summary>", "",
                      "```diff", p.diff.rstrip("\n").replace("```", "` ` `"), "```", "</details>"]
    return "\n".join(lines) + "\n"
