"""The plan between two revisions of the sites: per router, exactly what changes and why."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from release import git
from render import cli
from render.plan import plan_trees
from render.render import render_wan
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
    reloads = ["reload dnsmasq (systemctl try-restart dnsmasq)", "reload the firewall (nft -f /etc/nftables/wan.nft)"]
    assert plans["acme"].commands == ["ipsec whack --rereadsecrets", "ipsec auto --add acme-zurich",
                                      "ipsec whack --initiate --asynchronous --name acme-zurich"] + reloads
    assert plans["rome"].commands == ["ipsec whack --rereadsecrets", "ipsec auto --add rome-zurich",
                                      "ipsec whack --initiate --asynchronous --name rome-zurich"] + reloads


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
    assert "-\trightsubnet=10.3.0.0/24\n+\trightsubnet=10.3.0.0/23\n" in d and "+++ b/etc/ipsec.d/acme-berlin.conf" in d
    assert "+++ b/etc/nftables/wan.nft" in d and "PSK" not in d and ".secrets" not in d


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
