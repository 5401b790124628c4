"""Hub-and-spoke with spoke-to-spoke transit: the selectors, the hub's forwarding and firewall, DNS
and the Child SA count (the lab proves the traffic: tests/lab, docs/topologies.md)."""
from __future__ import annotations

import re
import shutil
from ipaddress import IPv4Network
from itertools import combinations
from pathlib import Path

import pytest

from render import paths
from render.manifest import Manifest
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, site_key

HUB_V5 = REPO / "tests/golden/hub-v5/sites"  # two meshed hubs (core, dr), spokes shop1 (2 LANs), shop2
HUB_OPENWRT = REPO / "tests/lab/wans/hub"  # one OpenWrt hub (home), three EL spokes


def _conf(tree, name: str) -> str:
    return tree[paths.tunnel_conf(name)].content.decode()


def _subnets(conf: str, side: str) -> list[str]:
    m = re.search(rf"^\t{side}subnets?=\{{?([^}}\n]*)\}}?$", conf, re.M)
    assert m, conf
    return m.group(1).split()


def test_every_spoke_pair_goes_through_the_first_hub_by_name():
    wan = load_sites(HUB_V5)
    assert [(x.a, x.b, x.hub) for x in wan.transits] == [("shop1", "shop2", "core")]
    wan = load_sites(HUB_OPENWRT)
    assert [(x.a, x.b, x.hub) for x in wan.transits] == [("acme", "berlin", "home"), ("acme", "oslo", "home"),
                                                         ("berlin", "oslo", "home")]


def test_the_transit_hub_does_not_depend_on_the_order_of_the_hubs_list(tmp_path):
    d = tmp_path / "sites"
    shutil.copytree(HUB_V5, d)
    wan_yaml = d / "wan.yaml"
    wan_yaml.write_text(wan_yaml.read_text().replace("hubs: [core, dr]", "hubs: [dr, core]"))
    assert [(x.a, x.b, x.hub) for x in load_sites(d).transits] == [("shop1", "shop2", "core")]


def test_a_mesh_has_no_transit_and_renders_as_before():
    wan = load_sites(REPO / "sites")
    assert wan.transits == ()
    for t in wan.tunnels:
        for end in (t.a, t.b):
            local, remote = wan.selectors(t, end)
            assert local == wan.site(end).lans and remote == wan.site(t.peer_of(end)).lans


def test_a_spokes_tunnel_to_its_transit_hub_carries_the_other_spokes_lans():
    wan = load_sites(HUB_V5)
    trees = render_wan(wan, "test")
    shop1 = [str(n) for n in wan.site("shop1").lans]
    shop2 = [str(n) for n in wan.site("shop2").lans]
    core = [str(n) for n in wan.site("core").lans]
    dr = [str(n) for n in wan.site("dr").lans]
    # through core (the transit hub): each spoke's side is its own LANs, the hub's side the hub's + the other spoke's
    assert _subnets(_conf(trees["shop1"], "core-shop1"), "left") == shop1
    assert _subnets(_conf(trees["shop1"], "core-shop1"), "right") == core + shop2
    assert _subnets(_conf(trees["shop2"], "core-shop2"), "right") == core + shop1
    # the hub's copy is the mirror image
    assert _subnets(_conf(trees["core"], "core-shop1"), "left") == core + shop2
    assert _subnets(_conf(trees["core"], "core-shop1"), "right") == shop1
    # the other hub carries no transit: the same pair on two tunnels would be two policies for one selector
    assert _subnets(_conf(trees["shop1"], "dr-shop1"), "right") == dr
    assert _subnets(_conf(trees["dr"], "dr-shop2"), "left") == dr
    # the hubs' own tunnel stays hub LANs only
    assert _subnets(_conf(trees["core"], "core-dr"), "left") == core


@pytest.mark.parametrize("sites", [HUB_V5, HUB_OPENWRT, REPO / "sites"])
def test_both_ends_of_every_tunnel_propose_the_same_child_sas(sites):
    wan = load_sites(sites)
    trees = render_wan(wan, "test")
    for t in wan.tunnels:
        ma = Manifest.from_json(trees[t.a][paths.MANIFEST].content).tunnels[t.name]
        mb = Manifest.from_json(trees[t.b][paths.MANIFEST].content).tunnels[t.name]
        assert ma.local_subnets == mb.remote_subnets and ma.remote_subnets == mb.local_subnets, t.name
        # pluto names one alias conn per (left, right) pair on each end: the same count both ways
        assert len(ma.conns) == len(mb.conns) == len(ma.local_subnets) * len(ma.remote_subnets), t.name


def test_spokes_forward_the_other_spokes_domains_through_the_hub():
    wan = load_sites(HUB_OPENWRT)
    trees = render_wan(wan, "test")
    acme = trees["acme"][paths.DNSMASQ_EL].content.decode()
    for other in ("berlin", "oslo", "home"):
        s = wan.site(other)
        assert f"server=/{s.dns.domain}/{s.dns.server}@{wan.site('acme').router.lan_address}\n" in acme
    # and those LANs are remote LANs of its firewall (fail-closed: dropped unless through a tunnel)
    nft = trees["acme"][paths.NFT_EL].content.decode()
    remote = re.search(r"set remote_lans \{[^}]*elements = \{ ([^}]*) \}", nft).group(1)
    assert set(remote.split(", ")) == {"10.3.0.0/24", "10.4.0.0/24", "192.168.2.0/24"}
    # but IKE is only spoken with its hub: the peers' list names the hub alone
    manifest = Manifest.from_json(trees["acme"][paths.MANIFEST].content)
    assert sorted(manifest.tunnels) == ["acme-home"]


def test_only_a_hub_forwards_tunnel_to_tunnel_and_only_its_transit_pairs():
    wan = load_sites(HUB_OPENWRT)
    trees = render_wan(wan, "test")
    lans = {s: str(wan.site(s).lans[0]) for s in ("acme", "berlin", "oslo")}
    pairs = {f"{lans[a]} . {lans[b]}" for a in lans for b in lans if a != b}
    forward = trees["home"][paths.fw4_snippet("forward")].content.decode()
    srcnat = trees["home"][paths.fw4_snippet("srcnat")].content.decode()
    for text in (forward, srcnat):
        m = re.search(r"ip saddr \. ip daddr \{ ([^}]*) \}", text)
        assert m and set(m.group(1).split(", ")) == pairs
    assert "meta ipsec exists rt ipsec exists ip saddr . ip daddr" in forward  # decrypted in, encrypted out
    for spoke in ("acme", "berlin", "oslo"):
        assert "@transit" not in trees[spoke][paths.NFT_EL].content.decode()
    # an EL hub: the identity snat and the tunnel-to-tunnel restriction (hub-v5's core)
    core = render_wan(load_sites(HUB_V5), "test")["core"][paths.NFT_EL].content.decode()
    assert "ip saddr . ip daddr @transit snat ip to ip saddr" in core
    assert "ip saddr @remote_lans ip daddr @remote_lans ip saddr . ip daddr != @transit drop" in core
    assert "meta ipsec missing drop" in core and "rt ipsec missing drop" in core  # fail-closed rules kept
    assert "@transit" not in render_wan(load_sites(HUB_V5), "test")["dr"][paths.NFT_EL].content.decode()


def _hub_wan(tmp: Path, n_spokes: int, lans_per_spoke: int = 1) -> Path:
    """One hub (EL, 1 LAN) and n spokes of `lans_per_spoke` LANs each."""
    d = tmp / f"hub{n_spokes}x{lans_per_spoke}"
    d.mkdir()
    (d / "wan.yaml").write_text("name: measure\ntopology: hub-and-spoke\nhubs: [hub]\ncrypto_profiles:\n  m:\n"
                                '    ike: ["aes256-sha2_256;dh19"]\n    esp: ["aes_gcm256"]\ndefaults:\n  crypto_profile: m\n')
    names = ["hub"] + [f"s{i:02d}" for i in range(n_spokes)]
    for i, name in enumerate(names):
        k = site_key(f"transit-{name}")
        lans = [f"10.{i}.{j}.0/24" for j in range(1 if name == "hub" else lans_per_spoke)]
        (d / f"{name}.yaml").write_text(
            f"name: {name}\nrouter:\n  platform: el\n  libreswan: 4\n  public_address: 198.51.100.{i + 1}\n"
            f"  lan_address: 10.{i}.0.1\n  key:\n    ckaid: {k['ckaid']}\n    rsasigkey: {k['rsasigkey']}\n"
            f"lans: [{', '.join(lans)}]\ndns:\n  domain: {name}.example.org\n  server: 10.{i}.0.53\n")
    return d


def test_child_sa_count_per_tunnel_grows_with_the_other_spokes_lans(tmp_path):
    """A spoke with 1 LAN and 10 other spokes: 11 Child SAs on its hub tunnel (the hub's LAN + 10
    spokes' LANs); the hub holds 11 per spoke tunnel, 121 in all (docs/topologies.md)."""
    wan = load_sites(_hub_wan(tmp_path, 11))
    trees = render_wan(wan, "test")
    spoke = Manifest.from_json(trees["s00"][paths.MANIFEST].content)
    assert [len(t.conns) for t in spoke.tunnels.values()] == [11]
    hub = Manifest.from_json(trees["hub"][paths.MANIFEST].content)
    assert sum(len(t.conns) for t in hub.tunnels.values()) == 121
    # two LANs per spoke: (2 x (1 + 2 x 10)) = 42 per tunnel
    wan = load_sites(_hub_wan(tmp_path, 11, 2))
    spoke = Manifest.from_json(render_wan(wan, "test")["s00"][paths.MANIFEST].content)
    assert [len(t.conns) for t in spoke.tunnels.values()] == [42]


def test_a_transit_wan_passes_the_real_tools(tmp_path):
    from render.check import check_out
    write_trees(render_wan(load_sites(_hub_wan(tmp_path, 3)), "test"), tmp_path / "out")
    assert [str(r) for r in check_out(tmp_path / "out") if not r.ok] == []


def test_transit_pairs_never_overlap_a_direct_tunnel():
    """No selector pair is carried by two tunnels of one router (two policies for one selector)."""
    for sites in (HUB_V5, HUB_OPENWRT):
        wan = load_sites(sites)
        for s in wan.sites:
            seen: set[tuple[IPv4Network, IPv4Network]] = set()
            for t in wan.tunnels_of(s.name):
                local, remote = wan.selectors(t, s.name)
                pairs = {(a, b) for a in local for b in remote}
                assert not pairs & seen, (s.name, t.name)
                seen |= pairs
        assert all(x.a != x.b and x.hub in wan.hubs for x in wan.transits)
        spokes = [s.name for s in wan.sites if s.name not in wan.hubs]
        assert {(x.a, x.b) for x in wan.transits} == set(combinations(spokes, 2))


def _with_zurich(tmp: Path) -> Path:
    """tests/lab/wans/hub plus a fourth spoke, zurich (a copy of oslo with its own key and addresses)."""
    d = tmp / "with-zurich"
    shutil.copytree(HUB_OPENWRT, d)
    oslo = load_sites(HUB_OPENWRT).site("oslo").router.key
    k = site_key("zurich")
    text = (d / "oslo.yaml").read_text().replace(oslo.ckaid, k["ckaid"]).replace(oslo.rsasigkey, k["rsasigkey"])
    (d / "zurich.yaml").write_text(text.replace("name: oslo", "name: zurich").replace("198.51.100.50", "198.51.100.70")
                                   .replace("10.4.0", "10.6.0").replace("oslo.acme.no", "zurich.acme.ch"))
    return d


def test_the_plan_shows_each_spoke_pairs_path_and_what_a_new_spoke_changes(tmp_path):
    from render.plan import as_json, as_markdown, as_text, plan
    wan, plans = plan(HUB_OPENWRT, _with_zurich(tmp_path), "main")
    by = {p.router: p for p in plans}
    assert by["acme"].transit == ["acme -> home -> berlin", "acme -> home -> oslo", "acme -> home -> zurich (new)"]
    assert by["home"].transit[-1] == "oslo -> home -> zurich (new)" and len(by["home"].transit) == 6
    # the spokes' tunnels to the hub change their subnets (the hub side grows by zurich's LAN), nothing else
    assert by["acme"].changed == {"acme-home": ["subnets"]} and by["acme"].added == []
    assert by["home"].added == ["home-zurich"] and set(by["home"].changed) == {"acme-home", "berlin-home", "home-oslo"}
    text = as_text(plans)
    assert "  path acme -> home -> zurich (new)" in text
    assert '"transit": [' in as_json(plans)
    md = as_markdown(wan, plans, "main")
    assert "| acme, zurich | acme -> home -> zurich |" in md and "acme -.-|via home| zurich" in md


def test_the_verdict_marks_transit_cells_and_names_each_path_and_shape(tmp_path):
    from lab.console import matrix, verdict
    from lab.contracts import Check, LabResult
    ok = {"why": ""}
    checks = [Check("tunnel", "a", "hub", True, ok), Check("tunnel", "b", "hub", True, ok)]
    for src, dst in (("a", "b"), ("b", "a")):
        checks += [Check("ping", src, dst, True, {"via": "hub"}), Check("router_ping", src, dst, True, {"via": "hub"}),
                   Check("dns", src, dst, src == "a", {"via": "hub", "why": "wrong answer"})]
    r = LabResult(ok=False, checks=checks, transit_pairs=[("a", "b", "hub")],
                  shapes={"a": ["spoke"], "b": ["spoke"], "hub": ["hub"]})
    rows = {line.split()[0]: line for line in matrix(r, ["a", "b", "hub"]).splitlines()[1:4]}
    assert rows["a"].split()[1:] == ["-", "^PRD", "T"] and rows["b"].split()[1:] == ["^PR.", "-", "T"]
    text = verdict(r, ["a", "b", "hub"], tmp_path)
    assert "transit a -> hub -> b (both ways): ping, router ping, dns FAILED" in text  # b -> a's DNS failed
    assert "site hub: hub" in text and "site a: spoke" in text
    assert "'^' spoke to spoke through a hub" in text
