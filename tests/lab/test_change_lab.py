"""Change without disruption, proven with real pluto: routers apply new trees with their own
reconcile program; tunnels the change does not touch keep their SAs and lose no packet.

One lab plays three changes one after another (tests/lab/conftest.py, `uml_labs["changes"]`): the
example WAN gets a seventh site (zurich), loses it again, then oslo's LAN grows to a /23."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.lab


def _lab(uml_labs):
    outcome = uml_labs["changes"]
    r = outcome.result
    assert outcome.ok, r.error or [c for c in r.checks if not c.ok][:5]
    return r, r.scenarios["change"]["steps"]


def _tunnel_checks(r) -> list:
    return [c for c in r.checks if c.kind == "tunnel"]


def test_adding_a_seventh_site_keeps_every_existing_sa_and_loses_no_packet(uml_labs):
    r, steps = _lab(uml_labs)
    add = steps[0]
    # 15 tunnels proven before the change, all 21 after it
    tunnels = _tunnel_checks(r)
    assert len(tunnels[:15]) == 15 and {c.evidence["tunnel"] for c in tunnels[15:36]} >= {"rome-zurich", "acme-zurich"}
    assert len({c.evidence["tunnel"] for c in tunnels[:36]}) == 21
    assert add["unchanged_tunnels"] == 15 and add["disturbed"] == []
    assert add["stream"]["sent"] > 100 and add["stream"]["lost"] == 0
    assert all(c.ok for c in r.checks if c.kind in ("change", "sa_kept", "stream"))


def test_removing_a_site_removes_only_its_tunnels(uml_labs):
    r, steps = _lab(uml_labs)
    remove = steps[1]
    assert remove["disturbed"] == [] and remove["unchanged_tunnels"] == 15
    after = _tunnel_checks(r)[36:51]
    assert len(after) == 15 and not any("zurich" in c.evidence["tunnel"] for c in after)
    assert remove["routers"]["zurich"]["seconds"] == 0  # removed: its pluto shut down


def test_changing_one_sites_lan_replaces_only_that_sites_tunnels(uml_labs):
    r, steps = _lab(uml_labs)
    wider = steps[2]
    assert wider["unchanged_tunnels"] == 10 and wider["disturbed"] == []
    assert len(_tunnel_checks(r)) == 15 + 21 + 15 + 15
