"""A router key rotation in the lab, with real pluto, ESP, fetch and reconcile (lab/scenarios/
rotation.py, docs/keys.md): the routers of three sites enrol (tests/lab/wans/three-v5: acme and
berlin on a real Libreswan 5.2 pluto in the lab's Debian 13 root, home on 4.10); berlin (it
initiates berlin-home and responds to acme-berlin) makes a second key pair in its own NSS database
with 5.2's `ipsec newhostkey`; its peers hold both keys during the overlap with `whack --addkey`,
acme on 5.2 and home on 4.10; three signed releases
(added, rolled, retired) are fetched by every router, in orders that exercise the overlap (peers
first, then berlin first, then peers first), while a ping stream crosses each of berlin's tunnels.
After each step every tunnel is up, every router runs the step's release (none rolled back), the
peers hold the keys the step says, and after a fresh authentication the peer's pluto verified
berlin's signature with the key the step says; after release 3 each peer refuses the old key.
The loss per tunnel per step is reported (result.json scenarios/rotation), not asserted."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.lab


def test_a_key_rolls_over_in_three_releases_without_a_flag_day_on_uml(uml_labs):
    outcome = uml_labs["rotation"]
    checks = outcome.result.checks
    assert outcome.ok, outcome.result.error or [c for c in checks if not c.ok]
    # berlin, the router that rolls its key, and acme, one of its peers, really ran 5.2 (the lab's root),
    # home 4.10: the rollover is proven on a 5.x router and on a 5.x and a 4.x peer (a 5.x site that fell
    # back to 4.x would be named in other_major)
    ran = outcome.result.libreswan
    for name in ("acme", "berlin"):
        assert ran[name]["ran"].startswith("5.") and ran[name]["root"], ran
    assert ran["home"]["ran"].startswith("4.") and not ran["home"]["root"], ran
    assert not outcome.result.other_major
    rot = {(c.src, c.dst): c for c in checks if c.kind == "rotation"}
    report = outcome.result.scenarios["rotation"]
    assert report["rotated"] == "berlin"
    assert [s["step"] for s in report["steps"]] == ["added", "rolled", "retired"]
    old, new = report["old_keyid"], report["new_keyid"]
    assert old != new
    for step, signer, held in (("added", old, sorted({old, new})), ("rolled", new, sorted({old, new})),
                               ("retired", new, [new])):
        for router in ("acme", "berlin", "home"):
            c = rot[(router, f"{step}: fetch v1.{['added', 'rolled', 'retired'].index(step) + 1}.0")]
            assert c.ok and "rolled back" not in c.evidence["output"], c.evidence
        for tunnel in ("acme-berlin", "berlin-home"):
            c = rot[("berlin", f"{step}: {tunnel} up")]
            assert c.ok and c.evidence["sent"] > 0, c.evidence
        for peer in ("acme", "home"):
            assert rot[(peer, f"{step}: keys held for berlin")].evidence["held"] == held
            word = "NEW" if signer == new else "OLD"
            c = rot[("berlin", f"{step}: signs to {peer} with {word}")]
            assert c.ok and set(c.evidence["verified_with"]) == {signer}, c.evidence
    # release 2 was fetched by berlin first: it signed with NEW to peers still on release 1
    assert report["steps"][1]["order"][0] == "berlin"
    for peer in ("acme", "home"):
        line = rot[(peer, "retired: old key refused")].evidence["log_line"]
        assert "authentication failed" in line and f"*{new}" in line and old not in line, line
    # the loss figures are there (reported, not a limit)
    for s in report["steps"]:
        assert set(s["loss"]) == {"acme-berlin", "berlin-home"}
    assert report["key_generation_seconds"] > 0
    # after all that the WAN works: tunnels, pings through ESP, DNS
    assert {"tunnel", "ping", "dns"} <= {c.kind for c in checks if c.ok}
