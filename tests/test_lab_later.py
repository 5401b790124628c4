"""The host side of the lab's "peers that apply later" scenario (lab/scenarios/later.py), which
boots nothing: the release it builds really changes both ends of the changed tunnels and leaves the
others byte-identical, the moments are reproduced by their seed, and the outage arithmetic.
The lab proof itself (real pluto, ESP) is tests/lab/test_later_lab.py."""
from __future__ import annotations

import tarfile

import pytest

from lab.contracts import LabPlan
from lab.proc import LabError
from lab.run import LabRequest, _prepare
from lab.scenarios.later import HEALTH_TIMEOUT, outage
from lab.scenarios.later import moments as draw

from support import REPO

FOUR = REPO / "tests/lab/wans/four"


def _peers(bundle) -> dict[str, tuple[str, str]]:
    with tarfile.open(bundle) as t:
        m = next(x for x in t.getmembers() if x.name.endswith("peers.list"))
        text = t.extractfile(m).read().decode()
    return {ln.split()[0]: tuple(ln.split()[1:]) for ln in text.splitlines() if ln.strip()}


def test_release_two_changes_both_ends_of_homes_tunnels_and_nothing_else(tmp_path):
    _prepare(LabRequest(sites=FOUR, results=tmp_path / "r", scenarios=(("later", {"seed": 7}),)), "uml", 4)
    plan = LabPlan.read(tmp_path / "r" / "plan.json")
    d = plan.scenarios[0].data
    assert [p["tunnel"] for p in d["changed"]] == ["acme-home", "berlin-home", "home-oslo"]
    assert d["unchanged"] == ["acme-berlin", "acme-oslo", "berlin-oslo"] and d["stream"]["tunnel"] == "acme-berlin"
    rel = tmp_path / "r" / "releases"
    for router in ("acme", "berlin", "home", "oslo"):
        one, two = _peers(rel / "v1.0.0" / f"{router}.tar.gz"), _peers(rel / "v2.0.0" / f"{router}.tar.gz")
        for tunnel in one:
            own_changed, peer_changed = one[tunnel][0] != two[tunnel][0], one[tunnel][1] != two[tunnel][1]
            # what fetch's pending_only reads: a changed tunnel changed at BOTH ends, the others at neither
            assert (own_changed, peer_changed) == (("home" in tunnel,) * 2), (router, tunnel)
    # every router starts from its enrolment only, with the lab's short health timeout
    for router, tree in plan.install.items():
        conf = (tmp_path / "r" / "enrol" / router / "etc/wan/fetch.conf").read_text()
        assert tree.endswith(f"enrol/{router}") and f"WAN_HEALTH_TIMEOUT={HEALTH_TIMEOUT}\n" in conf


def test_the_seed_reproduces_the_moments_and_one_changed_pair_fetches_far_apart():
    names, pairs = ["acme", "berlin", "home", "oslo"], [("acme", "home"), ("berlin", "home"), ("home", "oslo")]
    for seed in range(50):
        m = draw(seed, names, pairs, HEALTH_TIMEOUT)
        assert m == draw(seed, names, pairs, HEALTH_TIMEOUT)
        at = dict(m)
        assert sorted(at) == names and all(0 <= s <= 4 * HEALTH_TIMEOUT for s in at.values())
        assert max(abs(at[a] - at[b]) for a, b in pairs) >= 2 * HEALTH_TIMEOUT + 8
    assert draw(1, names, pairs, HEALTH_TIMEOUT) != draw(2, names, pairs, HEALTH_TIMEOUT)


def test_the_outage_runs_from_the_last_answer_before_it_broke_to_the_first_after_the_second_end():
    rows = [(t / 2, ok) for t, ok in enumerate([True] * 6 + [False] * 20 + [True] * 4)]  # down at 3.0, back at 13.0
    o = outage(rows, first=2.0, second=9.0)
    assert o == {"seconds": 10.5, "broke": True, "probes_while_one_end": 12, "answered_while_one_end": 0}
    # a tunnel that answered while only one end had applied: the change did not break it
    flaky = [(t / 2, ok) for t, ok in enumerate([True] * 6 + [False, True] * 10 + [True] * 4)]
    assert outage(flaky, first=2.0, second=9.0)["answered_while_one_end"] > 0
    assert outage([(t / 2, True) for t in range(30)], first=2.0, second=9.0)["broke"] is False
    assert outage([(t / 2, t < 6) for t in range(30)], first=2.0, second=9.0)["seconds"] is None


def test_a_wan_too_small_for_the_proof_is_refused(tmp_path):
    with pytest.raises(LabError, match="use a WAN of at least four sites"):
        _prepare(LabRequest(sites=REPO / "tests/lab/wans/two", results=tmp_path / "r", scenarios=(("later", {}),)), "uml", 4)


def test_a_seed_that_is_not_a_number_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_LAB_LATER_SEED", "soon")
    with pytest.raises(LabError, match="the seed must be a whole number .* not 'soon'"):
        _prepare(LabRequest(sites=FOUR, results=tmp_path / "r", scenarios=(("later", {}),)), "uml", 4)
