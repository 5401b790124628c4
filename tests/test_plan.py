"""The plan between two revisions of the sites: per router, exactly what changes and why."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from release import git
from render import cli, paths
from render.manifest import Manifest
from render.plan import as_text, plan_trees
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, enrol_programs, site_key, sites_repo


def _wan(tmp: Path, name: str, edit=None) -> dict:
    d = tmp / name
    shutil.copytree(REPO / "sites", d)
    if edit:
        edit(d)
    return render_wan(load_sites(d), name)


def _with_key(text: str, field: str, key: dict) -> str:
    """The site file's text with router.<field> set to `key` (replaced, or added under router:)."""
    block = f"  {field}:\n    ckaid: {key['ckaid']}\n    rsasigkey: {key['rsasigkey']}\n"
    if f"  {field}:\n" in text:
        return re.sub(rf"  {field}:\n    ckaid: \S+\n    rsasigkey: \S+\n", block, text)
    return text.replace("lans:", block + "lans:", 1)


def _add_zurich(d: Path) -> None:
    text = (d / "rome.yaml").read_text()
    (d / "zurich.yaml").write_text(_with_key(text, "key", site_key("zurich"))
                                   .replace("name: rome", "name: zurich").replace("203.0.113.60", "203.0.113.70")
                                   .replace("10.5.0", "10.6.0").replace("rome.acme.it", "zurich.acme.ch"))


def test_adding_a_site_adds_one_tunnel_per_router_and_changes_none(tmp_path):
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", _add_zurich))}
    assert plans["zurich"].new_router and len(plans["zurich"].added) == 6
    for r in ("acme", "berlin", "home", "oslo", "paris", "rome"):
        assert plans[r].added == [f"{r}-zurich"] and plans[r].changed == {} and plans[r].removed == []
        assert plans[r].unchanged == 5
    # EL (firewalld, the default): a restart of dnsmasq; firewalld re-reads the wan-tunnels zone (a new
    # LAN in it), and the boot unit reloads our own table now
    reloads = ["systemctl try-restart dnsmasq", "firewall-cmd --reload", "systemctl enable wan-firewall",
               "systemctl restart wan-firewall"]
    assert plans["acme"].commands == ["ipsec auto --add acme-zurich",
                                      "ipsec whack --initiate --asynchronous --name acme-zurich"] + reloads
    assert plans["rome"].commands == ["ipsec auto --add rome-zurich",
                                      "ipsec whack --initiate --asynchronous --name rome-zurich"] + reloads
    assert plans["zurich"].keys == [f"added {site_key('zurich')['ckaid']} (signs with it)"]
    assert all(plans[r].keys == [] for r in ("acme", "berlin", "home", "oslo", "paris", "rome"))


def test_removing_a_site_deletes_its_tunnels(tmp_path):
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", lambda d: (d / "oslo.yaml").unlink()))}
    assert plans["acme"].commands[:1] == ["ipsec whack --delete --name acme-oslo"]
    assert plans["home"].commands[-2:] == [f"uci batch < /{paths.FIREWALL_UCI_OPENWRT} (each line read back)", "fw4 reload"]
    # a router that leaves gets no new tree, so nothing runs on it
    assert plans["oslo"].gone_router and plans["oslo"].removed and plans["oslo"].commands == []


def test_removing_a_site_reloads_openwrt_dns_from_the_conf_dir_file(tmp_path):
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", lambda d: (d / "oslo.yaml").unlink()))}
    # home is a router-DNS site: its localservice setting is applied (and read back) before every reload
    assert plans["home"].commands[1:4] == [f"uci batch < /{paths.DHCP_UCI_OPENWRT} (each line read back)",
                                           "/etc/wan/openwrt-dns", "/etc/init.d/dnsmasq reload"]


def test_a_router_becoming_its_lans_dns_server_names_the_dnsmasq_settings(tmp_path):
    """home turns from a separate DNS host into its router's dnsmasq: the plan names what changes in dnsmasq
    (local, domain, host-record, localservice) on home, and the new forwarding target on its peers."""
    def separate_dns_host(d):
        f = d / "home.yaml"
        f.write_text(f.read_text().replace("  server: 192.168.2.82", "  server: 192.168.2.53"))
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a", separate_dns_host), _wan(tmp_path, "b"))}
    home = plans["home"].dns_settings
    assert "local: +/home.lan/" in home and "domain: +home.lan,192.168.2.0/24" in home
    assert "host-record: +nas.home.lan,192.168.2.10" in home
    assert "localservice (uci dhcp.@dnsmasq[0].localservice): +0" in home
    assert plans["acme"].dns_settings == ["server: +/home.lan/192.168.2.82@10.1.2.1, -/home.lan/192.168.2.53@10.1.2.1"]
    assert "dnsmasq local: +/home.lan/" in as_text(list(plans.values()))
    # and back: reconcile puts the router's own UCI value back, and the plan says so
    back = {p.router: p for p in plan_trees(_wan(tmp_path, "c"), _wan(tmp_path, "d", separate_dns_host))}
    assert any(d.startswith("localservice") and "-0" in d and "own value" in d and "put back" in d
               for d in back["home"].dns_settings)


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
    old, new = render_wan(load_sites(old_sites), "a"), render_wan(load_sites(new_sites), "b")
    write_trees(old, tmp_path / "old")
    write_trees(new, tmp_path / "new")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("ipsec", "systemctl", "nft", "firewall-cmd"):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (bin_ / tool).chmod(0o755)
    # OpenWrt reloads through /etc/init.d and fw4, absent here: reconcile's stand-in hooks record them
    openwrt = {"WAN_RELOAD_DNS": f"echo reload-dns >> {log}", "WAN_RELOAD_FIREWALL": f"echo reload-firewall >> {log}"}
    as_recorded = {f"uci batch < /{paths.DHCP_UCI_OPENWRT} (each line read back)": None,
                   "/etc/wan/openwrt-dns": "reload-dns", "/etc/init.d/dnsmasq reload": None, "/etc/init.d/wan enable": None,
                   f"uci batch < /{paths.FIREWALL_UCI_OPENWRT} (each line read back)": "reload-firewall", "fw4 reload": None}
    checked = 0
    for p in plan_trees(old, new):
        if p.gone_router:
            continue
        root = tmp_path / "roots" / p.router
        if not p.new_router:
            shutil.copytree(tmp_path / "old" / p.router, root)
        enrol_programs(root)
        ow = Manifest.from_json(new[p.router][paths.MANIFEST].content).platform == "openwrt"
        env = {"PATH": f"{bin_}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **(openwrt if ow else {})}
        log.write_text("")
        r = subprocess.run(["sh", str(REPO / "router/reconcile"), "--root", str(root),
                            str(tmp_path / "new" / p.router)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        calls = log.read_text().splitlines()
        if p.new_router:  # a router with nothing installed asks pluto what it has loaded first
            assert calls.pop(0) == "ipsec whack --status"
        # (`firewall-cmd --version` / `--state` are questions reconcile asks, not changes: not in the plan)
        ran = [c.replace(f"{root}/", "/") for c in calls if c not in ("firewall-cmd --state", "firewall-cmd --version")]
        want = [as_recorded.get(c, c) for c in p.commands] if ow else p.commands
        assert ran == [c for c in want if c is not None], p.router
        checked += 1
    assert checked == 6  # every router but the one that left, zurich (new) among them


def test_changing_a_lan_names_subnets_as_the_reason(tmp_path):
    def wider(d):
        p = d / "berlin.yaml"
        p.write_text(p.read_text().replace("10.3.0.0/24", "10.3.0.0/23"))
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", wider))}
    assert plans["acme"].changed == {"acme-berlin": ["subnets"]} and plans["acme"].unchanged == 4
    assert set(plans["berlin"].changed) == {"acme-berlin", "berlin-home", "berlin-oslo", "berlin-paris", "berlin-rome"}
    # the folded diff shows the configuration lines that change
    d = plans["acme"].diff
    assert "-\trightsubnet=10.3.0.0/24\n+\trightsubnet=10.3.0.0/23\n" in d and f"+++ b/{paths.tunnel_conf('acme-berlin')}" in d
    assert f"+++ b/{paths.NFT_EL}" in d


def test_a_changed_peer_address_says_so(tmp_path):
    def move(d):
        p = d / "oslo.yaml"
        p.write_text(p.read_text().replace("198.51.100.50", "198.51.100.51"))
    plans = {p.router: p for p in plan_trees(_wan(tmp_path, "a"), _wan(tmp_path, "b", move))}
    # oslo's IKE id is its public address: the id changes with it
    assert plans["acme"].changed == {"acme-oslo": ["peer address", "peer IKE id"]}


def _rollover(tmp_path: Path):
    """home's key rollover as three releases: add next_key, roll (key <- next, previous_key <- old),
    retire previous_key. Returns the four rendered revisions and the two keys."""
    old = load_sites(REPO / "sites").site("home").router.key
    new = site_key("home_next")
    old_d = {"ckaid": old.ckaid, "rsasigkey": old.rsasigkey}

    def added(d):
        (d / "home.yaml").write_text(_with_key((d / "home.yaml").read_text(), "next_key", new))

    def rolled(d):
        text = _with_key((d / "home.yaml").read_text(), "key", new)
        (d / "home.yaml").write_text(_with_key(text, "previous_key", old_d))

    def retired(d):
        (d / "home.yaml").write_text(_with_key((d / "home.yaml").read_text(), "key", new))
    return [_wan(tmp_path, "r0"), _wan(tmp_path, "r1", added), _wan(tmp_path, "r2", rolled),
            _wan(tmp_path, "r3", retired)], old.ckaid, new["ckaid"]


def test_a_key_rollover_is_named_by_fingerprint_in_three_steps(tmp_path):
    (r0, r1, r2, r3), old, new = _rollover(tmp_path)
    step1 = {p.router: p for p in plan_trees(r0, r1)}
    assert step1["home"].keys == [f"added {new} (its peers accept it beside {old})"]
    # the peers load the extra key (etc/wan/peer-keys.list) and keep their tunnel to home as it is
    assert step1["acme"].changed == {} and step1["acme"].other_files == [paths.PEER_KEYS_LIST]
    assert step1["home"].changed == {}
    step2 = {p.router: p for p in plan_trees(r1, r2)}
    assert step2["home"].keys == [f"rolled {old} -> {new} (the router signs with the new key)"]
    assert step2["acme"].changed == {"acme-home": [f"peer key {old[:12]} -> {new[:12]}"]}
    step3 = {p.router: p for p in plan_trees(r2, r3)}
    assert step3["home"].keys == [f"retired {old} (its peers refuse it from this release on)"]
    assert step3["acme"].changed == {} and step3["acme"].other_files == [paths.PEER_KEYS_LIST]
    assert not any("WARNING" in k for s in (step1, step2, step3) for k in s["home"].keys)


def test_a_key_replaced_without_overlap_is_flagged_as_a_flag_day(tmp_path):
    (r0, _, _, r3), old, new = _rollover(tmp_path)
    home = {p.router: p for p in plan_trees(r0, r3)}["home"]
    assert home.keys[0] == f"added {new} (its peers accept it beside {new})"
    assert f"rolled {old} -> {new} (the router signs with the new key)" in home.keys
    assert any(k.startswith("WARNING: rolled without an overlap") for k in home.keys)
    assert home.keys[-1] == f"retired {old} (its peers refuse it from this release on)"


def test_plan_task_reads_the_base_from_git(tmp_path, capsys, monkeypatch):
    repo = sites_repo(tmp_path / "repo")
    _add_zurich(repo / "sites")
    with git.sites_at("HEAD", repo / "sites") as base:
        assert (base / "rome.yaml").exists() and not (base / "zurich.yaml").exists()
        assert cli.plan(str(repo / "sites"), base, "HEAD", "markdown") == 0
        out = capsys.readouterr().out
        assert "```mermaid" in out and "==>|acme-zurich|" in out and "| zurich (new) |" in out
        assert f"added {site_key('zurich')['ckaid']}" in out
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
    r = subprocess.run([sys.executable, "-m", "invoke", "render", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for tree in (tmp_path / "out").iterdir():
        assert Manifest.read(tree / paths.MANIFEST).source_revision in (head, head + "+dirty")
