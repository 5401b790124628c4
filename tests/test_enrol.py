"""router/enrol with the real certutil and ipsec newhostkey/showhostkey, under BusyBox ash and bash:
the key is made once in the router's NSS database, never replaced, and the lines it prints are a
valid `key:` (or `next_key:`) of a site file; only public material is printed. With --install it
checks a program release (a kit) completely, then installs the programs, the trusted key sets and
the fetch settings; a token comes on standard input, never as an argument."""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
import yaml

from release import programs
from render.hostkey import ckaid_of

from support import REPO, program_kit

ENROL = REPO / "router" / "enrol"
SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
pytestmark = pytest.mark.skipif(not shutil.which("ipsec") or not shutil.which("certutil"), reason="needs libreswan and nss tools")


def run_enrol(shell, root, *args, stdin=None, rc=0):
    r = subprocess.run(shell + [str(ENROL), "--root", str(root), "--nssdir", str(root / "nss"), *args],
                       capture_output=True, text=True, timeout=120, input=stdin)
    assert r.returncode == rc, r.stderr
    return yaml.safe_load(r.stdout) if rc == 0 else None, r.stdout + r.stderr


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_enrol_makes_the_key_once_and_prints_site_file_lines(tmp_path, shell):
    nss = tmp_path / "nss"
    first, text = run_enrol(shell, tmp_path)
    key = first["key"]
    assert ckaid_of(key["rsasigkey"]) == key["ckaid"]
    assert (nss / "cert9.db").exists() and "PRIVATE" not in text
    again, text = run_enrol(shell, tmp_path)
    assert again == first and "kept" in text  # never replaced
    nxt, _ = run_enrol(shell, tmp_path, "--new-key")
    assert set(nxt) == {"next_key"} and nxt["next_key"]["ckaid"] != key["ckaid"]
    assert ckaid_of(nxt["next_key"]["rsasigkey"]) == nxt["next_key"]["ckaid"]
    listed = subprocess.run(["ipsec", "showhostkey", "--nssdir", str(nss), "--list"], capture_output=True, text=True).stdout
    assert key["ckaid"] in listed and nxt["next_key"]["ckaid"] in listed
    # two keys, no --new-key: the key in use and the rollover's next key, as the site file holds them
    both, _ = run_enrol(shell, tmp_path)
    assert both == {"key": key, "next_key": nxt["next_key"]}
    # once the installed release names the new key (the roll), that one is the key
    (tmp_path / "etc/wan/router.env").write_text(f"WAN_ROUTER=acme\nWAN_CKAID={nxt['next_key']['ckaid']}\n")
    rolled, _ = run_enrol(shell, tmp_path)
    assert rolled == {"key": nxt["next_key"]}
    # the order enrol recorded wins over NSS's listing order
    (tmp_path / "etc/wan/router.env").unlink()
    made = tmp_path / "etc/wan/enrolled-keys"
    assert made.read_text().split() == [key["ckaid"], nxt["next_key"]["ckaid"]]
    made.write_text(f"{nxt['next_key']['ckaid']}\n{key['ckaid']}\n")
    swapped, _ = run_enrol(shell, tmp_path)
    assert swapped == {"key": nxt["next_key"], "next_key": key}


def test_enrol_refuses_unknown_arguments(tmp_path):
    r = subprocess.run(["sh", str(ENROL), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


@pytest.fixture
def kit(tmp_path):
    """A program release of this checkout's programs, signed by a throw-away program key."""
    return program_kit(tmp_path)


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_enrol_installs_a_checked_kit(tmp_path, shell, kit):
    d, pkey, rkey = kit
    root = tmp_path / "router"
    token = "ghp_enrolTEST0123456789"
    digest = hashlib.sha256((d / "SHA256SUMS").read_bytes()).hexdigest()
    out, text = run_enrol(shell, root, "--install", str(d), "--router", "acme", "--url", "https://api.github.com/repos/o/r",
                          "--api", "github", "--expect", digest, "--min-serial", "1002000", "--token-stdin", stdin=token + "\n")
    assert set(out) == {"key"} and token not in text
    lib = root / "etc/wan"
    for name in programs.PROGRAMS:
        assert (lib / name).read_bytes() == (REPO / "router" / name).read_bytes()
        assert (lib / name).stat().st_mode & 0o7777 == 0o755
    assert sorted(p.name for p in (lib / "keys/release").iterdir()) == [programs.key_id(rkey.public)]
    assert sorted(p.name for p in (lib / "keys/programs").iterdir()) == [programs.key_id(pkey.public)]
    assert (lib / "programs.env").read_text() == "WAN_PROGRAMS_SERIAL=3\n"
    conf = (lib / "fetch.conf").read_text()
    assert "WAN_RELEASE_URL=https://api.github.com/repos/o/r\n" in conf and "WAN_RELEASE_API=github\n" in conf
    assert "WAN_MIN_SERIAL=1002000\n" in conf and "WAN_ROUTER=acme\n" in conf and token not in conf
    assert (lib / "token").read_text() == token + "\n" and (lib / "token").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("case, words", [
    ("tampered", "does not match its SHA256SUMS"),
    ("other digest", "do not trust this copy"),
    ("no router", "--install needs --router NAME"),
    ("not a kit", "is not a program release"),
])
def test_enrol_refuses_a_bad_kit_and_installs_nothing(tmp_path, kit, case, words):
    d, _, _ = kit
    root = tmp_path / "router"
    digest = hashlib.sha256((d / "SHA256SUMS").read_bytes()).hexdigest()
    args = ["--install", str(d), "--router", "acme", "--url", "https://example.org/o/r/releases", "--expect", digest]
    if case == "tampered":
        (d / "reconcile").write_text((d / "reconcile").read_text() + "\nrm -rf /\n")
    elif case == "other digest":
        args[-1] = "0" * 64
    elif case == "no router":
        del args[2:4]
    elif case == "not a kit":
        (d / "PROGRAMS").unlink()
    _, text = run_enrol(["sh"], root, *args, rc=2)
    assert words in text and "nothing was installed" in text
    assert not (root / "etc/wan/fetch").exists() and not (root / "nss").exists()
