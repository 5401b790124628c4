"""The router-side reconcile program: what it installs and which ipsec commands it runs.

Here `ipsec` is a stand-in that records its arguments (pluto cannot hold tunnels on this
machine's kernel); tests/lab/test_reconcile_lab.py runs the same program against real pluto.
Every case runs under BusyBox ash (OpenWrt's shell) and bash (RHEL's).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from render import paths
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, enrol_programs, site_key

SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
RECONCILE = REPO / "router" / "reconcile"


@pytest.fixture(params=[" ".join(s) for s in SHELLS])
def shell(request) -> list[str]:
    return request.param.split()


def _render(sites: Path, out: Path) -> None:
    write_trees(render_wan(load_sites(sites), "test"), out)


def _sites(tmp: Path, names: list[str], change=None) -> Path:
    d = tmp / f"sites-{len(list(tmp.glob('sites-*')))}"
    d.mkdir()
    shutil.copy(REPO / "sites/wan.yaml", d)
    for n in names:
        text = (REPO / "sites" / f"{n}.yaml").read_text()
        (d / f"{n}.yaml").write_text(change(n, text) if change else text)
    return d


def _static_home(n: str, text: str) -> str:
    """The example's home with a fixed public address again (it is dynamic: it initiates every tunnel),
    for tests about what the other end of a tunnel that it initiates does."""
    if n != "home":
        return text
    text = re.sub(r"  public_address: dynamic.*\n", "  public_address: 198.51.100.20\n", text)
    return re.sub(r"  ike_id: .*\n", "", text)


class Router:
    """A router's / in a directory, with a recording `ipsec` on PATH."""

    def __init__(self, tmp: Path, shell: list[str]):
        self.root = enrol_programs(tmp / "root")
        self.log = tmp / "calls.log"
        self.log.write_text("")
        bin_ = tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(f'#!/bin/sh\necho "ipsec $*" >> {self.log}\n')
        (bin_ / "ipsec").chmod(0o755)
        self.env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp),
                    "WAN_RELOAD_DNS": f"echo reload-dns >> {self.log}",
                    "WAN_RELOAD_FIREWALL": f"echo reload-firewall >> {self.log}"}
        self.shell = shell

    def reconcile(self, staged: Path, *args: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return subprocess.run(self.shell + [str(RECONCILE), "--root", str(self.root), *args, str(staged)],
                              capture_output=True, text=True, env=self.env, timeout=60)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def files(self) -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(self.root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
                for p in self.root.rglob("*")
                if p.is_file() and "previous" not in p.parts and p.parts[len(self.root.parts)] != "var"
                and str(p.relative_to(self.root)) not in ENROLLED}


ENROLLED = {*paths.PROGRAMS, *paths.OPENWRT_HOOKS}  # what enrol put there, not reconcile


def _expected(tree: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(tree)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in tree.rglob("*") if p.is_file() and p.name != paths.MANIFEST}


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
    assert not any("rereadsecrets" in c for c in calls)  # no secrets: raw RSA keys in the conns
    assert "ipsec auto --add acme-home" in calls and "ipsec auto --add home-paris" in calls
    # home's address is dynamic: it initiates every tunnel of its own (towards paris it would by name order too)
    assert "ipsec whack --initiate --asynchronous --name home-paris" in calls
    assert "ipsec whack --initiate --asynchronous --name acme-home" in calls
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
    assert r.files() == _expected(after / "acme")


def test_removing_a_site_deletes_only_its_tunnel_and_files(tmp_path, shell):
    r, _, after = _installed(tmp_path, shell, ["acme", "home", "paris"], ["acme", "paris"], "paris")
    res = r.reconcile(after / "paris")
    assert res.returncode == 0, res.stderr
    assert [c for c in r.calls() if "--delete" in c or "--add" in c] == ["ipsec whack --delete --name home-paris"]
    assert not (r.root / "etc/ipsec.d/home-paris.conf").exists()
    assert r.files() == _expected(after / "paris")


def test_changing_a_lan_replaces_only_that_sites_tunnels(tmp_path, shell):
    before, after = tmp_path / "before", tmp_path / "after"
    _render(_sites(tmp_path, ["acme", "home", "paris"], _static_home), before)
    _render(_sites(tmp_path, ["acme", "home", "paris"],
                   lambda n, t: _static_home(n, t).replace("192.168.2.0/24", "192.168.2.0/23")), after)
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


def _rollover_trees(tmp: Path) -> list[Path]:
    """acme's rendered tree at the four points of home's key rollover (docs/keys.md): 0 before,
    1 next_key added, 2 rolled (previous_key kept), 3 previous key retired."""
    old = re.search(r"ckaid: (\S+)\n\s+rsasigkey: (\S+)", (REPO / "sites/home.yaml").read_text()).groups()
    new = site_key("home_next")

    def block(field, ckaid, key):
        return f"  {field}:\n    ckaid: {ckaid}\n    rsasigkey: {key}\n"

    def home(text, *blocks):
        text = re.sub(r"  key:\n    ckaid: \S+\n    rsasigkey: \S+\n", "", text)
        return text.replace("lans:", "".join(blocks) + "lans:", 1)
    steps = [
        lambda n, t: t,
        lambda n, t: home(t, block("key", *old), block("next_key", new["ckaid"], new["rsasigkey"])) if n == "home" else t,
        lambda n, t: home(t, block("key", new["ckaid"], new["rsasigkey"]), block("previous_key", *old)) if n == "home" else t,
        lambda n, t: home(t, block("key", new["ckaid"], new["rsasigkey"])) if n == "home" else t,
    ]
    outs = []
    for i, change in enumerate(steps):
        outs.append(tmp / f"out{i}")
        _render(_sites(tmp, ["acme", "home", "paris"], lambda n, t, change=change: change(n, _static_home(n, t))), outs[-1])
    return [o / "acme" for o in outs]


def test_a_key_rollover_adds_and_retires_the_extra_key_without_touching_the_tunnel(tmp_path, shell):
    """Step 1 (home gets next_key): acme adds it beside the conn's key with whack --addkey and keeps
    its tunnel. Step 2 (home rolls): acme re-adds acme-home (rightrsasigkey changed), then adds the
    previous key again (the add replaced pluto's keys for home's id). Step 3 (retired): acme puts
    the conn's key back alone (whack --keyid without --addkey replaces) and keeps its tunnel."""
    old = re.search(r"ckaid: (\S+)\n\s+rsasigkey: (\S+)", (REPO / "sites/home.yaml").read_text()).groups()
    new = site_key("home_next")  # the same key _rollover_trees gives home (tests/data/site-keys.json)
    trees = _rollover_trees(tmp_path)
    r = Router(tmp_path, shell)
    assert r.reconcile(trees[0]).returncode == 0
    ike = "198.51.100.20"  # home's IKE id: its public address
    res = r.reconcile(trees[1])
    assert res.returncode == 0, res.stderr
    added = f"ipsec whack --keyid {ike} --addkey --pubkeyrsa {new['rsasigkey']}"
    assert [c for c in r.calls() if c.startswith("ipsec")] == [added]
    res = r.reconcile(trees[2])
    assert res.returncode == 0, res.stderr
    assert [c for c in r.calls() if c.startswith("ipsec")] == [
        "ipsec whack --delete --name acme-home", "ipsec auto --add acme-home",
        f"ipsec whack --keyid {ike} --addkey --pubkeyrsa {old[1]}",
        "ipsec whack --initiate --asynchronous --name acme-home"]  # after the key: home may still sign with it
    res = r.reconcile(trees[3])
    assert res.returncode == 0, res.stderr
    assert [c for c in r.calls() if c.startswith("ipsec")] == [f"ipsec whack --keyid {ike} --pubkeyrsa {new['rsasigkey']}"]
    assert r.files() == _expected(trees[3])
    assert r.reconcile(trees[3]).returncode == 0 and r.calls() == []


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
    the next run deletes and adds that tunnel again (then the peers' keys) and writes the lists."""
    before, after = tmp_path / "before", tmp_path / "after"
    _render(_sites(tmp_path, ["acme", "home", "paris"], _static_home), before)
    _render(_sites(tmp_path, ["acme", "home", "paris"],
                   lambda n, t: _static_home(n, t).replace("192.168.2.0/24", "192.168.2.0/23")), after)
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
        "ipsec whack --delete --name acme-home", "ipsec auto --add acme-home",
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


def test_a_key_rollover_killed_at_any_step_is_finished_by_the_next_run(tmp_path, shell):
    """Each step of the rollover (next key added, rolled, previous retired, and back from the roll)
    with reconcile stopped by kill -9 or SIGTERM at every step it names: the next run leaves the
    stand-in pluto (tests/support.py: it keeps the conf each conn was added from and the public keys
    per IKE id, as pluto does) holding exactly the keys the files on disk name for home's IKE id:
    the conn's and peer-keys.list's, a retired key gone even when the killed run had already
    installed the new list. Real pluto is not started here (a pluto start per kill point); the
    three rollover steps run against real pluto in the lab's key rollover."""
    import concurrent.futures

    from support import STUB_IPSEC, pluto_expected_keys
    trees = _rollover_trees(tmp_path)
    steps = list(dict.fromkeys(re.findall(r"^\s*step ([a-z0-9-]+)\s*$", RECONCILE.read_text(), re.M)))
    assert "peer-keys" in steps and steps.index("add-new") < steps.index("peer-keys") < steps.index("initiate")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "ipsec").write_text(STUB_IPSEC)
    (bin_ / "ipsec").chmod(0o755)

    def run(d: Path, staged: Path, **extra) -> subprocess.CompletedProcess:
        env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(d), "STUB_LOG": str(d / "calls.log"),
               "STUB_STATE": str(d / "pluto"), "STUB_ROOT": str(d / "root"), "STUB_PEER": str(d / "peer"),
               "WAN_RELOAD_DNS": "true", "WAN_RELOAD_FIREWALL": "true", **extra}
        (d / "calls.log").write_text("")
        return subprocess.run(shell + [str(RECONCILE), "--root", str(d / "root"), str(staged)],
                              capture_output=True, text=True, env=env, timeout=60, start_new_session=True)

    templates = {}
    for a, b in ((0, 1), (1, 2), (2, 3), (2, 1)):
        t = tmp_path / f"from{a}to{b}"
        enrol_programs(t / "root")
        for i in range(a + 1):
            assert run(t, trees[i]).returncode == 0  # the rollover as it happened up to `a`
        (t / "root/etc/wan/test-hooks").write_text("")
        templates[a, b] = t

    def one(i: int, a: int, b: int, step: str, sig: str) -> str | None:
        d = tmp_path / f"point-{i}"
        shutil.copytree(templates[a, b], d, symlinks=True)
        killed = run(d, trees[b], WAN_TEST_STOP_AT=f"reconcile:{step}", WAN_TEST_SIGNAL=sig)
        if f"WAN-TEST: at reconcile:{step}" not in killed.stderr:
            shutil.rmtree(d)
            return "not reached"
        res = run(d, trees[b])
        root, state = d / "root", d / "pluto"
        try:
            assert res.returncode == 0, f"rc {res.returncode}"
            for conf in (root / "etc/ipsec.d").glob("*.conf"):
                assert (state / "loaded" / conf.stem).read_text().strip() == hashlib.sha256(conf.read_bytes()).hexdigest(), \
                    f"{conf.stem}: pluto has an old conf"
            for ike_id, keys in pluto_expected_keys(root).items():
                held = set((state / "keys" / ike_id).read_text().split()) if (state / "keys" / ike_id).exists() else set()
                assert held == keys, f"{ike_id}: pluto holds {len(held)} keys, the files on disk name {len(keys)}"
            assert not (root / "etc/wan/reconcile.journal").exists(), "journal left"
            again = run(d, trees[b])
            assert again.returncode == 0 and "nothing to do" in again.stderr
            assert (d / "calls.log").read_text() == "", "a further run ran ipsec"
        except AssertionError as e:
            return f"{a}->{b} at {step} ({sig}): {e}\n--- killed:\n{killed.stderr}\n--- next:\n{res.stderr}"
        shutil.rmtree(d)
        return None

    points = [(a, b, s, sig) for (a, b) in templates for s in steps for sig in ("KILL", "TERM")]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: one(*p), [(i, *p) for i, p in enumerate(points)]))
    reached = {p[2] for p, r in zip(points, results, strict=True) if r != "not reached"}
    failures = [r for r in results if r not in (None, "not reached")]
    print(f"\n{' '.join(shell)}: {len(points)} kill points over 4 rollover steps, {len(reached)} of {len(steps)} steps reached, "
          f"{len([r for r in results if r is None])} converged")
    assert "peer-keys" in reached and "initiate" in reached and "install-files" in reached, reached
    assert not failures, f"{len(failures)} of {len(points)} kill points did not converge:\n" + "\n\n".join(failures[:3])


@pytest.mark.parametrize("case", ["sites", "tests/golden/mesh-example/sites", "tests/golden/hub-v5/sites"])
def test_every_rendered_path_is_on_the_allowlist(case, tmp_path, shell):
    """reconcile --verify accepts every tree the renderer writes (EL and OpenWrt, both DNS modes)."""
    _render(Path(case), tmp_path / "out")
    for tree in sorted((tmp_path / "out").iterdir()):
        r = subprocess.run(shell + [str(RECONCILE), "--verify", str(tree)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (tree.name, r.stderr)


@pytest.mark.parametrize("path, mode, words", [
    ("etc/wan/reconcile", "0755", "is not one of the WAN's own files"),
    ("etc/wan/fetch", "0755", "is not one of the WAN's own files"),
    ("etc/wan/enrol", "0755", "is not one of the WAN's own files"),
    ("etc/wan/keys/release/1234abcd", "0644", "is not one of the WAN's own files"),
    ("etc/wan/keys/programs/1234abcd", "0644", "is not one of the WAN's own files"),
    ("etc/wan/release.pub", "0644", "is not one of the WAN's own files"),
    ("etc/wan/fetch.conf", "0644", "is not one of the WAN's own files"),
    ("etc/wan/token", "0600", "is not one of the WAN's own files"),
    ("etc/wan/programs.env", "0644", "is not one of the WAN's own files"),
    ("etc/crontabs/root", "0644", "is not one of the WAN's own files"),
    ("etc/ipsec.d/../../root/.ssh/authorized_keys", "0644", "is not a plain relative path"),
    ("etc/ipsec.d/x.secrets", "0600", "is not one of the WAN's own files"),
    ("etc/ipsec.d/acme-home.conf", "4755", "is above 0755 or sets setuid"),
])
def test_a_bundle_outside_the_wan_files_is_refused_before_anything_changes(path, mode, words, tmp_path, shell):
    """A validly signed bundle made with a stolen release key still cannot install a program, a
    key or a setting: the installed reconcile refuses the tree whole, and changes nothing."""
    import hashlib
    _render(Path("tests/lab/wans/two"), tmp_path / "out")
    tree = tmp_path / "out/acme"
    content = b"#!/bin/sh\nid > /tmp/owned\n"
    target = tree / path
    if ".." not in path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    listed = (tree / paths.FILES_LIST).read_text()
    if path == "etc/ipsec.d/acme-home.conf":
        listed = listed.replace(" 0644 etc/ipsec.d/acme-home.conf", " 4755 etc/ipsec.d/acme-home.conf")
    else:
        listed += f"{hashlib.sha256(content).hexdigest()} {mode} {path}\n"
    (tree / paths.FILES_LIST).write_text(listed)
    router = Router(tmp_path, shell)
    r = router.reconcile(tree)
    assert r.returncode == 2 and words in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert router.files() == {} and router.calls() == []
    r = subprocess.run(shell + [str(RECONCILE), "--verify", str(tree)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr




_WATCH = """import sys, pathlib, xml.etree.ElementTree as ET
root = pathlib.Path(sys.argv[1]) / "etc/firewalld"
zones = {p.stem for p in (root / "zones").glob("*.xml")} | {"ANY", "HOST"}
for pol in sorted((root / "policies").glob("*.xml")):
    for el in ET.parse(pol).getroot():
        if el.tag in ("ingress-zone", "egress-zone") and el.get("name") not in zones:
            print(f"after `{sys.argv[2].split('/')[-1]}`: {pol.name} names {el.get('name')}, not on disk")
"""


def test_a_firewalld_router_never_has_a_policy_without_its_zone_at_any_kill_point(tmp_path):
    """acme (EL, firewalld) on its first install and when it leaves firewalld for the nftables path
    (every zone and policy obsolete): after every single file reconcile moves into place or removes
    (`mv` and `rm` stand-ins check the disk after the real command: a power cut may fall between any
    two files), and at every named step under kill -9, the disk never holds a policy that names a
    zone it does not have (firewalld would fall back to its stock configuration at the next start);
    the next run converges on the new tree. Under bash only: BusyBox ash runs its own mv and rm
    applets, not the stand-ins on PATH (the order of the files is the program's, not the shell's)."""
    shell = ["bash"]
    first = tmp_path / "first"
    _render(_sites(tmp_path, ["acme", "home", "paris"]), first)
    nft = tmp_path / "nft"
    _render(_sites(tmp_path, ["acme", "home", "paris"],
                   lambda n, t: t.replace("  libreswan: 4\n", "  libreswan: 4\n  firewall: nftables\n", 1)
                   if n == "acme" else t), nft)
    assert list((first / "acme/etc/firewalld/policies").glob("*.xml")), "acme is not on the firewalld path"
    assert not (nft / "acme/etc/firewalld").exists(), "the nftables variant still has firewalld files"
    steps = list(dict.fromkeys(re.findall(r"^\s*step ([a-z0-9-]+)\s*$", RECONCILE.read_text(), re.M)))
    assert steps.index("install-files") < steps.index("install-firewalld-policies")
    assert steps.index("remove-obsolete") < steps.index("remove-obsolete-rest")
    watch = tmp_path / "watch.py"
    watch.write_text(_WATCH)
    results, i, watched = [], 0, 0
    for case, before, after in (("first install", None, first / "acme"), ("to nftables", first / "acme", nft / "acme")):
        for step in [None, *steps]:
            i += 1
            d = tmp_path / f"p{i}"
            d.mkdir()
            r = Router(d, shell)
            if before is not None:
                assert r.reconcile(before).returncode == 0
            log = d / "faults.log"
            for tool in ("mv", "rm"):  # the real tool, then the disk checked
                (d / "bin" / tool).write_text(f'#!/bin/sh\n/bin/{tool} "$@" || exit $?\necho x >> {d}/ops\n'
                                              f'python3 {watch} {r.root} "{tool} $*" >> {log}\n')
                (d / "bin" / tool).chmod(0o755)
            (r.root / "etc/wan/test-hooks").write_text("")
            if step:
                r.env.update(WAN_TEST_STOP_AT=f"reconcile:{step}", WAN_TEST_SIGNAL="KILL")
            killed = r.reconcile(after)
            reached = step is None or f"WAN-TEST: at reconcile:{step}" in killed.stderr
            r.env.pop("WAN_TEST_STOP_AT", None)
            res = r.reconcile(after)
            faults = log.read_text().splitlines() if log.exists() else []
            watched += len((d / "ops").read_text().splitlines()) if (d / "ops").exists() else 0
            ok = res.returncode == 0 and r.files() == _expected(after) | {"etc/wan/test-hooks": (b"", 0o644)}
            results.append((case, step, reached, faults, ok))
            shutil.rmtree(d)
    bad = [f"{c} @ {s or 'no kill'}: {f[:2]}{'' if ok else ' (the next run did not converge)'}"
           for c, s, _, f, ok in results if f or not ok][:6]
    reached = {(c, s) for c, s, hit, _, _ in results if hit}
    assert watched > 100, f"the mv/rm stand-ins saw {watched} operations: reconcile did not use them"
    assert ("first install", "install-firewalld-policies") in reached and ("to nftables", "remove-obsolete-rest") in reached
    assert not bad, "\n".join(bad)
