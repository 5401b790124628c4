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


class _Whack:
    def __init__(self, text):
        self.text = text

    def whack(self, *args):
        import subprocess
        return subprocess.CompletedProcess(args, 0, self.text, "")


def test_the_keys_pluto_holds_for_an_id_are_read_from_listpubkeys():
    from lab.scenarios.rotation import _passed, held_keys, keyid
    # the layout of show_pubkey (programs/pluto/keys.c v4.10:750-775): a line with " Key KEYID", then the id
    text = ("\nList of Public Keys:\n\n"
            "Nov 27 23:50:01 2026,  3072 RSA Key AwEAAbs+J (has private key), until --- -- --:--:-- ---- ok\n"
            "       ID_IPV4_ADDR '192.0.2.40'\n"
            "Nov 27 23:50:02 2026,  3072 RSA Key AwEAAcX9z (no private key), until --- -- --:--:-- ---- ok\n"
            "       ID_IPV4_ADDR '192.0.2.10'\n"
            "Nov 27 23:50:03 2026,  3072 RSA Key AwEAAdq1F (no private key), until --- -- --:--:-- ---- ok\n"
            "       ID_IPV4_ADDR '192.0.2.40'\n")
    assert held_keys(_Whack(text), "192.0.2.40") == ["AwEAAbs+J", "AwEAAdq1F"]
    assert held_keys(_Whack(text), "192.0.2.99") == []
    assert keyid("0sAwEAAbs+JTqvTZhSSOChTUBm") == "AwEAAbs+J"
    # pluto's debug line for the key that verified a signature (keys.c v4.10:282)
    log = "|   trying '192.0.2.40' aka *AwEAAbs+J issued by CA '%any'\n|   'AwEAAbs+J' passed\n|   'AwEAAxxxx' passed\n"
    assert _passed(log, {"AwEAAbs+J", "AwEAAdq1F"}) == ["AwEAAbs+J"]
