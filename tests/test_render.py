"""Rendering: golden trees, determinism, atomic writes, public keys (no secret), real-tool checks."""
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
from render.validate import load_sites

from support import REPO

GOLDEN = sorted(p.name for p in (REPO / "tests/golden").iterdir() if p.is_dir())


def _render(sites: Path, out: Path) -> None:
    write_trees(render_wan(load_sites(sites), "golden"), out)


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


def _scrubbed(tree: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    """Rendered trees (router/path -> file) as the goldens hold them: the digest of files.list in
    MANIFEST.json replaced by a name. Trees carry no router program (routers get them from a
    program release: docs/trust.md)."""
    digests = {hashlib.sha256(content).hexdigest().encode(): f"<sha256 of {paths.FILES_LIST}>".encode()
               for name, (content, _) in tree.items() if name.split("/", 1)[1] == paths.FILES_LIST}
    out = {}
    for name, (content, _) in tree.items():
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
def test_no_tree_carries_a_router_program_key_or_setting(case, tmp_path):
    """A release signing key must not reach the routers' programs or trust anchors: the trees
    (and so the bundles) hold only the WAN's own files, each listed in files.list and MANIFEST."""
    _render(Path(case), tmp_path / "out")
    routers = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert routers
    forbidden = set(paths.PROGRAMS) | {paths.TOKEN, paths.PROGRAMS_ENV, paths.FETCH_CONF, paths.RELEASE_PUB}
    for router in routers:
        root = tmp_path / "out" / router
        m = Manifest.read(root / paths.MANIFEST)
        listed = {line.split()[2] for line in (root / paths.FILES_LIST).read_text().splitlines()}
        on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {paths.MANIFEST, paths.FILES_LIST}
        assert listed == set(m.files) - {paths.FILES_LIST} == on_disk, router
        assert not on_disk & forbidden and not any(p.startswith(paths.KEYS + "/") for p in on_disk), router


def test_rendering_twice_gives_byte_identical_trees(tmp_path):
    _render(Path("sites"), tmp_path / "one")
    _render(Path("sites"), tmp_path / "two")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_every_file_is_0644(tmp_path):
    _render(Path("sites"), tmp_path / "out")
    for name, (_, mode) in _tree(tmp_path / "out").items():
        assert mode == 0o644, name


def test_each_end_signs_with_its_own_key_and_expects_the_peers(tmp_path):
    wan = load_sites("sites")
    _render(Path("sites"), tmp_path / "out")
    for t in wan.tunnels:
        for me, peer in ((t.a, t.b), (t.b, t.a)):
            conf = (tmp_path / "out" / me / paths.tunnel_conf(t.name)).read_text()
            assert "\tauthby=rsasig\n" in conf
            assert f"\tleftrsasigkey={wan.site(me).router.key.rsasigkey}\n" in conf
            assert f"\trightrsasigkey={wan.site(peer).router.key.rsasigkey}\n" in conf
    assert len({s.router.key.ckaid for s in wan.sites}) == len(wan.sites)


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


def test_no_tree_holds_a_secret_file_or_a_psk(tmp_path, capfd):
    """Releases may be public: no secrets file, no PSK, no private key in any rendered tree."""
    assert cli.render("sites", str(tmp_path / "out")) == 0
    printed = capfd.readouterr()
    assert "secrets:" not in printed.out + printed.err and "master" not in printed.out + printed.err
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            text = p.read_text()
            assert not p.name.endswith(".secrets") and p.name != "ipsec.secrets", p
            assert "PSK" not in text and "PRIVATE KEY" not in text and "authby=secret" not in text, p
    assert not any("secret" in line for line in (tmp_path / "out/acme" / paths.TUNNELS_LIST).read_text().splitlines())


def test_router_env_names_the_ckaid_the_router_must_hold(tmp_path):
    wan = load_sites("sites")
    _render(Path("sites"), tmp_path / "out")
    env = (tmp_path / "out/home" / paths.ROUTER_ENV).read_text()
    assert f"WAN_CKAID={wan.site('home').router.key.ckaid}\n" in env
    assert Manifest.read(tmp_path / "out/home" / paths.MANIFEST).key == wan.site("home").router.key.ckaid


def test_a_rollover_key_is_listed_for_the_peers_only(tmp_path):
    from support import site_key
    sites = shutil.copytree("sites", tmp_path / "sites")
    nxt = site_key("nextkey")
    text = (sites / "home.yaml").read_text().replace("lans:", f"  next_key:\n    ckaid: {nxt['ckaid']}\n"
                                                     f"    rsasigkey: {nxt['rsasigkey']}\nlans:", 1)
    (sites / "home.yaml").write_text(text)
    wan = load_sites(sites)
    _render(sites, tmp_path / "out")
    home = wan.site("home").router
    for peer in ("acme", "paris"):
        listed = (tmp_path / "out" / peer / paths.PEER_KEYS_LIST).read_text()
        assert listed == f"{home.ike_id} {nxt['ckaid']} {nxt['rsasigkey']}\n"
        m = Manifest.read(tmp_path / "out" / peer / paths.MANIFEST)
        assert m.tunnels[f"{min(peer, 'home')}-{max(peer, 'home')}"].peer_extra_keys == (nxt["ckaid"],)
    assert (tmp_path / "out/home" / paths.PEER_KEYS_LIST).read_text() == ""
    # the conns do not change: a peer accepts the next key without touching its tunnel
    _render(Path("sites"), tmp_path / "before")
    assert (tmp_path / "out/acme" / paths.tunnel_conf("acme-home")).read_bytes() == \
        (tmp_path / "before/acme" / paths.tunnel_conf("acme-home")).read_bytes()


def test_a_failed_render_leaves_the_previous_out_untouched(tmp_path):
    out = tmp_path / "out"
    _render(Path("sites"), out)
    before = _tree(out)
    broken = shutil.copytree("tests/errors/overlapping-lans/sites", tmp_path / "broken")
    assert cli.render(str(broken), str(out)) == 1
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
    path.write_text(dataclasses.replace(m, format=1).to_json())
    with pytest.raises(ManifestError, match=r"MANIFEST.json: format 1, this code reads format 2"):
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
    broken = nft.read_text().replace("snat ip to ip saddr", "snat ip too ip saddr")
    assert broken != nft.read_text()
    nft.write_text(broken)
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
