"""The lab with Docker routers: a container per site router, real pluto, real ESP.

One lab run proves both sides at once (the Docker engine in User-Mode Linux is slow to start):
three sites, where berlin's end of acme-berlin expects a wrong public key for acme. The two good tunnels must pass
every check (tunnel, pings both ways, router pings, DNS); exactly the acme-berlin cells go red.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.kernels import uml_needs_xstate_guard
from lab.run import LabRequest, run_lab
from lab.substrate import choose_docker_kernel
from render import paths

from support import REPO

pytestmark = pytest.mark.lab
THREE = REPO / "tests/lab/wans/three"
PAIR = {("acme", "berlin"), ("berlin", "acme")}


def _mismatch_acme_berlin_key(out: Path) -> None:
    from lab.keys import stranger_key
    conf = out / "berlin" / paths.tunnel_conf("acme-berlin")
    conf.write_text(re.sub(r"^\trightrsasigkey=.*$", "\trightrsasigkey=" + stranger_key().rsasigkey, conf.read_text(),
                           flags=re.M))


def red(outcome, kind: str) -> set[tuple[str, str]]:
    return {(c.src, c.dst) for c in outcome.result.checks if c.kind == kind and not c.ok}


def test_docker_routers_prove_a_three_site_wan_and_a_wrong_public_key_turns_exactly_its_cells_red(tmp_path, monkeypatch):
    if choose_docker_kernel(None) == "uml" and uml_needs_xstate_guard():
        # Measured on the project's AVX-512/AMX machines: with lab/uml_xstate.py, GLIBC_TUNABLES and
        # GODEBUG=cpu.all=off, dockerd starts inside UML (restore 4.3 s, start 2.5 s), but every
        # container start fails in `runc init` ("read init-p: connection reset by peer"): runc
        # re-executes itself for init with an environment of its own, so the workarounds do not
        # reach it and its Go runtime uses vector state UML 6.1 and 6.12 cannot carry there. Not a pass:
        # reported as xfail, and it runs where the host kernel has ESP (the host's engine) or the
        # CPU needs no guard.
        pytest.xfail("Docker routers cannot start inside User-Mode Linux 6.1/6.12 on an AVX-512/AMX host "
                     "(runc init crashes; see lab/uml_xstate.py)")
    # the good tunnels come up while the routers start; the broken one never will: bound the wait
    monkeypatch.setenv("WAN_LAB_TUNNEL_TIMEOUT", "30")
    outcome = run_lab(LabRequest(sites=THREE, results=tmp_path / "results", timeout=1200, tamper=_mismatch_acme_berlin_key,
                                 routers="docker"))
    r = outcome.result
    assert r.routers == "docker" and not r.error, r.error
    checks = r.checks
    assert not outcome.ok
    # the broken tunnel, and only it
    assert red(outcome, "tunnel") == {("acme", "berlin")}
    assert red(outcome, "ping") == PAIR
    assert red(outcome, "router_ping") == PAIR
    assert red(outcome, "dns") == PAIR
    # everything else is proven: two tunnels, pings through ESP both ways, DNS across the WAN
    good = [c for c in checks if (c.src, c.dst) not in PAIR and c.kind != "capture"]
    assert all(c.ok for c in good), [c for c in good if not c.ok]
    kinds = {(c.kind, c.src, c.dst) for c in good}
    for a, b in (("acme", "home"), ("berlin", "home")):
        assert ("tunnel", a, b) in kinds
        for x, y in ((a, b), (b, a)):
            assert {("ping", x, y), ("router_ping", x, y), ("dns", x, y)} <= kinds
    # the good tunnels carried ESP; the broken pair's pings crossed the WAN in plain text (no SA, and
    # User-Mode Linux has no nftables to drop them), so the capture cell is red too, and says why
    capture = next(c for c in checks if c.kind == "capture")
    assert not capture.ok and capture.evidence["esp_packets"] > 0 and capture.evidence["plain_icmp_between_lans"] > 0
    # the diagnostics come from inside the containers and show the cause
    diag = tmp_path / "results/diagnostics"
    assert "AUTHENTICATION_FAILED" in (diag / "berlin/pluto.log").read_text() + (diag / "acme/pluto.log").read_text()
    assert "br-lan" in (diag / "berlin/ip-a.txt").read_text()
    assert any(n.startswith("routers: 3 containers of wan-lab-router:") for n in outcome.notes), outcome.notes
    for router in ("acme", "berlin"):
        assert not re.search(r"0x[0-9a-f]{16,}", (diag / router / "ip-xfrm-state.txt").read_text())
    assert "PSK" not in r.to_json() and "PRIVATE" not in r.to_json()
    # each container authenticated with the lab key pair from its own NSS database
    assert r.keys["origin"] == "lab" and set(r.keys["ckaids"]) == {"acme", "berlin", "home"}
    # the timings name the Docker phases
    assert {"image", "engine start", "containers", "tunnels", "checks"} <= set(r.timings)
