"""The router-side reconcile program: what it installs and which ipsec commands it runs.

Here `ipsec` is a stand-in that records its arguments (pluto cannot hold tunnels on this
machine's kernel); tests/lab/test_reconcile_lab.py runs the same program against real pluto.
Every case runs under BusyBox ash (OpenWrt's shell) and bash (RHEL's).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from render import paths
from render.render import render_wan, write_trees
from render.secrets import MasterKey
from render.validate import load_sites

from support import GOLDEN_KEY, REPO

SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
RECONCILE = REPO / "router" / "reconcile"


@pytest.fixture(params=[" ".join(s) for s in SHELLS])
def shell(request) -> list[str]:
    return request.param.split()


def _render(sites: Path, out: Path) -> None:
    write_trees(render_wan(load_sites(sites), MasterKey(GOLDEN_KEY, "lab"), "test"), out)


def _sites(tmp: Path, names: list[str], change=None) -> Path:
    d = tmp / f"sites-{len(list(tmp.glob('sites-*')))}"
    d.mkdir()
    shutil.copy(REPO / "sites/wan.yaml", d)
    for n in names:
        text = (REPO / "sites" / f"{n}.yaml").read_text()
        (d / f"{n}.yaml").write_text(change(n, text) if change else text)
    return d


class Router:
    """A router's / in a directory, with a recording `ipsec` on PATH."""

    def __init__(self, tmp: Path, shell: list[str]):
        self.root = tmp / "root"
        self.root.mkdir()
        self.log = tmp / "calls.log"
        self.log.write_text("")
        bin_ = tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(f'#!/bin/sh\necho "ipsec $*" >> {self.log}\n')
        (bin_ / "ipsec").chmod(0o755)
        self.env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp),
                    "WAN_RELOAD_DNS": f"echo reload-dns >> {self.log}", "WAN_RELOAD_FIREWALL": f"echo reload-firewall >> {self.log}"}
        self.shell = shell

    def reconcile(self, staged: Path, *args: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return subprocess.run(self.shell + [str(RECONCILE), "--root", str(self.root), *args, str(staged)],
                              capture_output=True, text=True, env=self.env, timeout=60)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def files(self) -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(self.root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
                for p in self.root.rglob("*") if p.is_file() and "previous" not in p.parts and p.parts[len(self.root.parts)] != "var"}


def _expected(tree: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(tree)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in tree.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}


def _installed(tmp: Path, shell: list[str], before: list[str], after: list[str], router: str) -> tuple[Router, Path, Path]:
    """A router with the `before` WAN's tree applied, and the `after` WAN rendered beside it."""
    b, a = tmp / "before", tmp / "after"
    _render(_sites(tmp, before), b)
    _render(_sites(tmp, after), a)
    r = Router(tmp, shell)
    assert r.reconcile(b / router).returncode == 0
    return r, b, a


def test_first_run_installs_everything_and_brings_up_only_the_initiated_tunnels(tmp_path, shell):
    out = tmp_path / "out"
    _render(_sites(tmp_path, ["acme", "home", "paris"]), out)
    r = Router(tmp_path, shell)
    res = r.reconcile(out / "home")
    assert res.returncode == 0, res.stderr
    assert r.files() == _expected(out / "home")
    calls = r.calls()
    assert calls.count("ipsec whack --rereadsecrets") == 1
    assert "ipsec auto --add acme-home" in calls and "ipsec auto --add home-paris" in calls
    # home initiates towards paris (name order), acme initiates towards home
    assert "ipsec whack --initiate --asynchronous --name home-paris" in calls
    assert not any("--initiate" in c and "acme-home" in c for c in calls)
    assert "reload-dns" in calls and "reload-firewall" in calls


def test_a_second_run_does_nothing(tmp_path, shell):
    out = tmp_path / "out"
    _render(_sites(tmp_path, ["acme", "home", "paris"]), out)
    r = Router(tmp_path, shell)
    assert r.reconcile(out / "acme").returncode == 0
    res = r.reconcile(out / "acme")
    assert res.returncode == 0 and "nothing to do" in res.stderr
    assert r.calls() == []


def test_adding_a_site_adds_only_its_tunnel_and_touches_no_other(tmp_path, shell):
    r, _, after = _installed(tmp_path, shell, ["acme", "home", "paris"], ["acme", "home", "paris", "rome"], "acme")
    res = r.reconcile(after / "acme")
    assert res.returncode == 0, res.stderr
    calls = r.calls()
    assert [c for c in calls if c.startswith("ipsec") and "rereadsecrets" not in c] == [
        "ipsec auto --add acme-rome", "ipsec whack --initiate --asynchronous --name acme-rome"]
    assert "ipsec whack --rereadsecrets" in calls
    assert r.files() == _expected(after / "acme")


def test_removing_a_site_deletes_only_its_tunnel_and_files(tmp_path, shell):
    r, _, after = _installed(tmp_path, shell, ["acme", "home", "paris"], ["acme", "paris"], "paris")
    res = r.reconcile(after / "paris")
    assert res.returncode == 0, res.stderr
    assert [c for c in r.calls() if "--delete" in c or "--add" in c] == ["ipsec whack --delete --name home-paris"]
    assert not (r.root / "etc/ipsec.d/home-paris.conf").exists()
    assert not (r.root / "etc/ipsec.d/home-paris.secrets").exists()
    assert r.files() == _expected(after / "paris")


def test_changing_a_lan_replaces_only_that_sites_tunnels(tmp_path, shell):
    before, after = tmp_path / "before", tmp_path / "after"
    _render(_sites(tmp_path, ["acme", "home", "paris"]), before)
    _render(_sites(tmp_path, ["acme", "home", "paris"],
                   lambda n, t: t.replace("192.168.2.0/24", "192.168.2.0/23") if n == "home" else t), after)
    r = Router(tmp_path, shell)
    assert r.reconcile(before / "acme").returncode == 0
    assert r.reconcile(after / "acme").returncode == 0
    calls = [c for c in r.calls() if c.startswith("ipsec") and "rereadsecrets" not in c]
    assert calls == ["ipsec whack --delete --name acme-home", "ipsec auto --add acme-home",
                     "ipsec whack --initiate --asynchronous --name acme-home"]


def test_dry_run_changes_nothing(tmp_path, shell):
    out = tmp_path / "out"
    _render(_sites(tmp_path, ["acme", "home"]), out)
    r = Router(tmp_path, shell)
    res = r.reconcile(out / "acme", "--dry-run")
    assert res.returncode == 0
    assert "would run: ipsec auto --add acme-home" in res.stdout
    # only a read-only look at what pluto has loaded (no installed tree yet)
    assert r.files() == {} and r.calls() == ["ipsec whack --status"]


def test_a_tampered_staged_tree_is_refused_and_nothing_changes(tmp_path, shell):
    r, _, after = _installed(tmp_path, shell, ["acme", "home"], ["acme", "home", "paris"], "acme")
    installed = r.files()
    conf = after / "acme" / paths.tunnel_conf("acme-paris")
    os.chmod(conf, 0o644)
    conf.write_text(conf.read_text().replace("auto=start", "auto=start\n\tleftupdown=/tmp/evil"))
    res = r.reconcile(after / "acme")
    assert res.returncode == 2 and "tampered" in res.stderr
    assert r.files() == installed and r.calls() == []


def test_a_failing_step_exits_nonzero_keeps_the_old_state_and_the_previous_tree(tmp_path, shell):
    r, _, after = _installed(tmp_path, shell, ["acme", "home"], ["acme", "home", "paris"], "acme")
    old_list = (r.root / paths.TUNNELS_LIST).read_text()
    (tmp_path / "bin/ipsec").write_text(f'#!/bin/sh\necho "ipsec $*" >> {r.log}\ncase "$*" in *--add*) exit 3;; esac\n')
    res = r.reconcile(after / "acme")
    assert res.returncode == 1 and "FAILED" in res.stderr and "ipsec auto --add acme-paris" in res.stderr
    assert (r.root / paths.TUNNELS_LIST).read_text() == old_list  # the next run retries
    assert (r.root / "etc/wan/previous.new/etc/ipsec.d/acme-home.conf").exists()


@pytest.mark.parametrize("line, words", [
    ("0" * 64 + " 0755 ../evil", "../evil is not a plain relative path"),
    ("0" * 64 + " 4755 etc/wan/x", "mode 4755 of etc/wan/x is above 0755"),
    ("0" * 64 + " 0644 /etc/passwd", "/etc/passwd is not a plain relative path"),
])
def test_unsafe_lists_are_refused_by_the_same_check_fetch_runs(tmp_path, shell, line, words):
    out = tmp_path / "out"
    _render(_sites(tmp_path, ["acme", "home"]), out)
    fl = out / "acme/etc/wan/files.list"
    os.chmod(fl, 0o644)
    fl.write_text(fl.read_text() + line + "\n")
    r = Router(tmp_path, shell)
    for args in (["--verify"], []):
        res = r.reconcile(out / "acme", *args)
        assert res.returncode == 2 and words in res.stderr, res.stderr
    assert r.files() == {} and r.calls() == []


def test_a_signal_stops_reconcile_and_the_next_run_redoes_what_it_began(tmp_path, shell):
    """SIGTERM after a changed tunnel was deleted and before it was added again: reconcile stops
    (exit 143, the POSIX sh trap exits instead of carrying on), keeps its journal and the old lists;
    the next run deletes and adds that tunnel again, rereads the secrets and writes the lists."""
    before, after = tmp_path / "before", tmp_path / "after"
    _render(_sites(tmp_path, ["acme", "home", "paris"]), before)
    _render(_sites(tmp_path, ["acme", "home", "paris"],
                   lambda n, t: t.replace("192.168.2.0/24", "192.168.2.0/23") if n == "home" else t), after)
    r = Router(tmp_path, shell)
    assert r.reconcile(before / "acme").returncode == 0
    old_list = (r.root / paths.TUNNELS_LIST).read_text()
    (r.root / "etc/wan/test-hooks").write_text("")
    r.env.update(WAN_TEST_STOP_AT="reconcile:replace-deleted", WAN_TEST_SIGNAL="TERM")
    res = r.reconcile(after / "acme")
    assert res.returncode == 143 and "stopped by SIGTERM at step replace-deleted" in res.stderr, res.stderr
    assert "applied" not in res.stderr.split("WAN-TEST")[1]
    assert r.calls()[-1] == "ipsec whack --delete --name acme-home"  # nothing ran after the signal
    assert (r.root / paths.TUNNELS_LIST).read_text() == old_list
    assert "tunnel acme-home" in (r.root / "etc/wan/reconcile.journal").read_text()
    del r.env["WAN_TEST_STOP_AT"]
    res = r.reconcile(after / "acme")
    assert res.returncode == 0, res.stderr
    assert [c for c in r.calls() if c.startswith("ipsec")] == [
        "ipsec whack --rereadsecrets", "ipsec whack --delete --name acme-home", "ipsec auto --add acme-home",
        "ipsec whack --initiate --asynchronous --name acme-home"]
    assert not (r.root / "etc/wan/reconcile.journal").exists()
    assert r.files() == {k: v for k, v in _expected(after / "acme").items()} | {"etc/wan/test-hooks": (b"", 0o644)}
    assert r.reconcile(after / "acme").stderr.count("nothing to do") == 1


def test_a_second_reconcile_while_one_runs_is_refused(tmp_path, shell):
    out = tmp_path / "out"
    _render(_sites(tmp_path, ["acme", "home"]), out)
    r = Router(tmp_path, shell)
    (r.root / "var/run").mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(r.root / "var/run/wan-acme.lock"), "sleep", "30"], start_new_session=True)
    try:
        import time
        time.sleep(0.3)
        res = r.reconcile(out / "acme")
        assert res.returncode == 2 and "holds" in res.stderr and r.calls() == [], res.stderr
    finally:
        os.killpg(holder.pid, 9)  # flock and the sleep that holds the lock
        holder.wait()
    assert r.reconcile(out / "acme").returncode == 0


@pytest.mark.parametrize("program", ["fetch", "reconcile"])
def test_help_is_the_whole_header_and_nothing_else(program):
    text = subprocess.run(["sh", str(REPO / "router" / program), "--help"], capture_output=True, text=True).stdout
    header = (REPO / "router" / program).read_text().split("\nset -u\n")[0].splitlines()[1:]
    assert text.splitlines() == header
