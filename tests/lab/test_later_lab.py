"""Peers that apply later, with real pluto, ESP, signify-openbsd, curl and BusyBox wget
(lab/scenarios/later.py, docs/releases.md "Peers that apply later"): the example WAN's six routers enrol
and fetch release 1, then release 2 changes the crypto profile of home's five tunnels at both ends (an end on
the old profile answers NO_PROPOSAL_CHOSEN), and each router runs its real fetch at a random moment
spread over four WAN_HEALTH_TIMEOUTs (12 s here; the seed is printed and in result.json,
WAN_LAB_LATER_SEED reproduces it). No router rolls back; an end whose peer has not applied yet waits
(exit 0, `pending`); the next scheduled run clears it; every router ends on release 2 with every
tunnel up; a ping stream across an unchanged tunnel loses nothing. The outage of each changed
tunnel is measured and reported, not asserted."""
from __future__ import annotations

import pytest

from render.validate import load_sites

from support import REPO

pytestmark = pytest.mark.lab
WAN = load_sites(REPO / "sites")
CHANGED = next(s.name for s in WAN.sites if s.router.platform == "openwrt")  # the scenario's default: home


def _lab(uml_labs):
    outcome = uml_labs["later"]
    r = outcome.result
    assert outcome.ok, r.error or [c for c in r.checks if not c.ok][:5]
    return r, r.scenarios["later"]


def test_a_release_changing_both_ends_converges_at_random_moments_with_no_rollback(uml_labs):
    r, later = _lab(uml_labs)
    print(f"later: seed {later['seed']}, moments {later['moments']}, outages {later['outages']}")
    routers = {c.src: c.evidence for c in r.checks if c.kind == "later"}
    assert set(routers) == {s.name for s in WAN.sites}
    for e in routers.values():
        assert (e["rc"], e["final_rc"]) == (0, 0), e["output"]
        assert "rolling back" not in e["output"] and "was rolled back" not in e["output"]
        assert e["marker"] == {"tag": "v2.0.0", "pending": False, "failed": []}
    # at least one end fetched while its peer had not applied yet, and waited for it instead of failing
    assert any(f["pending"] for f in later["fetches"].values()), later["fetches"]
    # every router enrolled on release 1 first
    assert set(later["enrol"]) == set(routers)


def test_each_changed_tunnel_really_breaks_until_both_ends_applied_and_its_outage_is_reported(uml_labs):
    r, later = _lab(uml_labs)
    assert set(later["outages"]) == {t.name for t in WAN.tunnels_of(CHANGED)}
    for name, o in later["outages"].items():
        assert o["broke"] and o["seconds"] is not None, (name, o)
        assert o["answered_while_one_end"] == 0, (name, o)  # no echo crossed a half-changed tunnel
    assert any(o["probes_while_one_end"] > 0 for o in later["outages"].values())


def test_a_tunnel_the_release_does_not_change_loses_nothing(uml_labs):
    r, later = _lab(uml_labs)
    assert set(later["unchanged"]) == {t.name for t in WAN.tunnels} - {t.name for t in WAN.tunnels_of(CHANGED)}
    assert later["stream"]["sent"] > 100 and later["stream"]["lost"] == 0
    assert all(c.ok for c in r.checks if c.kind in ("stream", "sa_kept"))
    # after all that the WAN works: every tunnel, pings through ESP, DNS
    assert {c.evidence["tunnel"] for c in r.checks if c.kind == "tunnel" and c.ok} == {t.name for t in WAN.tunnels}
    assert {"tunnel", "ping", "dns"} <= {c.kind for c in r.checks if c.ok}
