"""router/enrol with the real certutil and ipsec newhostkey/showhostkey, under BusyBox ash and bash:
the key is made once in the router's NSS database, never replaced, and the lines it prints are a
valid `key:` (or `next_key:`) of a site file; only public material is printed."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from render.hostkey import ckaid_of

from support import REPO

ENROL = REPO / "router" / "enrol"
SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
pytestmark = pytest.mark.skipif(not shutil.which("ipsec") or not shutil.which("certutil"), reason="needs libreswan and nss tools")


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_enrol_makes_the_key_once_and_prints_site_file_lines(tmp_path, shell):
    nss = tmp_path / "nss"

    def enrol(*args):
        r = subprocess.run(shell + [str(ENROL), "--nssdir", str(nss), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout), r.stdout + r.stderr
    first, text = enrol()
    key = first["key"]
    assert ckaid_of(key["rsasigkey"]) == key["ckaid"]
    assert (nss / "cert9.db").exists() and "PRIVATE" not in text
    again, text = enrol()
    assert again == first and "kept" in text  # never replaced
    nxt, _ = enrol("--new-key")
    assert set(nxt) == {"next_key"} and nxt["next_key"]["ckaid"] != key["ckaid"]
    assert ckaid_of(nxt["next_key"]["rsasigkey"]) == nxt["next_key"]["ckaid"]
    listed = subprocess.run(["ipsec", "showhostkey", "--nssdir", str(nss), "--list"], capture_output=True, text=True).stdout
    assert key["ckaid"] in listed and nxt["next_key"]["ckaid"] in listed


def test_enrol_refuses_unknown_arguments(tmp_path):
    r = subprocess.run(["sh", str(ENROL), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
