"""The lab, end to end, in real kernels with real Libreswan, dnsmasq, nft, dig.

Each test boots a lab kernel (User-Mode Linux or QEMU). The negative cases break one thing in
the rendered files and require exactly the matching cells to go red, with diagnostics that show why.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lab.run import run_lab
from render import paths

from support import REPO

pytestmark = pytest.mark.lab
WANS = REPO / "tests/lab/wans"


def red(outcome, kind: str) -> set[tuple[str, str]]:
    return {(c["src"], c["dst"]) for c in outcome.result["checks"] if c["kind"] == kind and not c["ok"]}


def kinds(outcome) -> set[str]:
    return {c["kind"] for c in outcome.result["checks"]}


def test_two_site_smoke_on_uml(tmp_path):
    outcome = run_lab(WANS / "two", "uml", tmp_path / "results", timeout=600)
    assert outcome.ok, outcome.result.get("error") or [c for c in outcome.result["checks"] if not c["ok"]]
    assert {"tunnel", "ping", "router_ping", "dns", "dns_outside", "dns_rebind", "capture"} <= kinds(outcome)
    # User-Mode Linux cannot load the firewall: the verdict must say so, and count no firewall check
    assert outcome.result["firewall_exercised"] is False
    assert "firewall" not in kinds(outcome)
    assert any("NOT exercised" in n for n in outcome.notes)
    capture = next(c for c in outcome.result["checks"] if c["kind"] == "capture")
    assert capture["evidence"]["esp_packets"] > 0 and capture["evidence"]["plain_icmp_between_lans"] == 0
    junit = (tmp_path / "results/junit.xml").read_text()
    assert 'failures="0"' in junit and "ping acme -&gt; home" in junit
    # no key material leaves the lab; the result says the lab used its own key pairs
    assert "PSK" not in json.dumps(outcome.result) and "PRIVATE" not in json.dumps(outcome.result)
    assert outcome.result["keys"]["origin"] == "lab" and set(outcome.result["keys"]["ckaids"]) == {"acme", "home"}
    assert any("its own key pair per router" in n for n in outcome.notes)


def _break_three_things(out: Path) -> None:
    # 1. acme-berlin: berlin's end holds a wrong public key for acme (one nobody has the private half of)
    wrong_peer_key(out / "berlin" / paths.tunnel_conf("acme-berlin"))
    # 2. oslo's router loses leftsourceip on every tunnel
    for conf in (out / "oslo" / paths.IPSEC_D).glob("*.conf"):
        conf.write_text(re.sub(r"^\tleftsourceip=.*\n", "", conf.read_text(), flags=re.M))
    # 3. home (OpenWrt) forwards acme.inc to a wrong server (a host that runs no DNS)
    uci = out / "home" / paths.DHCP_UCI_OPENWRT
    uci.write_text(uci.read_text().replace("/acme.inc/10.1.2.250@", "/acme.inc/10.1.2.251@"))


def wrong_peer_key(conf: Path) -> None:
    """The conn expects a public key for its peer that the peer does not have."""
    from lab.keys import stranger_key
    conf.write_text(re.sub(r"^\trightrsasigkey=.*$", "\trightrsasigkey=" + stranger_key().rsasigkey, conf.read_text(),
                           flags=re.M))


def test_wrong_peer_key_missing_leftsourceip_and_wrong_dns_forward_turn_exactly_their_cells_red(tmp_path):
    outcome = run_lab(WANS / "four", "uml", tmp_path / "results", timeout=600, tamper=_break_three_things)
    assert not outcome.ok
    assert red(outcome, "tunnel") == {("acme", "berlin")}
    assert red(outcome, "ping") == {("acme", "berlin"), ("berlin", "acme")}
    # oslo's own pings miss the tunnels (and acme<->berlin has no tunnel at all)
    assert red(outcome, "router_ping") == ({("oslo", o) for o in ("acme", "berlin", "home")}
                                           | {("acme", "berlin"), ("berlin", "acme")})
    assert red(outcome, "dns") == {("home", "acme"), ("acme", "berlin"), ("berlin", "acme")}
    diag = tmp_path / "results/diagnostics"
    assert "AUTHENTICATION_FAILED" in (diag / "berlin/pluto.log").read_text() + (diag / "acme/pluto.log").read_text()
    # the diagnostics show the cause: no route towards the remote LANs carries the LAN source
    routes = (diag / "oslo/ip-r.txt").read_text()
    assert "default via" in routes and not re.search(r"^10\.1\.2\.0/24 .*src 10\.4\.0\.1", routes, re.M)
    assert "10.1.2.251" in (diag / "home/dnsmasq.log").read_text()
    for router in ("acme", "berlin", "oslo", "home"):
        state = (diag / router / "ip-xfrm-state.txt").read_text()
        assert not re.search(r"0x[0-9a-f]{16,}", state), "XFRM keys must be scrubbed"


def test_example_wan_passes_on_qemu_with_the_firewall_active(tmp_path):
    outcome = run_lab(REPO / "sites", "qemu", tmp_path / "results", timeout=1500)
    assert outcome.ok, outcome.result.get("error") or [c for c in outcome.result["checks"] if not c["ok"]][:5]
    assert outcome.result["firewall_exercised"] is True
    fw = [c for c in outcome.result["checks"] if c["kind"] == "firewall"]
    assert len(fw) == 12 and all(c["ok"] for c in fw)  # before and after the probes, every router
    assert len([c for c in outcome.result["checks"] if c["kind"] == "tunnel"]) == 15


def _drop_nat_exemption(out: Path) -> None:
    nft = out / "acme" / paths.NFT_EL
    text = nft.read_text()
    nft.write_text(re.sub(r"\tchain nat_exempt_(prerouting|output) \{.*?\n\t\}\n", "", text, flags=re.S))
    (out / "home" / paths.fw4_snippet("srcnat")).write_text("# exemption removed by the test\n")


def test_missing_nat_exemption_fails_on_qemu(tmp_path):
    outcome = run_lab(WANS / "two", "qemu", tmp_path / "results", timeout=1200, tamper=_drop_nat_exemption)
    assert not outcome.ok
    assert red(outcome, "tunnel") == set()  # IKE is fine: only the LAN traffic is masqueraded
    assert red(outcome, "ping") == {("acme", "home"), ("home", "acme")}
    assert (tmp_path / "results/diagnostics/acme/nft-ruleset.txt").exists()
    assert "masquerade" in (tmp_path / "results/diagnostics/acme/nft-ruleset.txt").read_text()


def test_lab_up_shell_and_down_let_a_person_poke_around(tmp_path, capsys):
    from lab.run import down, shell, up
    results = tmp_path / "results"
    assert up(str(WANS / "two"), "uml", results, hours=0.2) == 0
    pid = int((tmp_path / ".results.up.pid").read_text())
    try:
        assert shell("acme", "ipsec whack --trafficstatus", results) == 0
        assert '"acme-home"' in capsys.readouterr().out
        assert shell("home-host0", "ping -c 1 -W 3 10.1.2.254", results) == 0
        assert shell("nowhere", "true", results) == 2
    finally:
        assert down(results) == 0
    assert not (tmp_path / ".results.up.pid").exists()
    assert not Path(f"/proc/{pid}").exists(), "the background lab process must be gone"
