"""The program channel (release/programs.py): program releases signed by an offline key that CI
never holds, carrying the programs and the trusted key sets named as usign -P wants them."""
from __future__ import annotations

import subprocess

import pytest

from release import cli, programs, signify

from support import sites_repo


@pytest.fixture
def repo(tmp_path, monkeypatch):
    r = sites_repo(tmp_path / "repo")
    (r / "router").mkdir()
    for name in programs.PROGRAMS:
        (r / "router" / name).write_text(f"#!/bin/sh\necho {name}\n")
    (r / "release").mkdir(exist_ok=True)
    subprocess.run(["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "."], check=True)
    subprocess.run(["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "p"],
                   check=True)
    monkeypatch.setattr(cli, "REPO", r)
    for v in programs.CI_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.chdir(r)
    return r


def test_a_program_release_is_signed_by_the_program_key_and_carries_both_key_sets(repo, capsys):
    assert cli.keygen() == 0 and cli.programs_keygen() == 0
    second = signify.generate()  # a second release key during a rotation: both are trusted
    (repo / "release/wan-release-2.pub").write_text(second.public.text("next release key"))
    assert cli.programs_release(1, "dist") == 0
    d = repo / "dist/programs-1"
    out = capsys.readouterr().out
    assert programs.digest(d) in out and "--latest=false" in out
    pkey = signify.read_public((repo / programs.PUBLIC_KEY).read_text())
    names = sorted(p.name for p in d.iterdir())
    assert f"programs-key-{programs.key_id(pkey)}.pub" in names
    assert len([n for n in names if n.startswith("release-key-")]) == 2
    assert {"fetch", "reconcile", "enrol", "PROGRAMS", "SHA256SUMS", "SHA256SUMS.sig"} <= set(names)
    assert (d / "fetch").stat().st_mode & 0o777 == 0o755
    v = subprocess.run(["signify-openbsd", "-V", "-q", "-p", str(d / f"programs-key-{programs.key_id(pkey)}.pub"),
                        "-x", str(d / "SHA256SUMS.sig"), "-m", str(d / "SHA256SUMS")], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=d).returncode == 0
    assert (repo / programs.PROGRAMS_ENV).read_text() == "WAN_PROGRAMS_SERIAL=1\n"
    # the WAN's next release names it, so routers install it
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "p1"],
                   check=True)
    assert cli.release("sites", "v1.0.0", "dist") == 0, capsys.readouterr().err
    assert "WAN_PROGRAMS=1\n" in (repo / "dist/v1.0.0/RELEASE").read_text()


@pytest.mark.parametrize("case, words", [
    ("in CI", "the program key is never used in CI"),
    ("not growing", "program releases must grow"),
    ("untrusted key", "is not one of the committed program keys"),
    ("no key", "no program signing key"),
])
def test_program_releases_are_refused_with_a_reason(repo, capsys, monkeypatch, case, words):
    cli.keygen()
    cli.programs_keygen()
    key = None
    if case == "in CI":
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
    elif case == "not growing":
        (repo / programs.PROGRAMS_ENV).write_text("WAN_PROGRAMS_SERIAL=5\n")
    elif case == "untrusted key":
        key = repo.parent / "other.sec"
        key.write_text(signify.generate().text("another key"))
    elif case == "no key":
        (repo / programs.SECRET_FILE).unlink()
    assert cli.programs_release(5, "dist", str(key) if key else None, allow_dirty=True) == 1
    assert words in capsys.readouterr().err
    assert not (repo / "dist/programs-5").exists()


def test_key_files_are_named_as_usign_looks_them_up():
    """usign -P DIR opens DIR/<key number printed with %PRIx64> (openwrt/usign main.c, verify())."""
    k = signify.PublicKey(bytes.fromhex("000a0b0c0d0e0f10"), bytes(32))
    assert programs.key_id(k) == "a0b0c0d0e0f10"


def test_every_list_of_the_router_programs_names_the_same_programs():
    """The programs travel in four lists that must agree: the program release's (release/programs.py),
    the renderer's paths on the router (render/paths.py), and the lists fetch and enrol install from
    (router/fetch, router/enrol PROGRAM_FILES); each is a file in router/. A program added to one list
    and not the others would be signed but never installed, or installed from nowhere."""
    import re

    from render import paths

    from support import REPO
    want = set(programs.PROGRAMS)
    assert set(paths.PROGRAMS.values()) == want
    assert all(p == f"etc/wan/{n}" for p, n in paths.PROGRAMS.items())
    for prog in ("fetch", "enrol"):
        m = re.search(r'^PROGRAM_FILES="([^"]*)"$', (REPO / "router" / prog).read_text(), re.M)
        assert m and set(m.group(1).split()) == want, (prog, m and m.group(1))
    assert all((REPO / "router" / n).is_file() for n in want)
    assert set(paths.OPENWRT_HOOKS.values()) <= set(paths.PROGRAMS)
