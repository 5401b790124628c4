"""Hub-and-spoke with transit in the lab (User-Mode Linux, real pluto and ESP): one OpenWrt hub
(home) and three EL spokes (tests/lab/wans/hub). Every spoke-to-spoke pair is proven through the hub:
LAN host pings with the SA counters rising on the spoke's tunnel to the hub and on the hub's tunnel
to the other spoke, router pings from the LAN address, and DNS of the other spokes' domains. On UML
the firewall is not exercised (its nftables lacks inet/ip): the hub's fw4 transit rules are checked
by `nft -c` (tests/test_transit.py), not here."""
from __future__ import annotations

from itertools import permutations

import pytest

pytestmark = pytest.mark.lab

SPOKES = ("acme", "berlin", "oslo")


def test_every_spoke_pair_is_proven_through_its_hub(uml_labs):
    assert_transit(uml_labs["hub"])


def test_the_hubs_firewall_forwards_transit_on_qemu(qemu_labs):
    """The same WAN on QEMU with the rendered firewalls loaded (the hub is OpenWrt: fw4's forward chain
    with our transit rules; the spokes EL): every spoke pair still passes through the hub."""
    outcome = qemu_labs["hub"]
    assert_transit(outcome)
    assert outcome.result.firewall_exercised is True
    fw = [c for c in outcome.result.checks if c.kind == "firewall"]
    assert len(fw) == 8 and all(c.ok for c in fw)  # before and after the probes, every router
    from firewalld_checks import if_firewalld
    if_firewalld(outcome, {"acme", "berlin", "oslo"}, "acme")  # the EL spokes


def assert_transit(outcome) -> None:
    r = outcome.result
    assert outcome.ok, r.error or [c for c in r.checks if not c.ok][:5]
    assert r.unjoined_pairs == []
    assert sorted(r.transit_pairs) == [("acme", "berlin", "home"), ("acme", "oslo", "home"), ("berlin", "oslo", "home")]
    for src, dst in permutations(SPOKES, 2):
        for kind in ("ping", "router_ping", "dns"):
            checks = [c for c in r.checks if c.kind == kind and (c.src, c.dst) == (src, dst)]
            assert checks and all(c.ok and c.evidence["via"] == "home" for c in checks), (kind, src, dst)
        pings = [c for c in r.checks if c.kind == "ping" and (c.src, c.dst) == (src, dst)]
        assert all(c.evidence["hub_sa_out_bytes_rose"] for c in pings)
    # no tunnel between two spokes was made or checked
    assert {tuple(sorted((c.src, c.dst))) for c in r.checks if c.kind == "tunnel"} == {tuple(sorted((s, "home"))) for s in SPOKES}
    capture = next(c for c in r.checks if c.kind == "capture")
    assert capture.evidence["plain_icmp_between_lans"] == 0


def test_the_verdict_shows_transit_pairs_and_shapes(uml_labs):
    outcome = uml_labs["hub"]
    text = outcome.verdict()
    assert "transit acme -> home -> berlin (both ways): ping, router ping, dns proven" in text
    assert "site home: hub" in text and "site oslo: spoke" in text
    row = next(line for line in text.splitlines() if line.startswith("acme "))
    assert "^PRD" in row  # acme -> berlin and acme -> oslo, through the hub
    assert outcome.result.shapes == {"acme": ["spoke"], "berlin": ["spoke"], "home": ["hub"], "oslo": ["spoke"]}
