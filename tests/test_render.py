"""Rendering: golden trees, determinism, atomic writes, secrets handling, real-tool checks."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from render import cli, paths
from render.check import check_out
from render.manifest import Manifest, ManifestError
from render.render import render_wan, write_trees
from render.secrets import MasterKey
from render.validate import load_sites

from support import GOLDEN_KEY, REPO

GOLDEN = sorted(p.name for p in (REPO / "tests/golden").iterdir() if p.is_dir())


def _render(sites: Path, out: Path, key=GOLDEN_KEY) -> None:
    write_trees(render_wan(load_sites(sites), MasterKey(key, "lab"), "golden"), out)


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


def _scrubbed(tree: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    """Rendered trees (router/path -> file) as the goldens hold them: without the router programs
    (router/ is their one copy, checked below), their digests in MANIFEST.json and files.list
    replaced by a name, and so the digest of files.list in MANIFEST.json: a change to a program
    touches no golden. files.list itself is compared (scrubbed) like any file."""
    digests = {hashlib.sha256((REPO / "router" / name).read_bytes()).hexdigest().encode(): f"<sha256 of router/{name}>".encode()
               for name in paths.PROGRAMS.values()}
    digests |= {hashlib.sha256(content).hexdigest().encode(): f"<sha256 of {paths.FILES_LIST}>".encode()
                for name, (content, _) in tree.items() if name.split("/", 1)[1] == paths.FILES_LIST}
    out = {}
    for name, (content, _) in tree.items():
        if name.split("/", 1)[1] in paths.PROGRAMS:
            continue
        for digest, label in digests.items():
            content = content.replace(digest, label)
        out[name] = content
    return out


@pytest.mark.parametrize("case", GOLDEN)
def test_rendered_tree_matches_golden(case, tmp_path, update_goldens):
    case_dir = REPO / "tests/golden" / case
    out = tmp_path / "out"
    _render(Path("tests/golden") / case / "sites", out)
    expected = case_dir / "expected"
    got = _scrubbed(_tree(out))
    if update_goldens:
        shutil.rmtree(expected, ignore_errors=True)
        for name, content in got.items():
            (expected / name).parent.mkdir(parents=True, exist_ok=True)
            (expected / name).write_bytes(content)
    want = {k: v[0] for k, v in _tree(expected).items()}
    assert sorted(got) == sorted(want), "the set of rendered files changed (pytest --update-goldens if intended)"
    for name in got:
        assert got[name] == want[name], f"{name} differs from the golden (pytest --update-goldens if intended)"


@pytest.mark.parametrize("case", ["sites"] + [f"tests/golden/{c}/sites" for c in GOLDEN])
def test_every_tree_carries_the_router_programs_byte_for_byte(case, tmp_path):
    _render(Path(case), tmp_path / "out")
    routers = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert routers
    for router in routers:
        root = tmp_path / "out" / router
        m = Manifest.read(root / paths.MANIFEST)
        listed = {line.split()[2]: line.split()[:2] for line in (root / paths.FILES_LIST).read_text().splitlines()}
        for path, name in paths.PROGRAMS.items():
            program = (REPO / "router" / name).read_bytes()
            digest = hashlib.sha256(program).hexdigest()
            assert (root / path).read_bytes() == program, f"{router}: {path} is not router/{name}"
            assert stat.S_IMODE((root / path).stat().st_mode) == 0o755
            assert m.files[path].sha256 == digest and m.files[path].mode == "0755", f"{router}: MANIFEST entry of {path}"
            assert listed[path] == [digest, "0755"], f"{router}: files.list entry of {path}"


def test_rendering_twice_gives_byte_identical_trees(tmp_path):
    _render(Path("sites"), tmp_path / "one")
    _render(Path("sites"), tmp_path / "two")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_secrets_files_are_0600_programs_0755_and_everything_else_0644(tmp_path):
    _render(Path("sites"), tmp_path / "out")
    for name, (_, mode) in _tree(tmp_path / "out").items():
        want = 0o600 if name.endswith("secrets") else 0o755 if name.endswith((paths.RECONCILE, paths.FETCH)) else 0o644
        assert mode == want, name


def test_both_ends_of_a_tunnel_share_its_psk_and_tunnels_differ(tmp_path):
    _render(Path("sites"), tmp_path / "out")
    a = (tmp_path / "out/acme" / paths.tunnel_secrets("acme-paris")).read_text().split('PSK "')[1]
    b = (tmp_path / "out/paris" / paths.tunnel_secrets("acme-paris")).read_text().split('PSK "')[1]
    c = (tmp_path / "out/acme" / paths.tunnel_secrets("acme-home")).read_text().split('PSK "')[1]
    assert a == b and a != c


def test_exactly_one_end_of_each_tunnel_initiates(tmp_path):
    wan = load_sites("sites")
    _render(Path("sites"), tmp_path / "out")
    for t in wan.tunnels:
        autos = sorted((tmp_path / "out" / s / paths.tunnel_conf(t.name)).read_text().split("auto=")[1].strip()
                       for s in (t.a, t.b))
        assert autos == ["add", "start"], t.name


def test_spokes_initiate_towards_hubs():
    wan = load_sites("tests/golden/hub-v5/sites")
    for t in wan.tunnels:
        if (t.a in wan.hubs) != (t.b in wan.hubs):
            assert t.initiator not in wan.hubs, t.name


def test_psks_never_reach_stdout_stderr_or_manifest(tmp_path, capfd):
    key = MasterKey(b"k" * 32, "env")
    rc = cli.render("sites", str(tmp_path / "out"), key=key)
    assert rc == 0
    printed = capfd.readouterr()
    wan = load_sites("sites")
    psks = [key.psk(t.name) for t in wan.tunnels]
    texts = [printed.out, printed.err, repr(key)]
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file() and not p.name.endswith(".secrets"):
            texts.append(p.read_text())
    for psk in psks:
        assert not any(psk in t for t in texts)
    # and they are in the secrets files, so the scan above could have found them
    assert psks[0] in (tmp_path / "out/acme" / paths.tunnel_secrets(wan.tunnels[0].name)).read_text()


def test_missing_master_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WAN_PSK_MASTER", raising=False)
    monkeypatch.setattr(cli, "REPO", tmp_path)
    rc = cli.render("sites", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 1 and "WAN_PSK_MASTER" in err and "--lab-secrets" in err
    assert not (tmp_path / "out").exists()


def test_master_key_from_environment_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_PSK_MASTER", "m" * 40)
    assert cli.render("sites", str(tmp_path / "out")) == 0
    assert Manifest.read(tmp_path / "out/acme" / paths.MANIFEST).secrets == "master"
    expected = MasterKey(b"m" * 40, "env").psk("acme-paris")
    assert expected in (tmp_path / "out/acme" / paths.tunnel_secrets("acme-paris")).read_text()


def test_a_failed_render_leaves_the_previous_out_untouched(tmp_path):
    out = tmp_path / "out"
    _render(Path("sites"), out)
    before = _tree(out)
    broken = shutil.copytree("tests/errors/overlapping-lans/sites", tmp_path / "broken")
    assert cli.render(str(broken), str(out), lab_secrets=True) == 1
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_manifest_lists_every_file_with_its_digest_and_mode(tmp_path):
    _render(Path("sites"), tmp_path / "out")
    root = tmp_path / "out/paris"
    m = Manifest.read(root / paths.MANIFEST)
    on_disk = {k for k in _tree(root) if k != paths.MANIFEST}
    assert set(m.files) == on_disk
    for name, entry in m.files.items():
        assert entry.sha256 == hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert entry.mode == f"{stat.S_IMODE((root / name).stat().st_mode):04o}"
    assert m.tunnels["acme-paris"].conns == ("acme-paris/1x0", "acme-paris/2x0")
    assert m.source_revision == "golden"


def test_manifest_reads_back_what_it_wrote_and_refuses_anything_else(tmp_path):
    _render(Path("sites"), tmp_path / "out")
    path = tmp_path / "out/home" / paths.MANIFEST
    text = path.read_text()
    m = Manifest.from_json(text)
    assert m.to_json() == text and m.platform == "openwrt" and m.tunnels["home-paris"].initiator
    path.write_text(dataclasses.replace(m, format=2).to_json())
    with pytest.raises(ManifestError, match=r"MANIFEST.json: format 2, this code reads format 1"):
        Manifest.read(path)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="MANIFEST.json: not a MANIFEST.json this code wrote"):
        Manifest.read(path)
    with pytest.raises(ManifestError, match="not a MANIFEST.json this code wrote"):
        Manifest.from_json("[]")


@pytest.mark.parametrize("case", GOLDEN)
def test_rendered_files_pass_the_real_tools(case, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("nft -c runs in a new network namespace: needs root")
    _render(Path("tests/golden") / case / "sites", tmp_path / "out")
    failed = [str(r) for r in check_out(tmp_path / "out") if not r.ok]
    assert failed == []


def test_the_real_tools_catch_a_broken_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("nft -c runs in a new network namespace: needs root")
    _render(Path("sites"), tmp_path / "out")
    conf = tmp_path / "out/acme" / paths.tunnel_conf("acme-paris")
    conf.write_text(conf.read_text().replace("leftsubnet=10.1.2.0/24", "leftsubnet=10.1.2.0/33"))
    nft = tmp_path / "out/acme" / paths.NFT_EL
    nft.write_text(nft.read_text().replace("notrack", "notrak"))
    dns = tmp_path / "out/acme" / paths.DNSMASQ_EL
    dns.write_text(dns.read_text() + "no-such-option\n")
    failed = {(r.router, r.tool) for r in check_out(tmp_path / "out") if not r.ok}
    assert failed == {("acme", "libreswan"), ("acme", "nft"), ("acme", "dnsmasq")}


def test_graph_draws_every_site_and_tunnel():
    from render.graph import mermaid
    wan = load_sites("sites")
    text = mermaid(wan)
    assert text.startswith("flowchart LR")
    assert all(f"|{t.name}|" in text for t in wan.tunnels)
    assert all(f'{s.name}["' in text for s in wan.sites)


def test_tasks_run_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "invoke", "validate", "--sites", "tests/errors/overlapping-lans/sites"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert "overlaps" in r.stderr and "Traceback" not in r.stderr
