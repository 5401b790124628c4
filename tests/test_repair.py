"""Repairs between releases (reconcile --repair, run by fetch when the installed release is the latest):
the installed release compared with what is in effect, only the difference repaired, each repair logged.

pluto is the stand-in of tests/support.py (no ESP on this machine's kernel; it keeps which conns are
loaded, from which conf, and plays the peers: a conn is up when both ends loaded it); the firewall is
the real `nft` in a network namespace of the test's own (`unshare -n`); dnsmasq's reload is a stand-in
that copies the file it would read (`WAN_RELOAD_DNS`), and its check compares that copy (`WAN_CHECK_DNS`).
tests/lab/test_lab.py proves the same repairs against real pluto and dnsmasq in the lab.
Every case runs under BusyBox ash (OpenWrt's shell) and bash (RHEL's).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from render.openwrt import fw4_ruleset
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, STUB_IPSEC, enrol_programs, pluto_load, static_peer

SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
RECONCILE = REPO / "router" / "reconcile"
FOUR = REPO / "tests/lab/wans/four"
UCI = r"""#!/bin/sh
echo "uci $*" >> "LOG"
if [ "$1" = -q ] && [ "$2" = get ]; then
    awk -v k="$3" 'index($0, "set " k "=") == 1 { v = substr($0, length("set " k "=") + 1); gsub(/\047/, "", v); print v }' "FILE"
fi
exit 0
"""
UNSHARE = shutil.which("unshare")
LOOKS = ["ipsec whack --status", "ipsec whack --trafficstatus"]  # what a repair asks pluto, read-only
pytestmark = pytest.mark.skipif(not shutil.which("nft") or not UNSHARE, reason="needs nft and unshare (./run installs them)")


def _sites(tmp: Path, edit=None) -> Path:
    d = tmp / "sites"
    shutil.copytree(FOUR, d)
    if edit:
        edit(d)
    return d


def _nftables_acme(d: Path) -> None:
    p = d / "acme.yaml"
    p.write_text(p.read_text().replace("  libreswan: 4\n", "  libreswan: 4\n  firewall: nftables\n", 1))


class Router:
    """One router's / in a directory: its installed release applied by reconcile, a stand-in pluto
    whose peers have loaded every tunnel, and a network namespace (held by a sleeping process) where
    its firewall lives; every program runs inside that namespace."""

    def __init__(self, tmp: Path, shell: list[str], sites: Path, name: str):
        self.tmp, self.shell, self.name = tmp, shell, name
        wan = load_sites(sites)
        trees = render_wan(wan, "test")
        write_trees(trees, tmp / "out")
        self.tree = tmp / "out" / name
        self.root = enrol_programs(tmp / "root")
        self.state, self.log, bin_ = tmp / "pluto", tmp / "calls.log", tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(STUB_IPSEC)
        (bin_ / "ipsec").chmod(0o755)
        peer = tmp / "peer"
        for other, tree in trees.items():
            if other != name:
                static_peer(peer, tree)
        self.platform = next(s for s in wan.sites if s.name == name).router.platform
        self.holder = subprocess.Popen([UNSHARE, "-n", "sleep", "600"])
        self.env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp), "STUB_LOG": str(self.log),
                    "STUB_STATE": str(self.state), "STUB_ROOT": str(self.root), "STUB_PEER": str(peer),
                    "WAN_RELOAD_DNS": f'echo reload-dns >> "{self.log}"; cp "{self.dns_file()}" "{self.state}/dnsmasq.conf"',
                    "WAN_CHECK_DNS": f'cmp -s "{self.dns_file()}" "{self.state}/dnsmasq.conf"'}
        if self.platform == "openwrt":
            # fw4 as a stand-in that does what `fw4 reload` does with our includes: the fw4 table
            # rebuilt from the installed snippets (render/openwrt.py fw4_ruleset), loaded by real nft
            # uci: `uci batch` and `commit` accepted, `uci -q get KEY` answers what firewall.uci sets
            (bin_ / "uci").write_text(UCI.replace("LOG", str(self.log)).replace("FILE", str(self.root / "etc/wan/firewall.uci")))
            (bin_ / "fw4").write_text(f'#!/bin/sh\necho "fw4 $*" >> "{self.log}"\n'
                                      f'{sys.executable} -c "from pathlib import Path; from render.openwrt import fw4_ruleset; '
                                      f'print(fw4_ruleset(Path(\'{self.root}\')))" | nft -f -\n')
            for t in ("uci", "fw4"):
                (bin_ / t).chmod(0o755)
        r = self.reconcile(self.tree, repair=False)
        assert r.returncode == 0, r.stderr
        if self.platform == "openwrt":
            assert self.nft("-f", "-", stdin=fw4_ruleset(self.root)).returncode == 0

    def dns_file(self) -> Path:
        return self.root / ("etc/wan/dnsmasq.conf" if self.platform == "openwrt" else "etc/dnsmasq.d/wan.conf")

    def inside(self, argv: list[str], env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-n", "--", *argv], capture_output=True, text=True,
                              env=env, input=stdin, timeout=120)

    def nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return self.inside(["nft", *args], stdin=stdin)

    def reconcile(self, tree: Path, repair: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return self.inside(self.shell + [str(RECONCILE), "--root", str(self.root), *(["--repair"] if repair else []), str(tree)],
                           env={**self.env, **(env or {})})

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def up(self) -> set[str]:
        out = subprocess.run(["sh", str(self.tmp / "bin/ipsec"), "whack", "--trafficstatus"], env=self.env,
                             capture_output=True, text=True).stdout
        return {line.split('"')[1] for line in out.splitlines()}

    def repairs(self) -> list[tuple[str, str]]:
        p = self.root / "var/run/wan/repairs.log"
        return [tuple(line.split()[1:]) for line in p.read_text().splitlines()] if p.exists() else []

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture(params=[" ".join(s) for s in SHELLS])
def shell(request) -> list[str]:
    return request.param.split()


@pytest.fixture
def el(tmp_path, shell):
    r = Router(tmp_path, shell, _sites(tmp_path, _nftables_acme), "acme")
    yield r
    r.close()


def test_repair_brings_back_a_deleted_conn_an_edited_conf_the_firewall_and_dns_and_touches_nothing_else(el):
    """acme (EL, nftables path) has three tunnels: acme-berlin deleted from pluto (whack --delete),
    acme-home's conf edited by hand (and loaded so), the WAN's table flushed, dnsmasq's wan.conf
    deleted and dnsmasq restarted without it. One repair restores all four; acme-oslo is not touched."""
    r = el
    tunnels = {"acme-berlin", "acme-home", "acme-oslo"}
    assert r.up() == tunnels
    assert r.nft("-f", str(r.root / "etc/nftables/wan.nft")).returncode == 0  # as the first apply left it (stand-in reload)
    good_conf = (r.root / "etc/ipsec.d/acme-home.conf").read_bytes()
    # the damage
    subprocess.run(["sh", str(r.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-berlin"], env=r.env, check=True)
    edited = good_conf.replace(b"dpddelay=10", b"dpddelay=300")
    assert edited != good_conf
    (r.root / "etc/ipsec.d/acme-home.conf").write_bytes(edited)
    pluto_load(r.state, "acme-home.conf", edited)  # `ipsec auto --replace acme-home` by the person who edited it
    assert r.nft("flush", "table", "inet", "wan").returncode == 0
    (r.root / "etc/dnsmasq.d/wan.conf").unlink()
    (r.state / "dnsmasq.conf").unlink(missing_ok=True)
    assert r.up() == {"acme-home", "acme-oslo"}  # the edit (a DPD delay) keeps it up

    res = r.reconcile(r.tree)
    assert res.returncode == 0, res.stderr
    calls = r.calls()
    assert not [c for c in calls if "acme-oslo" in c], calls  # the healthy tunnel is not touched
    assert "ipsec auto --add acme-berlin" in calls and "ipsec whack --initiate --asynchronous --name acme-berlin" in calls
    assert calls.index("ipsec whack --delete --name acme-home") < calls.index("ipsec auto --add acme-home")
    assert (r.root / "etc/ipsec.d/acme-home.conf").read_bytes() == good_conf
    assert (r.state / "loaded/acme-home").read_text().strip() == __import__("hashlib").sha256(good_conf).hexdigest()
    assert r.up() == tunnels
    listed = r.nft("list", "table", "inet", "wan").stdout
    assert listed.count("meta ipsec missing drop") == 2 and "snat ip to ip saddr" in listed, listed
    assert (r.state / "dnsmasq.conf").read_bytes() == (r.tree / "etc/dnsmasq.d/wan.conf").read_bytes()
    assert sorted(r.repairs()) == [("conf", "acme-home"), ("conn", "acme-berlin"), ("dns", "/etc/dnsmasq.d/wan.conf"),
                                   ("firewall", "table-inet-wan")]
    assert not (r.root / "etc/wan/reconcile.journal").exists()

    again = r.reconcile(r.tree)
    assert again.returncode == 0 and "nothing to repair" in again.stderr, again.stderr
    assert r.calls() == LOOKS  # only a look
    assert len(r.repairs()) == 4


def test_a_child_sa_is_initiated_again_only_by_its_initiator_and_only_while_the_ike_sa_stands(tmp_path, shell):
    """Child SAs missing on acme (initiator of all three): acme-oslo with its IKE SA up is initiated
    again; acme-home without an IKE SA (the peer unreachable: pluto keeps trying by itself) is left
    to pluto. home is the responder of acme-home: its repair initiates nothing."""
    r = Router(tmp_path, shell, _sites(tmp_path, _nftables_acme), "acme")
    try:
        assert r.nft("-f", str(r.root / "etc/nftables/wan.nft")).returncode == 0
        (r.state / "down").mkdir()
        (r.state / "down/acme-oslo").touch()
        (r.tmp / "peer/loaded/acme-home").unlink()  # home's pluto does not have it: no IKE SA
        assert r.up() == {"acme-berlin"}
        res = r.reconcile(r.tree)
        assert res.returncode == 0, res.stderr
        assert [c for c in r.calls() if c not in LOOKS] == ["ipsec whack --initiate --asynchronous --name acme-oslo"]
        assert r.repairs() == [("child", "acme-oslo")]
        assert r.up() == {"acme-berlin", "acme-oslo"}
    finally:
        r.close()
    h = Router(tmp_path / "h", shell, _sites(tmp_path / "h"), "home")
    try:
        (h.state / "down").mkdir()
        for t in ("acme-home", "berlin-home"):
            (h.state / "down" / t).touch()
        res = h.reconcile(h.tree)
        assert res.returncode == 0 and "nothing to repair" in res.stderr, res.stderr
        assert h.calls() == LOOKS and h.repairs() == []
    finally:
        h.close()


@pytest.mark.parametrize("damage", ["conn", "child", "firewall", "dns"])
def test_each_repair_alone_is_found_and_only_it_is_done(el, damage):
    r = el
    assert r.nft("-f", str(r.root / "etc/nftables/wan.nft")).returncode == 0
    if damage == "conn":  # acme initiates all three of its tunnels (its name sorts first)
        subprocess.run(["sh", str(r.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-oslo"], env=r.env, check=True)
    elif damage == "child":  # the peer refused its Child SA while the IKE SA stands: pluto does not retry
        (r.state / "down").mkdir(exist_ok=True)
        (r.state / "down/acme-oslo").touch()
        assert r.up() == {"acme-berlin", "acme-home"}
    elif damage == "firewall":
        assert r.nft("delete", "table", "inet", "wan").returncode == 0
    else:
        (r.state / "dnsmasq.conf").write_text("# dnsmasq restarted without the WAN's settings\n")
    res = r.reconcile(r.tree)
    assert res.returncode == 0, res.stderr
    calls = [c for c in r.calls() if c not in LOOKS]
    want = {"conn": ["ipsec whack --delete --name acme-oslo", "ipsec auto --add acme-oslo",
                     "ipsec whack --initiate --asynchronous --name acme-oslo"],
            "child": ["ipsec whack --initiate --asynchronous --name acme-oslo"],
            "firewall": [],
            "dns": ["reload-dns"]}[damage]
    assert [c for c in calls if c.startswith("ipsec") or c == "reload-dns"] == want, calls
    assert [w for w, _ in r.repairs()] == [damage]
    assert r.up() == {"acme-berlin", "acme-home", "acme-oslo"}
    assert "meta ipsec missing drop" in r.nft("list", "table", "inet", "wan").stdout


def test_openwrt_fw4_chains_without_our_snippets_are_reloaded_as_an_apply_does(tmp_path, shell):
    """home (OpenWrt): fw4 rebuilt its table without our includes (a person removed the UCI include
    and reloaded): the repair applies firewall.uci again and reloads fw4; the rules are back."""
    r = Router(tmp_path, shell, _sites(tmp_path), "home")
    try:
        assert "wan: from the tunnels" in r.nft("list", "chain", "inet", "fw4", "forward").stdout
        assert r.nft("flush", "chain", "inet", "fw4", "forward").returncode == 0
        res = r.reconcile(r.tree)
        assert res.returncode == 0, res.stderr
        assert "fw4 reload" in r.calls() and any(c.startswith("uci batch") or c.startswith("uci commit") for c in r.calls())
        assert "wan: from the tunnels" in r.nft("list", "chain", "inet", "fw4", "forward").stdout
        assert r.repairs() == [("firewall", "fw4-chains")]
        assert not [c for c in r.calls() if c.startswith("ipsec") and c not in LOOKS]
    finally:
        r.close()


def test_a_tree_that_is_not_the_installed_release_is_refused_and_nothing_changes(el, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(el.tree, other)
    conf = other / "etc/wan/tunnels.list"
    conf.chmod(0o644)
    conf.write_text(conf.read_text().splitlines()[0] + "\n")
    files = other / "etc/wan/files.list"
    import hashlib
    files.chmod(0o644)
    files.write_text("\n".join(
        (f"{hashlib.sha256(conf.read_bytes()).hexdigest()} {line.split()[1]} {line.split()[2]}"
         if line.endswith("etc/wan/tunnels.list") else line) for line in files.read_text().splitlines()) + "\n")
    subprocess.run(["sh", str(el.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-oslo"], env=el.env, check=True)
    res = el.reconcile(other)
    assert res.returncode == 2 and "is not the installed release" in res.stderr, res.stderr
    assert el.calls() == [] and el.repairs() == []


def test_pluto_not_running_is_reported_and_nothing_is_repaired(el):
    (el.root / "etc/dnsmasq.d/wan.conf").unlink()
    stub = el.tmp / "bin/ipsec"
    no_pluto = '[ "$2" = --status ] && { echo "whack: no pluto" >&2; exit 1; }\n'
    stub.write_text(STUB_IPSEC.replace('case "$1" in', no_pluto + 'case "$1" in', 1))
    res = el.reconcile(el.tree)
    assert res.returncode == 1 and "pluto is not running" in res.stderr, res.stderr
    assert not (el.root / "etc/dnsmasq.d/wan.conf").exists() and el.repairs() == []
    assert not (el.root / "etc/wan/reconcile.journal").exists()


def test_nothing_installed_means_nothing_to_repair(tmp_path, shell):
    out = tmp_path / "out"
    write_trees(render_wan(load_sites(FOUR), "test"), out)
    root = enrol_programs(tmp_path / "root")
    res = subprocess.run(shell + [str(RECONCILE), "--root", str(root), "--repair", str(out / "acme")],
                         capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp_path)})
    assert res.returncode == 0 and "nothing to repair" in res.stderr, res.stderr
    assert not (root / "etc/ipsec.d").exists()


def test_a_stand_in_firewall_reload_is_checked_by_the_builtin_check_only_when_asked(el):
    """The lab replaces the platform's firewall reload (no systemd, firewalld or fw4 there) but keeps
    reconcile's own check of the rules in effect with WAN_CHECK_FIREWALL=builtin; without it a
    stand-in reload means the firewall is not checked (as documented)."""
    r = el
    wan = r.root / "etc/nftables/wan.nft"
    assert r.nft("-f", str(wan)).returncode == 0
    reload = f'echo reload-fw >> "{r.log}"; nft -f "{wan}"'
    assert r.nft("flush", "table", "inet", "wan").returncode == 0
    res = r.reconcile(r.tree, env={"WAN_RELOAD_FIREWALL": reload})
    assert res.returncode == 0 and "nothing to repair" in res.stderr, res.stderr
    res = r.reconcile(r.tree, env={"WAN_RELOAD_FIREWALL": reload, "WAN_CHECK_FIREWALL": "builtin"})
    assert res.returncode == 0, res.stderr
    assert "reload-fw" in r.calls() and r.repairs() == [("firewall", "table-inet-wan")]
    assert "meta ipsec missing drop" in r.nft("list", "table", "inet", "wan").stdout
