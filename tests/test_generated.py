"""Generated WANs (lab/generate.py): every one validates, renders and passes `check` with the real
tools (ipsec addconn --checkconfig and algparse, dnsmasq --test, nft -c); the lab side is proven
in tests/lab/test_generated_lab.py (two seeds per run, printed)."""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from lab.generate import from_seed, wans, write
from lab.plan import wan_view
from render.check import check_out
from render.render import render_wan, write_trees
from render.validate import load_sites


def _prove_offline(spec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sites = write(spec, Path(tmp) / "sites")
        wan = load_sites(sites)  # valid: the generator excludes only what validation refuses
        out = Path(tmp) / "out"
        write_trees(render_wan(wan, "lab"), out)
        failed = [str(r) for r in check_out(out) if not r.ok]
        assert failed == [], spec.describe()
        view = wan_view(wan, out, "wgen")
        joined = {(s.name, o.name) for s, o in view.joined_pairs()}
        if wan.topology == "mesh":
            assert len(joined) == len(wan.sites) * (len(wan.sites) - 1)
        else:
            assert all(a in wan.hubs or b in wan.hubs for a, b in joined)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wans())
def test_every_generated_wan_renders_and_passes_the_real_tools(spec):
    _prove_offline(spec)


def test_seeds_cover_every_platform_major_dns_mode_topology_and_lan_count():
    seen = collections.defaultdict(set)
    for seed in range(200):
        spec = from_seed(seed)
        seen["topology"].add((spec.topology, len(spec.hubs)))
        for s in spec.sites:
            seen["platform x major"].add((s.platform, s.libreswan))
            seen["dns mode"].add(s.dns_mode or spec.default_dns_mode)
            seen["lans"].add(len(s.lans))
            seen["router dns"].add(s.dns_server == s.router)
    assert seen["topology"] == {("mesh", 0), ("hub-and-spoke", 1), ("hub-and-spoke", 2)}
    assert seen["platform x major"] == {("el", 4), ("el", 5), ("openwrt", 4)}  # 5 on OpenWrt is refused by validation
    assert seen["dns mode"] == {"forward", "hosts"}
    assert seen["lans"] == {1, 2, 3}
    assert seen["router dns"] == {False, True}


def test_a_seed_always_gives_the_same_wan(tmp_path):
    a = write(from_seed(41), tmp_path / "a")
    b = write(from_seed(41), tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert all((a / p.name).read_text() == (b / p.name).read_text() for p in a.iterdir())
