"""Change without disruption, proven with real pluto: routers apply new trees with their own
reconcile program; tunnels the change does not touch keep their SAs and lose no packet."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lab.run import run_lab

from support import REPO

pytestmark = pytest.mark.lab


def _seven(tmp: Path) -> Path:
    d = tmp / "seven"
    shutil.copytree(REPO / "sites", d)
    text = (d / "rome.yaml").read_text()
    (d / "zurich.yaml").write_text(text.replace("name: rome", "name: zurich").replace("203.0.113.60", "203.0.113.70")
                                   .replace("10.5.0", "10.6.0").replace("rome.acme.it", "zurich.acme.ch"))
    return d


def test_adding_a_seventh_site_keeps_every_existing_sa_and_loses_no_packet(tmp_path):
    outcome = run_lab(REPO / "sites", "uml", tmp_path / "results", timeout=1200, change_to=_seven(tmp_path))
    r = outcome.result
    assert outcome.ok, r.get("error") or [c for c in r["checks"] if not c["ok"]][:5]
    # 15 tunnels proven before the change, all 21 after it
    assert len({c["evidence"]["tunnel"] for c in r["checks"] if c["kind"] == "tunnel"}) == 21
    kept = [c for c in r["checks"] if c["kind"] == "sa_kept"]
    assert len(kept) == 15 and all(c["ok"] for c in kept)
    assert r["change"]["disturbed"] == []
    assert r["change"]["stream"]["sent"] > 100 and r["change"]["stream"]["lost"] == 0
    assert all(c["ok"] for c in r["checks"] if c["kind"] == "change")


def test_removing_a_site_removes_only_its_tunnels(tmp_path):
    before = _seven(tmp_path)
    outcome = run_lab(before, "uml", tmp_path / "results", timeout=1200, change_to=REPO / "sites")
    r = outcome.result
    assert outcome.ok, r.get("error") or [c for c in r["checks"] if not c["ok"]][:5]
    assert r["change"]["disturbed"] == [] and r["change"]["unchanged_tunnels"] == 15
    after = [c for c in r["checks"] if c["kind"] == "tunnel"][21:]
    assert len(after) == 15 and not any("zurich" in c["evidence"]["tunnel"] for c in after)


def test_changing_one_sites_lan_replaces_only_that_sites_tunnels(tmp_path):
    after = tmp_path / "after"
    shutil.copytree(REPO / "sites", after)
    p = after / "oslo.yaml"
    p.write_text(p.read_text().replace("10.4.0.0/24", "10.4.0.0/23"))
    outcome = run_lab(REPO / "sites", "uml", tmp_path / "results", timeout=1200, change_to=after)
    r = outcome.result
    assert outcome.ok, r.get("error") or [c for c in r["checks"] if not c["ok"]][:5]
    assert r["change"]["unchanged_tunnels"] == 10 and r["change"]["disturbed"] == []
