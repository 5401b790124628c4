"""Releases in the lab, with real pluto, ESP, signify-openbsd, curl and BusyBox wget: routers that
start with their enrolment only fetch a signed release from a server inside the lab, verify and
apply it; then one router is offered a tampered bundle, a bundle signed by another key, another
router's bundle, an older release, a download that breaks off, an expired release (exit 4) and a
release from the router's future (exit 5) (each refused, nothing on the router changes: files and
SA SPIs), and a release whose wrong peer keys break its tunnels (rolled back automatically: its
peers.list shows no peer that changed too; the tunnel comes back). The lab's checks then prove the WAN as usual."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.lab


def test_routers_fetch_verify_apply_refuse_and_roll_back_on_uml(uml_labs):
    outcome = uml_labs["release"]
    checks = outcome.result.checks
    assert outcome.ok, outcome.result.error or [c for c in checks if not c.ok]
    rel = {(c.src, c.dst): c.evidence for c in checks if c.kind == "release"}
    # both routers enrolled by fetching v1.0.0; a ping crossed the new tunnel (acme initiates it)
    assert {("acme", "enrol"), ("home", "enrol")} <= set(rel)
    assert rel[("acme", "enrol")]["until_traffic_seconds"] is not None
    steps = {dst: e for (src, dst), e in rel.items() if src == "acme" and dst != "enrol"}
    assert set(steps) == {"tampered bundle", "bad signature", "bundle for another router", "downgrade",
                          "download breaks off", "expired release", "clock behind the release",
                          "broken release rolled back"}
    assert [steps[s]["rc"] for s in ("tampered bundle", "bad signature", "bundle for another router", "downgrade")] == [2] * 4
    assert (steps["expired release"]["rc"], steps["clock behind the release"]["rc"]) == (4, 5)
    assert steps["broken release rolled back"]["rc"] == 1
    assert "rolling back to v1.0.0" in steps["broken release rolled back"]["output"]
    # pluto takes every rendered keyword without a warning (4.10 warned about dpdtimeout= on IKEv2)
    for router in ("acme", "home"):
        assert "warning" not in rel[(router, "enrol")]["output"], rel[(router, "enrol")]["output"]
    # after all that the WAN works: tunnel, pings through ESP, DNS
    assert {"tunnel", "ping", "dns", "capture"} <= {c.kind for c in checks if c.ok}
