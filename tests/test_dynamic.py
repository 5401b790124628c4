"""Sites without a fixed public address (behind NAT or CGNAT, or on a changing address), and the MSS
clamp for tunnel traffic: validation, the tunnels' ends, the firewalls and the plan."""
from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from render import paths
from render.check import check_out
from render.errors import WanError
from render.plan import as_markdown, dynamic_sites, plan_trees
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, site_key

WAN = ("name: t\ntopology: {topology}\n{hubs}crypto_profiles:\n  modern:\n    ike: [\"aes256-sha2_256;dh19\"]\n"
       "    esp: [\"aes_gcm256\"]\ndefaults:\n  crypto_profile: modern\n")


def _site(name: str, public: str, n: int, platform: str = "el", ike_id: str | None = None, libreswan: int = 4) -> str:
    k = site_key(name)
    idline = f"  ike_id: \"{ike_id}\"\n" if ike_id else ""
    return (f"name: {name}\nrouter:\n  platform: {platform}\n  libreswan: {libreswan}\n  public_address: {public}\n{idline}"
            f"  lan_address: 10.{n}.0.1\n  key: {{ckaid: {k['ckaid']}, rsasigkey: '{k['rsasigkey']}'}}\n"
            f"lans: [10.{n}.0.0/24]\ndns:\n  domain: {name}.example.net\n  server: 10.{n}.0.53\n")


def _wan(tmp: Path, sites: dict[str, str], topology: str = "mesh", hubs: tuple[str, ...] = ()) -> Path:
    d = tmp / "sites"
    d.mkdir()
    (d / "wan.yaml").write_text(WAN.format(topology=topology, hubs=f"hubs: [{', '.join(hubs)}]\n" if hubs else ""))
    for name, text in sites.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def _conf(trees, router: str, tunnel: str) -> str:
    return trees[router][paths.tunnel_conf(tunnel)].content.decode()


def _settings(conf: str) -> dict[str, str]:
    return dict(line.strip().split("=", 1) for line in conf.splitlines() if line.startswith("\t") and "=" in line)


def test_a_dynamic_site_starts_its_tunnels_from_its_default_route_and_its_peers_accept_it_from_any_address():
    wan = load_sites(REPO / "sites")
    home = wan.site("home")
    assert home.router.dynamic and home.router.ike_id == "@home-gw.home.lan"
    trees = render_wan(wan)
    for t in wan.tunnels_of("home"):
        assert t.initiator == "home"
        mine, theirs = _settings(_conf(trees, "home", t.name)), _settings(_conf(trees, t.peer_of("home"), t.name))
        assert mine["left"] == "%defaultroute" and mine["leftid"] == "@home-gw.home.lan"
        assert mine["auto"] == "start" and mine["dpdaction"] == "restart" and mine["encapsulation"] == "yes"
        assert mine["right"] == str(wan.site(t.peer_of("home")).router.public_address)
        assert theirs["right"] == "%any" and theirs["rightid"] == "@home-gw.home.lan"
        assert theirs["auto"] == "add" and theirs["dpdaction"] == "clear" and theirs["encapsulation"] == "yes"
    # tunnels between fixed sites are as before: no %any, no forced encapsulation
    fixed = _settings(_conf(trees, "acme", "acme-berlin"))
    assert fixed["right"] == "192.0.2.40" and "encapsulation" not in fixed
    manifest = trees["acme"][paths.MANIFEST].content.decode()
    assert '"peer_address": "dynamic"' in manifest


def test_libreswan_5_ends_get_no_dpdaction_but_the_same_nat_keywords(tmp_path):
    d = _wan(tmp_path, {"hq": _site("hq", "192.0.2.10", 1, libreswan=5),
                        "shop": _site("shop", "dynamic", 2, ike_id="@shop-gw.example.net", libreswan=5)})
    trees = render_wan(load_sites(d))
    shop, hq = _settings(_conf(trees, "shop", "hq-shop")), _settings(_conf(trees, "hq", "hq-shop"))
    assert "dpdaction" not in shop and "dpdaction" not in hq  # obsolete in 5.x (v5.2 keywords.c:556)
    assert shop["left"] == "%defaultroute" and shop["auto"] == "start" and shop["encapsulation"] == "yes"
    assert hq["right"] == "%any" and hq["rightid"] == "@shop-gw.example.net"


def test_routers_with_a_dynamic_peer_accept_ike_from_any_address_and_the_others_keep_the_allow_list(tmp_path):
    d = _wan(tmp_path, {"hq": _site("hq", "192.0.2.10", 1), "dc": _site("dc", "198.51.100.7", 3, platform="openwrt"),
                        "shop": _site("shop", "dynamic", 2, platform="openwrt", ike_id="@shop-gw.example.net"),
                        "lab": _site("lab", "203.0.113.9", 4)},
             topology="hub-and-spoke", hubs=("hq", "dc"))
    wan = load_sites(d)
    trees = render_wan(wan)
    # dc (OpenWrt) has the dynamic spoke shop: UDP 500/4500 from anywhere; ESP only from the fixed peers
    dc_input = trees["dc"][paths.fw4_snippet("input")].content.decode()
    assert 'meta nfproto ipv4 udp dport { 500, 4500 } accept' in dc_input
    assert "ip saddr { 192.0.2.10, 203.0.113.9 } meta l4proto esp accept" in dc_input
    # hq (EL, firewalld) gets the policy that opens IKE to any address; lab (a spoke without a dynamic peer) does not
    assert paths.firewalld_policy(paths.FIREWALLD_IKE_ANY) in trees["hq"]
    assert paths.firewalld_policy(paths.FIREWALLD_IKE_ANY) not in trees["lab"]
    peers = trees["hq"][paths.firewalld_zone("wan-peers")].content.decode()
    assert "198.51.100.7/32" in peers and "203.0.113.9/32" in peers and "dynamic" not in peers
    # shop itself only talks to fixed peers: its allow list names them
    shop_input = trees["shop"][paths.fw4_snippet("input")].content.decode()
    assert "ip saddr { 192.0.2.10, 198.51.100.7 } udp dport { 500, 4500 } accept" in shop_input
    assert "udp dport { 500, 4500 } accept comment \"wan: IKE and NAT-T from any" not in shop_input
    # every file passes the real tools (nft -c, addconn --checkconfig, XML)
    write_trees(trees, tmp_path / "out")
    bad = [r for r in check_out(tmp_path / "out") if not r.ok]
    assert not bad, bad
    # the plan names the shape and the routers that open IKE to any address
    lines = dynamic_sites(wan)
    assert lines == ["shop: dynamic (behind NAT or on a changing address, IKE id @shop-gw.example.net): it starts all "
                     "its tunnels, ESP in UDP 4500; dc, hq accept IKE and NAT-T (UDP 500/4500) from any address for it"]
    assert "**Site shape:** shop: dynamic" in as_markdown(wan, plan_trees(trees, trees), "main")


def test_a_router_whose_only_peer_is_dynamic_renders_valid_rules(tmp_path):
    d = _wan(tmp_path, {"hq": _site("hq", "192.0.2.10", 1, platform="openwrt"),
                        "shop": _site("shop", "dynamic", 2, ike_id="@shop-gw.example.net")})
    trees = render_wan(load_sites(d))
    hq_input = trees["hq"][paths.fw4_snippet("input")].content.decode()
    assert "ip saddr { }" not in hq_input and "l4proto esp" not in hq_input
    write_trees(trees, tmp_path / "out")
    bad = [r for r in check_out(tmp_path / "out") if not r.ok]
    assert not bad, bad


def test_spokes_may_both_be_dynamic_but_not_a_hub_and_its_spoke(tmp_path):
    (tmp_path / "a").mkdir()
    ok = _wan(tmp_path / "a", {"hq": _site("hq", "192.0.2.10", 1),
                               "s1": _site("s1", "dynamic", 2, ike_id="@s1.example.net"),
                               "s2": _site("s2", "dynamic", 3, ike_id="@s2.example.net")},
              topology="hub-and-spoke", hubs=("hq",))
    wan = load_sites(ok)
    assert {t.name: t.initiator for t in wan.tunnels} == {"hq-s1": "s1", "hq-s2": "s2"}
    (tmp_path / "b").mkdir()
    bad = _wan(tmp_path / "b", {"hq": _site("hq", "dynamic", 1, ike_id="@hq.example.net"),
                                "s1": _site("s1", "dynamic", 2, ike_id="@s1.example.net"),
                                "s2": _site("s2", "203.0.113.2", 3)},
               topology="hub-and-spoke", hubs=("hq",))
    with pytest.raises(WanError) as e:
        load_sites(bad)
    text = str(e.value)
    assert "s1.yaml:5: router.public_address: s1 and hq" in text and "a hub needs a fixed public address" in text
    assert "s2" not in text  # a fixed spoke of a dynamic hub is fine: it is the hub that starts


def test_the_mss_clamp_is_in_both_platforms_forward_path():
    trees = render_wan(load_sites(REPO / "sites"))
    clamp = "tcp flags syn tcp option maxseg size set rt mtu"
    fw4 = trees["home"][paths.fw4_snippet("forward")].content.decode().splitlines()
    el = trees["acme"][paths.NFT_EL].content.decode()
    first_accept = next(i for i, line in enumerate(fw4) if line.endswith('"wan: from the tunnels"'))
    clamp_at = next(i for i, line in enumerate(fw4) if clamp in line)
    assert clamp_at < first_accept  # an accept ends the chain: the clamp must come before
    assert "rt ipsec exists ip saddr { 192.168.2.0/24 }" in fw4[clamp_at]
    forward = el[el.index("chain forward"):el.index("chain output")]
    assert f"ip saddr @local_lans ip daddr @remote_lans {clamp}" in forward


def test_the_lab_puts_a_dynamic_site_behind_a_nat_with_addresses_of_its_own(tmp_path):
    from lab.plan import pick_infra, wan_addresses, wan_view
    wan = load_sites(REPO / "sites")
    write_trees(render_wan(wan), tmp_path / "out")
    view = wan_view(wan, tmp_path / "out", "wt")
    home = view.site("home")
    assert "dynamic" in home.shapes and all(s.nat is None and "dynamic" not in s.shapes for s in view.sites if s.name != "home")
    n = home.nat
    assert home.public == n.inside and n.mtu < 1500
    infra = pick_infra([wan], "wt")
    taken, nets = wan_addresses([wan])
    lab_own = {infra.inet_gw, infra.isp_resolver, infra.isp_answer, infra.release_server, infra.rebind_answer}
    mine = [n.inside, n.inside_gw, n.outside, n.outside_next]
    assert len(set(mine)) == 4 and not set(mine) & lab_own
    assert not {str(a) for a in taken} & set(mine) and not any(IPv4Address(a) in net for a in mine for net in nets)


def test_a_wan_with_a_dynamic_site_plays_the_nat_scenario_by_itself(tmp_path):
    from lab.contracts import LabPlan
    from lab.run import LabRequest, _prepare
    p = _prepare(LabRequest(sites=REPO / "sites", results=tmp_path / "r"), "uml", 4)
    plan = LabPlan.read(tmp_path / "r" / "plan.json")
    assert [c.name for c in plan.scenarios] == ["nat"] and plan.scenarios[0].data == {"sites": ["home"]}
    assert p.plan.wan.site("home").nat is not None
