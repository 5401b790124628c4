"""The rotation lab's host side (lab/scenarios/rotation.py prepare): no kernel boots."""
from __future__ import annotations

import stat

import pytest

from lab.contracts import LabPlan
from lab.run import LabRequest, LabRequestError, _prepare
from lab.scenarios import LabError

from support import REPO

WANS = REPO / "tests/lab/wans"


def test_the_rotation_lab_enrols_from_a_signed_release_and_keeps_its_signing_key_private(tmp_path):
    _prepare(LabRequest(sites=WANS / "three", results=tmp_path / "r", scenarios=(("rotation", {}),)), "uml", 4)
    plan = LabPlan.read(tmp_path / "r" / "plan.json")
    (call,) = plan.scenarios
    data = call.data
    # berlin initiates berlin-home and responds to acme-berlin: both roles of the rotated router
    assert call.name == "rotation" and data["rotated"] == "berlin"
    assert plan.serve_release and set(plan.install) == {"acme", "berlin", "home"}
    dist = tmp_path / "r" / "releases"
    assert (dist / "v1.0.0" / "SHA256SUMS.sig").exists() and (dist / "v1.0.0" / "berlin.tar.gz").exists()
    # the lab signs releases 1-3 in the kernel, with the key the routers trust: it waits in a root-only
    # file (the lab deletes it once used), never in plan.json
    secret = tmp_path / "r" / "rotation.pickle"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "seed" not in (tmp_path / "r" / "plan.json").read_text()


def test_a_wan_without_a_router_in_both_roles_is_refused_with_the_fix(tmp_path):
    with pytest.raises((LabError, LabRequestError), match="initiates one tunnel and responds to another"):
        _prepare(LabRequest(sites=WANS / "two", results=tmp_path / "r", scenarios=(("rotation", {}),)), "uml", 4)
