"""invoke release / release.keygen: keys, refusals and what never appears in their output.
(The bundles themselves and their verification by signify-openbsd: tests/test_fetch.py.)"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from release import cli, keys, signify
from release.bundle import verify

from support import sites_repo


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository of our own: the example sites committed, REPO pointing at it."""
    r = sites_repo(tmp_path / "repo")
    monkeypatch.setattr(cli, "REPO", r)
    monkeypatch.delenv("WAN_PSK_MASTER", raising=False)  # read by nothing: a release's one secret is its signing key
    monkeypatch.delenv("WAN_RELEASE_KEY", raising=False)
    monkeypatch.chdir(r)
    return r


def test_keygen_writes_a_pair_and_refuses_to_replace_it(repo, capsys):
    assert cli.keygen() == 0
    pub, sec = repo / keys.PUBLIC_KEY, repo / keys.SECRET_FILE
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    key = signify.read_secret(sec.read_text())
    assert signify.read_public(pub.read_text()) == key.public
    assert sec.read_text().splitlines()[1] not in capsys.readouterr().out
    assert cli.keygen() == 1
    assert "a release key exists already" in capsys.readouterr().err
    assert signify.read_secret(sec.read_text()) == key  # untouched


def test_release_builds_signed_bundles_and_prints_no_secret(repo, capsys):
    cli.keygen()
    assert cli.release("sites", "v1.2.3", "dist") == 0
    out, err = capsys.readouterr()
    assert "released v1.2.3 (serial 1002003" in out and "verified with signify-openbsd" in out
    d = repo / "dist/v1.2.3"
    assert verify(d, signify.read_public((repo / keys.PUBLIC_KEY).read_text())) == []
    assert "WAN_REVISION=" in (d / "RELEASE").read_text() and "+dirty" not in (d / "RELEASE").read_text()
    secret_line = (repo / keys.SECRET_FILE).read_text().splitlines()[1]
    assert secret_line not in out + err


def test_a_release_holds_no_secret_only_the_routers_public_keys(repo):
    """Bundles may be public: no secrets file, no PSK, no private key; each router's conns carry
    the public keys of the site files."""
    import tarfile

    from render.validate import load_sites
    cli.keygen()
    assert cli.release("sites", "v1.0.0", "dist") == 0
    wan = load_sites(repo / "sites")
    for s in wan.sites:
        with tarfile.open(repo / f"dist/v1.0.0/{s.name}.tar.gz") as tar:
            names = tar.getnames()
            assert not any(n.endswith(".secrets") for n in names), names
            for m in tar.getmembers():
                if m.isfile():
                    text = tar.extractfile(m).read().decode()
                    assert "PSK" not in text and "PRIVATE" not in text and "authby=secret" not in text, m.name
                    assert m.mode & 0o077 in (0o044, 0o055), m.name  # nothing private: world-readable as installed
            conf = tar.extractfile(next(n for n in names if n.endswith(".conf") and "/ipsec.d/" in n)).read().decode()
            assert f"leftrsasigkey={s.router.key.rsasigkey}" in conf


@pytest.mark.parametrize("case, words", [
    ("bad tag", "'1.2' is not a release tag; use vMAJOR.MINOR.PATCH"),
    ("no signing key", "no release signing key: set WAN_RELEASE_KEY"),
    ("other signing key", "is not the one in release/wan-release.pub"),
    ("dirty", "uncommitted changes"),
    ("older tag", "older than v2.0.0, released already"),
])
def test_release_refuses_with_a_reason_and_writes_nothing(repo, capsys, monkeypatch, case, words):
    cli.keygen()
    tag = "v1.0.0"
    if case == "bad tag":
        tag = "1.2"
    elif case == "no signing key":
        os.unlink(repo / keys.SECRET_FILE)
    elif case == "other signing key":
        monkeypatch.setenv("WAN_RELEASE_KEY", signify.generate().text("another key"))
    elif case == "dirty":
        (repo / "sites/acme.yaml").write_text((repo / "sites/acme.yaml").read_text() + "\n# edited\n")
    elif case == "older tag":
        subprocess.run(["git", "-C", str(repo), "tag", "v2.0.0"], check=True)
    assert cli.release("sites", tag, "dist") == 1
    assert words in capsys.readouterr().err
    assert not (repo / "dist").exists() or not any((repo / "dist").iterdir())


def test_release_task_explains_itself_and_wants_a_tag():
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "invoke", "release", "--help"], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0 and "--tag" in r.stdout and "not a release tag" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "invoke", "release"], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 2 and "--tag vMAJOR.MINOR.PATCH is required" in r.stderr and "Traceback" not in r.stderr
