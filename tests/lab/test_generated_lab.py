"""Two generated WANs per run (lab/generate.py; seeds printed, WAN_LAB_SEEDS=a,b reproduces them, as
does ./run lab --generate SEED): the first seed's WAN as drawn, the second seed's with two meshed hubs
(MESHED_HUBS), proven in the lab as far as it can: a valid WAN that fails here is a bug in the
renderer or the lab."""
from __future__ import annotations

import pytest

from lab.generate import MESHED_HUBS, from_seed

pytestmark = pytest.mark.lab


def test_a_generated_wan_passes_the_lab(uml_labs):
    seeds = [int(k.split()[1]) for k in uml_labs if k.startswith("generated ")]
    assert len(seeds) == 1
    _proven(uml_labs[f"generated {seeds[0]}"], seeds[0])


def test_a_generated_wan_with_two_meshed_hubs_proves_spoke_to_spoke_through_the_first(uml_labs):
    key = next(k for k in uml_labs if k.startswith("generated-hubs "))
    _proven(uml_labs[key], int(key.split()[1]), **MESHED_HUBS)


def _proven(outcome, seed: int, **kw) -> None:
    spec = from_seed(seed, **kw)
    r = outcome.result
    assert outcome.ok, f"seed {seed} ({spec.describe()}): {r.error or [c for c in r.checks if not c.ok][:5]}"
    # a 5.x site ran a real 5.x pluto (the lab's Debian 13 root), or a 4.x rendering that the result names
    fives = {s.name for s in spec.sites if s.libreswan == 5}
    ran5 = {n for n, v in r.libreswan.items() if str(v.get("ran", "")).startswith("5.")}
    assert ran5 | set(r.other_major) == fives and not ran5 & set(r.other_major), (r.libreswan, r.other_major)
    # the lab proves the pairs the topology joins, and every pair of spokes through a hub (transit)
    spokes = [s.name for s in spec.sites if s.name not in spec.hubs] if spec.hubs else []
    assert r.unjoined_pairs == []
    assert len(r.transit_pairs) == len(spokes) * (len(spokes) - 1) // 2
    for a, b, hub in r.transit_pairs:
        assert hub == min(spec.hubs)
        for src, dst in ((a, b), (b, a)):
            pings = [c for c in r.checks if c.kind == "ping" and (c.src, c.dst) == (src, dst)]
            assert pings and all(c.ok and c.evidence["via"] == hub for c in pings), (src, dst)
    # one check per tunnel from the wait (a tunnel that went down after it was proven up is waited for
    # again and keeps a second one, evidence after_going_down: lab/engine.py)
    first = [c for c in r.checks if c.kind == "tunnel" and not c.evidence.get("after_going_down")]
    assert len(first) == len({(c.src, c.dst) for c in first})
    # the shapes the reviewer reads in the verdict; each dynamic site proven behind its NAT (ESP in UDP
    # 4500 only) and after its address changed (the nat scenario plays by itself)
    assert {n for n, words in r.shapes.items() if "dynamic" in words} == {s.name for s in spec.sites if s.dynamic}
    router_dns = {s.name for s in spec.sites if s.dns_server == s.router}
    assert {n for n, words in r.shapes.items() if "router-dns" in words} == router_dns
    for s in spec.sites:
        if s.dynamic:
            nat = sorted((c.kind, c.ok) for c in r.checks if c.kind in ("capture_nat", "nat_readdress") and c.src == s.name)
            assert nat == [("capture_nat", True), ("nat_readdress", True)], s.name
