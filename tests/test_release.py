"""invoke release / release.keygen: keys, refusals and what never appears in their output.
(The bundles themselves and their verification by signify-openbsd: tests/test_fetch.py.)"""
from __future__ import annotations

import json
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


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_release_refuses_a_commit_not_reachable_from_main(repo, capsys):
    cli.keygen()
    _git(repo, "branch", "-M", "main")
    assert cli.release("sites", "v1.0.0", "dist", on="main") == 0
    _git(repo, "checkout", "-q", "-b", "unreviewed")
    (repo / "sites/acme.yaml").write_text((repo / "sites/acme.yaml").read_text() + "# pushed without review\n")
    _git(repo, "commit", "-qam", "not on main")
    capsys.readouterr()
    assert cli.release("sites", "v1.1.0", "dist", on="main") == 1
    assert "is not reachable from main: only reviewed commits on main are released" in capsys.readouterr().err
    assert not (repo / "dist/v1.1.0").exists()
    assert cli.release("sites", "v1.1.0", "dist", on="origin/nothing") == 1
    assert "git does not know this ref" in capsys.readouterr().err


def _lab_result(repo: Path, **changes) -> Path:
    """A result.json shaped as lab/run.py writes it (the lab itself boots a kernel: tests/lab/);
    here only the release's checks of its provenance are under test."""
    from release.provenance import source
    result = {"ok": True, "checks": [], "source": source(repo / "sites"),
              "keys": {"origin": "lab", "why": "the lab made its own key pair per router"}}
    result.update(changes)
    p = repo.parent / "result.json"
    p.write_text(json.dumps(result))
    return p


def test_release_attaches_the_lab_result_and_the_plan_listed_in_the_signed_sums(repo, capsys):
    cli.keygen()
    assert cli.release("sites", "v1.0.0", "dist", lab_result=str(_lab_result(repo)), with_plan=True) == 0
    d = repo / "dist/v1.0.0"
    sums = (d / "SHA256SUMS").read_text()
    assert "  lab-result.json\n" in sums and "  plan.md\n" in sums
    assert verify(d, signify.read_public((repo / keys.PUBLIC_KEY).read_text())) == []
    assert json.loads((d / "lab-result.json").read_text())["source"]["revision"] == _git(repo, "rev-parse", "HEAD")
    assert "The first release" in (d / "plan.md").read_text()
    _git(repo, "tag", "v1.0.0")
    text = (repo / "sites/acme.yaml").read_text()
    assert "  server: 10.1.2.250\n" in text
    (repo / "sites/acme.yaml").write_text(text.replace("  server: 10.1.2.250\n", "  server: 10.1.2.251\n"))
    _git(repo, "commit", "-qam", "acme moves its DNS server")
    assert cli.release("sites", "v1.1.0", "dist", lab_result=str(_lab_result(repo)), with_plan=True) == 0, capsys.readouterr().err
    plan = (repo / "dist/v1.1.0/plan.md").read_text()
    assert "## WAN plan of v1.1.0: changes since `v1.0.0`" in plan and "| router |" in plan
    assert "10.1.2.251" in plan  # the moved DNS server, in the other routers' file diffs


@pytest.mark.parametrize("case, words", [
    ("failed", "the lab did not pass"),
    ("other commit", "not the released"),
    ("other sites", "the lab proved other site files"),
    ("not lab keys", "does not say that the lab used its own key pairs"),
])
def test_release_refuses_a_lab_result_of_something_else(repo, capsys, case, words):
    cli.keygen()
    src = {"revision": "0" * 40, "sites_digest": "x"}
    changes = {"failed": {"ok": False}, "other commit": {"source": {**src, "sites_digest": None}},
               "other sites": {}, "not lab keys": {"keys": {"origin": "site files"}}}[case]
    result = _lab_result(repo, **changes)
    if case == "other commit":
        from release.provenance import sites_digest
        doc = json.loads(result.read_text())
        doc["source"]["sites_digest"] = sites_digest(repo / "sites")
        result.write_text(json.dumps(doc))
    if case == "other sites":
        doc = json.loads(result.read_text())
        doc["source"]["sites_digest"] = "f" * 64
        result.write_text(json.dumps(doc))
    assert cli.release("sites", "v1.0.0", "dist", lab_result=str(result)) == 1
    assert words in capsys.readouterr().err
    assert not (repo / "dist/v1.0.0").exists()
