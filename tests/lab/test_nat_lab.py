"""A dynamic site behind a carrier-grade NAT in real kernels (lab/scenarios/nat.py): its tunnels come
back by themselves after the NAT's outside address changes, they cross the internet as ESP in UDP
4500, and TCP into it across the narrower NAT link needs the MSS clamp: it stalls without it (User-Mode
Linux, which loads no firewall) and completes with it (QEMU, the rendered firewall loaded)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.lab


def _checks(outcome, kind: str) -> list:
    return [c for c in outcome.result.checks if c.kind == kind]


def test_a_dynamic_site_comes_back_after_its_nats_address_changes(uml_labs):
    outcome = uml_labs["natted"]
    assert outcome.ok, outcome.result.error or [c for c in outcome.result.checks if not c.ok][:5]
    assert outcome.result.shapes == {"home": ["dynamic"]}
    (moved,) = _checks(outcome, "nat_readdress")
    assert moved.ok and moved.evidence["old_outside"] != moved.evidence["new_outside"]
    assert set(moved.evidence["per_peer_seconds"]) == {"acme", "berlin"} and moved.evidence["seconds"] > 0
    # after the change: home's tunnels as ESP in UDP 4500 from the new outside address, no raw ESP
    (seen,) = _checks(outcome, "capture_nat")
    assert seen.evidence["outside_address"] == moved.evidence["new_outside"]
    assert seen.evidence["esp_in_udp_4500_packets"] > 0 and seen.evidence["raw_esp_packets"] == 0
    verdict = outcome.verdict()
    assert "site home: dynamic" in verdict and "every tunnel carried traffic again after" in verdict


def test_without_the_mss_clamp_tcp_into_the_natted_site_stalls(uml_labs):
    """User-Mode Linux loads no firewall, so no router clamps the MSS: the negative half of the proof."""
    outcome = uml_labs["natted"]
    transfer = outcome.result.scenarios["nat"]["home"]["tcp_transfer"]
    assert transfer["clamped"] is False and not transfer["ok"] and transfer["received"] < transfer["bytes"]
    assert not _checks(outcome, "mss")  # not counted as a check where the clamp is not loaded
    assert any("MSS clamp on home's tunnels: not proven here" in n for n in outcome.notes)


def test_with_the_mss_clamp_tcp_into_the_natted_site_completes_on_qemu(qemu_labs):
    outcome = qemu_labs["example"]
    (mss,) = _checks(outcome, "mss")
    assert mss.ok, mss.evidence
    assert mss.evidence["received"] == mss.evidence["bytes"]
    assert mss.evidence["sender_mss"] < mss.evidence["link_mtu"] - 40  # the clamp, not the LAN's 1460
