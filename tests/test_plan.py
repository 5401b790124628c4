"""The plan between two revisions of the sites: per router, exactly what changes and why."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from release import git
from render import cli, paths
from render.manifest import Manifest
from render.plan import plan_trees
from render.render import render_wan, write_trees
from render.secrets import MasterKey
from render.validate import load_sites

from support import GOLDEN_KEY, REPO, sites_repo

KEY = MasterKey(GOLDEN_KEY, "lab")


def _wan(tmp: Path, name: str, edit=None) -> dict:
    d = tmp / name
    shutil.copytree(REPO / "sites", d)
    if edit:
        edit(d)
    return render_wan(load_sites(d), KEY, name)


def _add_zurich(d: Path) -> None:
    text = (d / "rome.yaml").read_text()
    (d / "zurich.yaml").write_text(text.replace("name: rome", "name: zurich").replace("203.0.113.60", "203.0.113.70")
                                   .replace("10.5.0", "10.6.0").replace("rome.acme.it", "zurich.acme.ch"))


def test_adding_a_site_adds_one_tunnel_per_router_and_changes_none(tmp_path):
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", _add_zurich))}
    assert plans["zurich"].new_router and len(plans["zurich"].added) == 6
    for r in ("acme", "berlin", "home", "oslo", "paris", "rome"):
        assert plans[r].added == [f"{r}-zurich"] and plans[r].changed == {} and plans[r].removed == []
        assert plans[r].unchanged == 5
    reloads = ["systemctl try-restart dnsmasq", "nft -f /" + paths.NFT_EL]  # EL: a restart of dnsmasq, our own table
    assert plans["acme"].commands == ["ipsec whack --rereadsecrets", "ipsec auto --add acme-zurich",
                                      "ipsec whack --initiate --asynchronous --name acme-zurich"] + reloads
    assert plans["rome"].commands == ["ipsec whack --rereadsecrets", "ipsec auto --add rome-zurich",
                                      "ipsec whack --initiate --asynchronous --name rome-zurich"] + reloads


def test_removing_a_site_deletes_its_tunnels_and_rereads_the_secrets_after_their_files_are_gone(tmp_path):
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", lambda d: (d / "oslo.yaml").unlink()))}
    # reconcile rereads once for the changed secrets, and again once the removed tunnel's secrets file is gone
    assert plans["acme"].commands[:3] == ["ipsec whack --rereadsecrets", "ipsec whack --delete --name acme-oslo",
                                          "ipsec whack --rereadsecrets"]
    # OpenWrt: the UCI batch, then the platform's own reloads
    assert plans["home"].commands[3:] == [f"sh -c uci batch < '/{paths.DHCP_UCI_OPENWRT}'", "/etc/init.d/dnsmasq reload",
                                          f"sh -c uci batch < '/{paths.FIREWALL_UCI_OPENWRT}'", "fw4 reload"]
    # a router that leaves gets no new tree, so nothing runs on it
    assert plans["oslo"].gone_router and plans["oslo"].removed and plans["oslo"].commands == []


def test_the_plan_commands_are_what_reconcile_then_runs(tmp_path):
    """The plan's commands for each router against what router/reconcile really runs (with a
    recording `ipsec`, as tests/test_reconcile.py: pluto cannot hold tunnels on this kernel) when
    it applies the new tree over the old one."""
    old_sites, new_sites = tmp_path / "old-sites", tmp_path / "new-sites"
    shutil.copytree(REPO / "sites", old_sites)
    shutil.copytree(REPO / "sites", new_sites)
    (new_sites / "oslo.yaml").unlink()
    _add_zurich(new_sites)
    p = new_sites / "berlin.yaml"
    p.write_text(p.read_text().replace("10.3.0.0/24", "10.3.0.0/23"))
    old, new = render_wan(load_sites(old_sites), KEY, "a"), render_wan(load_sites(new_sites), KEY, "b")
    write_trees(old, tmp_path / "old")
    write_trees(new, tmp_path / "new")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("ipsec", "systemctl", "nft"):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (bin_ / tool).chmod(0o755)
    # OpenWrt reloads through /etc/init.d and fw4, absent here: reconcile's stand-in hooks record them
    openwrt = {"WAN_RELOAD_DNS": f"echo reload-dns >> {log}", "WAN_RELOAD_FIREWALL": f"echo reload-firewall >> {log}"}
    as_recorded = {f"sh -c uci batch < '/{paths.DHCP_UCI_OPENWRT}'": "reload-dns", "/etc/init.d/dnsmasq reload": None,
                   f"sh -c uci batch < '/{paths.FIREWALL_UCI_OPENWRT}'": "reload-firewall", "fw4 reload": None}
    checked = 0
    for p in plan_trees(old, new):
        if p.gone_router:
            continue
        root = tmp_path / "roots" / p.router
        if not p.new_router:
            shutil.copytree(tmp_path / "old" / p.router, root)
        else:
            root.mkdir(parents=True)
        ow = Manifest.from_json(new[p.router][paths.MANIFEST].content).platform == "openwrt"
        env = {"PATH": f"{bin_}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **(openwrt if ow else {})}
        log.write_text("")
        r = subprocess.run(["sh", str(tmp_path / "new" / p.router / paths.RECONCILE), "--root", str(root),
                            str(tmp_path / "new" / p.router)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        calls = log.read_text().splitlines()
        if p.new_router:  # a router with nothing installed asks pluto what it has loaded first
            assert calls.pop(0) == "ipsec whack --status"
        ran = [c.replace(f"{root}/", "/") for c in calls]
        want = [as_recorded.get(c, c) for c in p.commands] if ow else p.commands
        assert ran == [c for c in want if c is not None], p.router
        checked += 1
    assert checked == 6  # every router but the one that left, zurich (new) among them


def test_changing_a_lan_names_subnets_as_the_reason_and_no_secret_is_shown(tmp_path):
    def wider(d):
        p = d / "berlin.yaml"
        p.write_text(p.read_text().replace("10.3.0.0/24", "10.3.0.0/23"))
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", wider))}
    assert plans["acme"].changed == {"acme-berlin": ["subnets"]} and plans["acme"].unchanged == 4
    assert set(plans["berlin"].changed) == {"acme-berlin", "berlin-home", "berlin-oslo", "berlin-paris", "berlin-rome"}
    assert "ipsec whack --rereadsecrets" not in plans["acme"].commands  # the secret did not change
    # the folded diff shows the configuration lines that change, and never a secret
    d = plans["acme"].diff
    assert "-\trightsubnet=10.3.0.0/24\n+\trightsubnet=10.3.0.0/23\n" in d and f"+++ b/{paths.tunnel_conf('acme-berlin')}" in d
    assert f"+++ b/{paths.NFT_EL}" in d and "PSK" not in d and ".secrets" not in d


def test_a_changed_peer_address_changes_the_secret_and_says_so(tmp_path):
    def move(d):
        p = d / "oslo.yaml"
        p.write_text(p.read_text().replace("198.51.100.50", "198.51.100.51"))
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", move))}
    assert plans["acme"].changed == {"acme-oslo": ["peer address", "secret"]}


def test_plan_task_reads_the_base_from_git(tmp_path, capsys, monkeypatch):
    repo = sites_repo(tmp_path / "repo")
    _add_zurich(repo / "sites")
    with git.sites_at("HEAD", repo / "sites") as base:
        assert (base / "rome.yaml").exists() and not (base / "zurich.yaml").exists()
        assert cli.plan(str(repo / "sites"), base, "HEAD", "markdown") == 0
        out = capsys.readouterr().out
        assert "```mermaid" in out and "==>|acme-zurich|" in out and "| zurich (new) |" in out
        assert "PSK" not in out
        assert cli.plan(str(repo / "sites"), base, "HEAD", "json") == 0
        assert '"added"' in capsys.readouterr().out


def test_plan_against_an_unknown_revision_says_so(tmp_path):
    repo = sites_repo(tmp_path / "repo")
    with pytest.raises(git.GitError, match="cannot read the sites at no-such-ref"):
        with git.sites_at("no-such-ref", repo / "sites"):
            pass


def test_plan_task_refuses_an_unknown_base_in_one_sentence():
    r = subprocess.run([sys.executable, "-m", "invoke", "plan", "--base", "no-such-ref"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "cannot read the sites at no-such-ref" in r.stderr and "Traceback" not in r.stderr


def test_render_task_stamps_the_sites_revision_into_every_manifest(tmp_path):
    r = subprocess.run([sys.executable, "-m", "invoke", "render", "--lab-secrets", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for tree in (tmp_path / "out").iterdir():
        assert Manifest.read(tree / paths.MANIFEST).source_revision in (head, head + "+dirty")
