"""The router-side fetch program against a real HTTP server (loopback) serving signed releases,
verified by the real `signify-openbsd`, downloaded by curl or BusyBox wget, under BusyBox ash and
bash.

Here `ipsec` is a stand-in (pluto cannot hold tunnels on this machine's kernel: tests/support.py):
it records its calls and plays the peer: a connection counts as established once both ends loaded
it and each holds the public key the other signs with (this router's rightrsasigkey is the peer's
leftrsasigkey and the other way round, or a rollover key added with whack --addkey).
tests/lab/test_release_lab.py runs the same program against real pluto and ESP.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from lab.keys import stranger_key, with_wrong_peer_keys
from release import signify
from release.bundle import build, pack, release_env, resign
from release.programs import key_id
from render import paths
from render.model import Wan
from render.render import render_wan
from render.validate import load_sites

from support import PLUTO_LOOKS as LOOKS
from support import REPO, STUB_IPSEC, Server, pluto_expected_keys, pluto_load, static_peer

FETCH = REPO / "router" / "fetch"
WAN = REPO / "tests/lab/wans/two"
SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
DOWNLOADERS = [d for d in ("curl", "wget") if shutil.which("curl" if d == "curl" else "busybox")]
pytestmark = pytest.mark.skipif(not shutil.which("signify-openbsd"), reason="needs signify-openbsd (./run installs it)")



def enrolled(root: Path, key: signify.SecretKey, program_key: signify.SecretKey | None = None) -> None:
    """A router's /etc/wan as `enrol --install` leaves it: the trusted key sets and the programs
    (bundles carry none: fetch applies them with the installed reconcile)."""
    (root / "etc/wan/keys/release").mkdir(parents=True)
    (root / "etc/wan/keys/programs").mkdir(parents=True)
    (root / "etc/wan/keys/release" / key_id(key.public)).write_text(key.public.text("test key"))
    program_key = program_key or signify.generate()
    (root / "etc/wan/keys/programs" / key_id(program_key.public)).write_text(program_key.public.text("program key"))
    for name in sorted(set(paths.PROGRAMS.values())):
        shutil.copy(REPO / "router" / name, root / "etc/wan" / name)


def rekeyed(wan: Wan) -> Wan:
    """`wan` with every router on a new key of its own, without overlap: a change to both ends of
    every tunnel (what a PSK change was), which cannot come up until both ends apply it."""
    return dataclasses.replace(wan, sites=tuple(
        dataclasses.replace(s, router=dataclasses.replace(s.router, key=stranger_key(), next_key=None, previous_key=None))
        for s in wan.sites))


class World:
    """Releases in a dist/ directory, a server, and one router (acme of tests/lab/wans/two) in a directory."""

    def __init__(self, tmp: Path, shell: list[str], downloader: str):
        self.tmp, self.shell = tmp, shell
        self.wan = load_sites(WAN)
        self.key = signify.generate()
        self.dist = tmp / "dist"
        self.dist.mkdir()
        self.server = Server(self.dist, tmp / "server.log")
        self.root = tmp / "root"
        self.program_key = signify.generate()
        enrolled(self.root, self.key, self.program_key)
        conf = [f"WAN_RELEASE_URL={self.server.url}", "WAN_ROUTER=acme", "WAN_HEALTH_TIMEOUT=2", "WAN_FETCH_TIMEOUT=20",
                f"WAN_DOWNLOADER={downloader}", "WAN_KEEP=1"]
        (self.root / "etc/wan/fetch.conf").write_text("\n".join(conf) + "\n")
        bin_ = tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(STUB_IPSEC)
        (bin_ / "ipsec").chmod(0o755)
        if downloader == "wget":  # BusyBox's, as on OpenWrt
            (bin_ / "wget").symlink_to(shutil.which("busybox"))
        self.state = tmp / "pluto"
        self.state.mkdir()
        # home, the peer, has loaded the good release's acme-home with both ends' public keys
        self.peer = static_peer(tmp / "peer", render_wan(self.wan)["home"])
        self.log = tmp / "ipsec.log"
        self.env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp), "STUB_LOG": str(self.log),
                    "STUB_STATE": str(self.state), "STUB_ROOT": str(self.root), "STUB_PEER": str(self.peer),
                    "WAN_RELOAD_DNS": "true", "WAN_RELOAD_FIREWALL": "true"}

    def release(self, tag: str, signing: signify.SecretKey | None = None, latest: bool = True, trees=None,
                programs: int = 0) -> Path:
        r = build(self.wan, signing or self.key, tag, self.dist, "test", trees=trees, programs=programs)
        if latest:
            (self.dist / "latest").write_text(tag + "\n")
        return r.dir

    def fetch(self, *args: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return subprocess.run(self.shell + [str(FETCH), "--root", str(self.root), *args],
                              capture_output=True, text=True, env=self.env, timeout=120)

    def snapshot(self) -> dict[str, str]:
        """Every file of the router (tmpfs left out) and what the stand-in pluto holds."""
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file() and not str(p.relative_to(self.root)).startswith("var/")} | {
                "pluto:" + str(p.relative_to(self.state)): p.read_text() for p in sorted(self.state.rglob("*")) if p.is_file()}

    def installed_tag(self) -> str:
        return (self.root / "etc/wan/release.env").read_text().split("\n")[0]

    def program_release(self, serial: int) -> Path:
        """dist/programs-<serial>/: this checkout's programs and this world's keys, signed by its program key."""
        from release import programs
        repo = self.tmp / f"program-repo-{serial}"
        (repo / "release").mkdir(parents=True)
        shutil.copytree(REPO / "router", repo / "router")
        (repo / programs.PUBLIC_KEY).write_text(self.program_key.public.text("program key"))
        (repo / "release/wan-release.pub").write_text(self.key.public.text("release key"))
        return programs.build(repo, serial, self.dist, self.program_key, "test")

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture(params=[f"{' '.join(s)}+{d}" for s in SHELLS for d in DOWNLOADERS])
def world(request, tmp_path):
    shell, downloader = request.param.split("+")
    w = World(tmp_path, shell.split(), downloader)
    yield w
    w.server.stop()


def test_first_fetch_installs_the_release_and_a_second_finds_nothing_to_do(world):
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    assert "v1.0.0 verified (signature, checksums, sizes, router, paths)" in r.stderr and "applied and healthy" in r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"
    assert (world.root / "etc/ipsec.d/acme-home.conf").exists()
    assert (world.root / "etc/ipsec.d/acme-home.conf").stat().st_mode & 0o777 == 0o644
    assert not list(world.root.rglob("*.secrets"))
    assert "ipsec auto --add acme-home" in world.calls()
    assert (world.state / "loaded/acme-home").exists()  # loaded, and up: each end holds the other's key
    assert "acme-home" in subprocess.run(["sh", str(world.tmp / "bin/ipsec"), "whack", "--trafficstatus"], env=world.env,
                                         capture_output=True, text=True).stdout
    r = world.fetch()
    assert r.returncode == 0 and "nothing to do" in r.stderr
    # the repair's looks at pluto (loaded conns, Child SAs), then the status's
    assert world.calls() == ["ipsec whack --status", "ipsec whack --trafficstatus", "ipsec whack --trafficstatus"]


def test_with_the_latest_release_installed_fetch_repairs_what_differs_from_it(world):
    """The tag is current, but acme-home was deleted from pluto and the DNS file edited by hand:
    fetch says "nothing to do" about releases and runs the installed reconcile's repair, which adds
    the conn again, initiates it (acme initiates), puts the file back and logs both repairs."""
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    subprocess.run(["sh", str(world.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-home"], env=world.env, check=True)
    dns = world.root / "etc/dnsmasq.d/wan.conf"
    good = dns.read_bytes()
    dns.write_text("server=/acme.inc/10.9.9.9\n")
    r = world.fetch()
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    assert "ipsec auto --add acme-home" in world.calls()
    assert "ipsec whack --initiate --asynchronous --name acme-home" in world.calls()
    assert dns.read_bytes() == good
    log = (world.root / "var/run/wan/repairs.log").read_text().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in log) == ["conn acme-home", "dns /etc/dnsmasq.d/wan.conf"]
    assert all(line.split()[0].isdigit() for line in log)
    r = world.fetch()
    assert r.returncode == 0 and world.calls() == ["ipsec whack --status", "ipsec whack --trafficstatus", "ipsec whack --trafficstatus"]
    assert len((world.root / "var/run/wan/repairs.log").read_text().splitlines()) == 2


@pytest.mark.parametrize("why", ["server down", "tampered", "expired"])
def test_a_run_that_gets_no_new_release_still_repairs_the_installed_one(world, why):
    """The release server cannot be reached (stopped), or serves a tampered SHA256SUMS, or only an
    expired release: the run fails with its own exit code (1, 2, 4), changes no release, and on its
    way out still repairs the installed one (a conn pluto lost, added again and initiated), logged."""
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    subprocess.run(["sh", str(world.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-home"], env=world.env, check=True)
    if why == "server down":
        world.server.stop()
        want = 1
    elif why == "tampered":
        d = world.release("v1.1.0")
        sums = d / "SHA256SUMS"
        sums.write_text(sums.read_text().replace("0", "1", 1))
        want = 2
    else:
        build(world.wan, world.key, "v1.1.0", world.dist, "test", date=int(time.time()) - 91 * 86400)
        (world.dist / "latest").write_text("v1.1.0\n")
        want = 4
    r = world.fetch()
    assert r.returncode == want, r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"
    assert "repairing what differs from it" in r.stderr, r.stderr
    assert "ipsec auto --add acme-home" in world.calls() and "ipsec whack --initiate --asynchronous --name acme-home" in world.calls()
    log = (world.root / "var/run/wan/repairs.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in log] == ["conn acme-home"]
    # --check looks and changes nothing, so it repairs nothing either
    subprocess.run(["sh", str(world.tmp / "bin/ipsec"), "whack", "--delete", "--name", "acme-home"], env=world.env, check=True)
    r = world.fetch("--check")
    assert r.returncode == want and "repairing" not in r.stderr, r.stderr
    assert "ipsec auto --add acme-home" not in world.calls()


def test_refusals_change_nothing(world):
    """A tampered bundle, a bad signature, a bundle for another router, a downgrade, a broken-off
    download: each refused (or failed) with a reason, and the router exactly as it was."""
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    before = world.snapshot()

    def refused(rc: int, words: str) -> None:
        r = world.fetch()
        assert r.returncode == rc, r.stderr
        assert words in r.stderr, r.stderr
        assert world.snapshot() == before
        assert not [c for c in world.calls() if c not in LOOKS]  # pluto only looked at (the repair on the way out)

    d = world.release("v1.1.0")  # tampered after signing: one byte of the bundle
    b = bytearray((d / "acme.tar.gz").read_bytes())
    b[len(b) // 2] ^= 1
    (d / "acme.tar.gz").write_bytes(bytes(b))
    refused(2, "acme.tar.gz does not match the signed SHA256SUMS")

    world.release("v1.2.0", signing=signify.generate())  # signed by a key the router does not trust
    refused(2, "SHA256SUMS is not signed by a trusted release key")

    d = world.release("v1.3.0")  # validly signed, but acme's bundle is home's
    shutil.copy(d / "home.tar.gz", d / "acme.tar.gz")
    resign(d, world.key)
    refused(2, "the bundle is for router 'home', this is 'acme'")

    world.release("v0.9.0")  # older than the installed v1.0.0
    refused(2, "v0.9.0 is older than the installed v1.0.0")

    d = world.release("v1.4.0")  # the server stops halfway through the bundle
    (d / ".break-off").write_text(f"acme.tar.gz {(d / 'acme.tar.gz').stat().st_size // 2}\n")
    refused(1, "cannot download")
    assert world.server.proc.wait(timeout=10) == 3  # it really died mid-download
    world.server.start()
    with open(world.root / "etc/wan/fetch.conf", "a") as f:  # a new port; the last setting wins
        f.write(f"WAN_RELEASE_URL={world.server.url}\n")
    (d / ".break-off").unlink()
    r = world.fetch()  # the same release, whole this time
    assert r.returncode == 0, r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.4.0"


def test_a_bundle_for_another_libreswan_major_or_no_ipsec_is_refused_before_anything_changes(world):
    """fetch compares the bundle's router.env WAN_LIBRESWAN with what `ipsec --version` reports (the
    stand-in prints it as Debian's 4.10 does), and says so when there is no `ipsec` at all."""
    world.release("v1.0.0")
    before = world.snapshot()
    world.env["STUB_LIBRESWAN"] = "5.2"
    r = world.fetch()
    assert r.returncode == 2, r.stderr
    assert "rendered for Libreswan 4.x but this router runs Libreswan 5" in r.stderr and "router.libreswan: 5" in r.stderr
    # nothing changed; pluto was only asked what the status reports (read-only)
    assert world.snapshot() == before and world.calls() in ([], ["ipsec whack --trafficstatus"])
    world.env["STUB_LIBRESWAN"] = "4.12"
    (world.tmp / "bin/ipsec").rename(world.tmp / "ipsec.away")
    world.env["PATH"] = f"{world.tmp / 'bin'}:/usr/bin:/bin"  # this machine's real ipsec is in /usr/sbin
    r = world.fetch()
    assert r.returncode == 2 and "no 'ipsec' command: install Libreswan 4.x" in r.stderr, r.stderr
    assert world.snapshot() == before
    (world.tmp / "ipsec.away").rename(world.tmp / "bin/ipsec")
    r = world.fetch()
    assert r.returncode == 0, r.stderr  # 4.12 is the bundle's major


def test_a_downgrade_is_applied_only_when_forced_by_tag(world):
    world.release("v1.0.0", latest=False)
    world.release("v2.0.0")
    assert world.fetch().returncode == 0
    r = world.fetch("--force", "--tag", "v1.0.0")
    assert r.returncode == 0, r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"


def test_a_release_that_breaks_the_tunnels_is_rolled_back(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    good = world.snapshot()
    # v1.1.0: acme's bundle holds a wrong public key for its peer, so it refuses the peer's signature
    bad = render_wan(with_wrong_peer_keys(world.wan, "acme"), "test", release_env("v1.1.0", "test"))
    ok = render_wan(world.wan, "test", release_env("v1.1.0", "test"))
    world.release("v1.1.0", trees={"acme": bad["acme"], "home": ok["home"]})
    r = world.fetch()
    assert r.returncode == 1, r.stderr
    assert "not up after 2 s: acme-home" in r.stderr and "rolling back to v1.0.0" in r.stderr
    assert "v1.1.0 was rolled back; v1.0.0 is installed again and its tunnels are up" in r.stderr
    now = world.snapshot()
    changed = {k for k in good.keys() | now.keys() if good.get(k) != now.get(k)}
    # the router's files are v1.0.0's again; what differs is fetch's own record and the kept bundle
    assert all(k.startswith(("etc/wan/releases/", "etc/wan/previous/", "pluto:")) for k in changed), changed
    assert (world.state / "loaded/acme-home").exists()
    # cron runs again: the failed release is not retried by itself
    r = world.fetch()
    assert r.returncode == 1 and "v1.1.0 was rolled back here before" in r.stderr
    # only looks at pluto: the repair of the installed v1.0.0 on the way out finds nothing, then the status
    assert world.calls() == ["ipsec whack --status", "ipsec whack --trafficstatus", "ipsec whack --trafficstatus"]
    assert "nothing to repair" in r.stderr, r.stderr


def test_the_installed_bundle_and_wan_keep_older_ones_are_kept(world):
    for tag in ("v1.0.0", "v1.1.0", "v1.2.0"):
        world.release(tag)
        assert world.fetch().returncode == 0
    assert sorted(os.listdir(world.root / "etc/wan/releases/bundles")) == ["v1.1.0", "v1.2.0"]  # WAN_KEEP=1
    conf = world.root / "etc/wan/fetch.conf"
    conf.write_text(conf.read_text() + "WAN_KEEP=0\n")
    world.release("v1.3.0")
    assert world.fetch().returncode == 0
    assert sorted(os.listdir(world.root / "etc/wan/releases/bundles")) == ["v1.3.0"]  # 0: none beyond the installed one


def test_bundles_are_reproducible_and_verify_with_signify(tmp_path):
    wan = load_sites(WAN)
    key = signify.generate()
    a = build(wan, key, "v1.0.0", tmp_path / "a", "abc", mtime=1700000000).dir
    b = build(wan, key, "v1.0.0", tmp_path / "b", "abc", mtime=1700000000).dir
    assert sorted(os.listdir(a)) == ["RELEASE", "SHA256SUMS", "SHA256SUMS.sig", "acme.tar.gz", "home.tar.gz"]
    assert len((a / "RELEASE").read_bytes()) < 400  # no per-tunnel lines: it stays small for big meshes
    for n in os.listdir(a):
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    (tmp_path / "k.pub").write_text(key.public.text("k"))
    v = subprocess.run(["signify-openbsd", "-V", "-p", str(tmp_path / "k.pub"), "-x", str(a / "SHA256SUMS.sig"),
                        "-m", str(a / "SHA256SUMS")],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=a).returncode == 0
    # the bundle: the rendered tree plus release.env, root-owned, modes kept
    t = subprocess.run(["tar", "-tvzf", str(a / "acme.tar.gz")], capture_output=True, text=True).stdout
    assert "-rw-r--r-- root/root" in next(line for line in t.splitlines() if line.endswith("acme-home.conf"))
    assert "etc/wan/fetch" not in t and "etc/wan/reconcile" not in t  # programs come only from a program release
    assert "etc/wan/release.env" in t and "peers.list" in t and ".secrets" not in t
    other = with_wrong_peer_keys(wan, "acme")
    assert pack(render_wan(wan, "abc")["acme"], 0) != pack(render_wan(other, "abc")["acme"], 0)


def test_settings_are_read_not_run(world, tmp_path):
    canary = tmp_path / "ran"
    conf = world.root / "etc/wan/fetch.conf"
    conf.write_text(conf.read_text().replace("WAN_ROUTER=acme", "  WAN_ROUTER='acme'  \n# WAN_ROUTER=evil")
                    + f'WAN_KEEP="2"\nWAN_DOWNLOADER=$(touch {canary})\n')
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 2 and "WAN_DOWNLOADER must be uclient-fetch, curl or wget" in r.stderr, r.stderr
    assert not canary.exists()
    conf.write_text(conf.read_text().replace(f"WAN_DOWNLOADER=$(touch {canary})", ""))
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"


def test_health_all_requires_every_tunnel_of_the_release(world):
    with open(world.root / "etc/wan/fetch.conf", "a") as f:
        f.write("WAN_HEALTH=all\n")
    # the stand-in peer holds another key for acme than the release's: on a first install nothing
    # was up before, so only WAN_HEALTH=all notices that acme-home never comes up
    acme_id = (world.peer / "conns/acme-home").read_text().split("\n")[1]
    (world.peer / "keys" / acme_id).write_text(stranger_key().rsasigkey + "\n")
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 3 and "not up after 2 s: acme-home" in r.stderr, r.stderr
    assert "no previous bundle to go back to" in r.stderr


# ---- kill -9, SIGTERM and power cuts at every named step ---------------------------------------
STEP = re.compile(r"^\s*step ([a-z0-9-]+)\s*$", re.M)


def named_steps(program: Path) -> list[str]:
    """The steps a program names (`step NAME` lines): steps added later join the test by themselves."""
    return list(dict.fromkeys(STEP.findall(program.read_text())))


def bundle_of(dist: Path, tag: str) -> dict[str, tuple[bytes, int]]:
    with tarfile.open(dist / tag / "acme.tar.gz") as t:
        return {m.name: (t.extractfile(m).read(), m.mode) for m in t.getmembers() if m.isfile()}


def ipsec(world, *args: str) -> str:
    return subprocess.run(["sh", str(world.bin / "ipsec"), *args], env=world.env, capture_output=True, text=True).stdout


def assert_consistent(world, dist: Path, tag: str) -> None:
    """The router fully on `tag`: its files, its lists and its marker are that bundle's, the stand-in
    pluto has exactly its tunnels loaded from the files on disk and holds, for each peer's IKE id,
    exactly the keys the files on disk name (the conn's, plus peer-keys.list), every tunnel is up,
    the services were reloaded with the files on disk, and no work is left over."""
    root, state = world.root, world.state
    b = bundle_of(dist, tag)
    listed = b["etc/wan/files.list"][0].decode().split("\n")
    for line in filter(None, listed):
        _, mode, p = line.split()
        assert (root / p).read_bytes() == b[p][0], p
        assert stat.S_IMODE((root / p).stat().st_mode) == int(mode, 8), p
    for p in ("etc/wan/files.list", "etc/wan/tunnels.list", "etc/wan/release.env"):
        assert (root / p).read_bytes() == b[p][0], p
    tunnels = sorted(line.split()[0] for line in b["etc/wan/tunnels.list"][0].decode().splitlines())
    assert sorted(p.stem for p in (root / "etc/ipsec.d").glob("*.conf")) == tunnels
    assert sorted(p.name for p in (state / "loaded").iterdir()) == tunnels
    for t in tunnels:
        conf = (root / f"etc/ipsec.d/{t}.conf").read_bytes()
        assert (state / "loaded" / t).read_text().strip() == hashlib.sha256(conf).hexdigest(), f"{t}: pluto has an old conf"
    for ike_id, keys in pluto_expected_keys(root).items():
        held = set((state / "keys" / ike_id).read_text().split()) if (state / "keys" / ike_id).exists() else set()
        assert held == keys, f"{ike_id}: pluto holds other public keys than the files on disk name"
    up = sorted(re.findall(r'"([^"]+)"', ipsec(world, "whack", "--trafficstatus")))
    assert up == tunnels, f"tunnels left down: {sorted(set(tunnels) - set(up))}"
    for served, on_disk in (("dnsmasq.conf", "etc/dnsmasq.d/wan.conf"), ("wan.nft", "etc/nftables/wan.nft")):
        assert (state / served).read_bytes() == (root / on_disk).read_bytes(), f"{on_disk} on disk but not reloaded"
    rel = root / "etc/wan/releases"
    left = [p.name for p in rel.iterdir()
            if p.name.startswith("work.") or p.name in ("journal", "pending") or p.name.endswith(".wan-new")]
    left += [p.name for p in (root / "etc/wan").iterdir()
             if p.name.startswith(".reconcile.") or p.name in ("reconcile.journal", "previous.new", "keys.new", "keys.old")
             or p.name.endswith(".wan-new")]
    left += [p.name for p in (rel / "bundles").iterdir() if p.name.endswith(".new")]
    assert not left, f"left over: {left}"


class Router:
    """One router of the kill test: its / and its stand-in pluto in a directory, a copy of a template."""

    def __init__(self, template: Path, d: Path, shell: list[str], env: dict, url: str):
        self.tmp, self.shell = d, shell
        shutil.copytree(template, d, symlinks=True)
        self.root, self.state, self.bin, self.log = d / "root", d / "pluto", d / "bin", d / "ipsec.log"
        with open(self.root / "etc/wan/fetch.conf", "a") as f:
            f.write(f"WAN_RELEASE_URL={url}\n")
        self.env = {k: v.replace(str(template), str(d)) for k, v in env.items()}

    def fetch(self) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return subprocess.run(self.shell + [str(FETCH), "--root", str(self.root)], capture_output=True, text=True,
                              env=self.env, timeout=120)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def power_cut(self) -> None:
        """What a reboot does: tmpfs is gone, pluto starts again and loads what is on disk."""
        shutil.rmtree(self.root / "var", ignore_errors=True)
        for d in ("loaded", "conns", "keys"):
            shutil.rmtree(self.state / d, ignore_errors=True)
            (self.state / d).mkdir()
        for conf in (self.root / "etc/ipsec.d").glob("*.conf"):
            pluto_load(self.state, conf, conf.read_bytes())

    def damage(self) -> None:
        """What the repair scenario finds: acme-home deleted from pluto, its conf edited by hand, the
        firewall's rules and dnsmasq's WAN settings no longer in effect (the stand-ins' copies gone)."""
        for d in ("loaded", "conns"):
            (self.state / d / "acme-home").unlink()
        conf = self.root / "etc/ipsec.d/acme-home.conf"
        conf.write_text(conf.read_text().replace("\tauto=", "\t# edited by hand\n\tauto=", 1))
        (self.state / "wan.nft").unlink()
        (self.state / "dnsmasq.conf").unlink()

    def killed(self, where: str, sig: str, target: str) -> str:
        """fetch with the test hook armed; waits until every process of its group is gone."""
        env = dict(self.env, WAN_TEST_STOP_AT=where, WAN_TEST_SIGNAL=sig, WAN_TEST_TARGET=target)
        p = subprocess.Popen(self.shell + [str(FETCH), "--root", str(self.root)], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = p.communicate(timeout=120)[0]
        end = time.monotonic() + 60
        while time.monotonic() < end:  # an orphaned reconcile finishes its work
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return out
            time.sleep(0.05)
        raise AssertionError(f"processes of {where} still running")


def kill_template(tmp: Path, shell: list[str]) -> tuple[Path, dict, dict]:
    """A router (acme) with v1.0.0 installed, and two release servers: `good` offers v1.1.0 (home's LAN
    changes: acme-home's conf on both ends and the firewall change), `bad` offers v1.2.0 (acme gets
    a wrong public key for its peer: it must roll back), `repair` offers v1.0.0 (the installed release:
    fetch repairs). Returns the template, its env and the servers."""
    (tmp / "template").mkdir()
    w = World(tmp / "template", shell, "curl")
    with open(w.root / "etc/wan/fetch.conf", "a") as f:
        f.write("WAN_HEALTH_TIMEOUT=1\n")
    w.env["WAN_RELOAD_DNS"] = f'cp "{w.root}/etc/dnsmasq.d/wan.conf" "{w.state}/dnsmasq.conf"'
    w.env["WAN_RELOAD_FIREWALL"] = f'cp "{w.root}/etc/nftables/wan.nft" "{w.state}/wan.nft"'
    w.env["WAN_CHECK_DNS"] = f'cmp -s "{w.root}/etc/dnsmasq.d/wan.conf" "{w.state}/dnsmasq.conf"'
    w.env["WAN_CHECK_FIREWALL"] = f'cmp -s "{w.root}/etc/nftables/wan.nft" "{w.state}/wan.nft"'
    w.release("v1.0.0")
    r = w.fetch()
    assert r.returncode == 0, r.stderr
    w.server.stop()
    sites = tmp / "sites-b"
    shutil.copytree(WAN, sites)
    (sites / "home.yaml").write_text((sites / "home.yaml").read_text().replace("192.168.2.0/24", "192.168.2.0/23"))
    # both name a program release, so its steps (programs, programs-keys, programs-install) are run too
    w.program_release(2)
    build(load_sites(sites), w.key, "v1.1.0", w.dist, "test", programs=2)
    bad = render_wan(with_wrong_peer_keys(w.wan, "acme"), "test", release_env("v1.2.0", "test"))
    ok = render_wan(w.wan, "test", release_env("v1.2.0", "test"))
    w.release("v1.2.0", trees={"acme": bad["acme"], "home": ok["home"]}, latest=False, programs=2)
    (w.root / "etc/wan/test-hooks").write_text("")
    servers = {}
    for scenario, tag in (("good", "v1.1.0"), ("bad", "v1.2.0"), ("repair", "v1.0.0")):
        d = tmp / f"dist-{scenario}"
        shutil.copytree(w.dist, d)
        (d / "latest").write_text(tag + "\n")
        servers[scenario] = Server(d, tmp / f"server-{scenario}.log")
    shutil.rmtree(w.dist)
    (w.tmp / "port").unlink(missing_ok=True)
    return w.tmp, w.env, servers


def kill_points() -> list[tuple[str, str, str, str]]:
    """(where, signal, target, scenario) for every named step: fetch's under TERM, KILL and a power cut;
    reconcile's, while applying, while rolling back and while repairing, under TERM and KILL to itself,
    TERM and KILL to the fetch that runs it, and a power cut."""
    points = []
    for s in named_steps(FETCH):
        scenario = "bad" if s.startswith("rollback-") else "repair" if s.startswith("repair") else "good"
        points += [(f"fetch:{s}", sig, target, scenario)
                   for sig, target in (("TERM", "self"), ("KILL", "self"), ("KILL", "power"))]
    for s in named_steps(REPO / "router" / "reconcile"):
        for phase, scenario in (("apply", "good"), ("rollback", "bad"), ("repair", "repair")):
            points += [(f"reconcile:{s}@{phase}", sig, target, scenario) for sig, target in
                       (("TERM", "self"), ("KILL", "self"), ("TERM", "fetch"), ("KILL", "fetch"), ("KILL", "power"))]
    return points


@pytest.mark.parametrize("shell", [" ".join(s) for s in SHELLS])
def test_killed_at_every_step_the_next_run_ends_fully_on_the_old_or_the_new_release(tmp_path, shell):
    """Every named step of fetch and reconcile (enumerated from the programs), killed by SIGTERM, by
    kill -9, by kill -9 of fetch alone while reconcile runs on, and by a power cut (kill -9 of
    everything, tmpfs dropped, pluto restarted with what is on disk); then fetch runs again, as cron
    would. Each must end fully on v1.1.0 (the good change: a kill is not the release's fault, so it
    is tried again) or fully on v1.0.0 (the broken v1.2.0 rolled back; or v1.0.0 installed and current,
    repaired after acme-home was deleted from pluto and its conf edited, the firewall's and dnsmasq's
    WAN settings dropped: every step of the repair is a kill point too), the state files, the
    stand-in pluto's loaded conns and public keys and the files on disk agreeing, every tunnel up; a
    further run changes nothing.

    The stand-in `ipsec` (tests/support.py) plays pluto: real pluto loads conns in a network
    namespace here, but each of the ~360 kill points would then cost a pluto start (seconds); the
    stand-in keeps what pluto keeps that a kill can get wrong (the conf each conn was added from, the
    public keys it holds per IKE id), and tests/lab/test_release_lab.py runs the programs against real pluto."""
    import concurrent.futures
    template, env, servers = kill_template(tmp_path, shell.split())
    points = kill_points()

    def one(i: int, where: str, sig: str, target: str, scenario: str) -> str | None:
        r = Router(template, tmp_path / f"point-{i}", shell.split(), env, servers[scenario].url)
        if scenario == "repair":
            r.damage()
        out = r.killed(where, sig, "group" if target == "power" else target)
        if f"WAN-TEST: at {where.split('@')[0]}" not in out:
            return f"{where} {sig} {target}: the step was never reached\n{out}"
        if target == "power":
            r.power_cut()
        res = r.fetch()
        want = "v1.1.0" if scenario == "good" else "v1.0.0"
        try:
            assert res.returncode in (0, 1), f"rc {res.returncode}"
            assert (r.root / "etc/wan/release.env").read_text().startswith(f"WAN_TAG={want}\n"), "on the wrong release"
            assert_consistent(r, tmp_path / f"dist-{scenario}", want)
            # the program release both releases name is installed whole: programs, keys, programs.env
            lib = r.root / "etc/wan"
            if scenario != "repair":  # (v1.0.0 names no program release)
                assert (lib / "programs.env").read_text() == "WAN_PROGRAMS_SERIAL=2\n", "program release not installed"
                for name in ("fetch", "reconcile", "enrol"):
                    assert (lib / name).read_bytes() == (REPO / "router" / name).read_bytes(), name
                assert len(list((lib / "keys/release").iterdir())) == 1 and len(list((lib / "keys/programs").iterdir())) == 1
            again = r.fetch()
            assert again.returncode == (1 if scenario == "bad" else 0), f"a further run: rc {again.returncode}"
            assert not [c for c in r.calls() if "--trafficstatus" not in c and "--status" not in c], r.calls()
        except AssertionError as e:
            return f"{where} {sig} {target}: {e}\n--- killed run:\n{out}\n--- next run:\n{res.stderr}"
        shutil.rmtree(r.tmp)
        return None

    t0 = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            failures = [f for f in pool.map(lambda a: one(*a), [(i, *p) for i, p in enumerate(points)]) if f]
    finally:
        for s in servers.values():
            s.stop()
    print(f"\n{shell}: {len(points)} kill points ({len(named_steps(FETCH))} fetch steps, "
          f"{len(named_steps(REPO / 'router' / 'reconcile'))} reconcile steps), {len(points) - len(failures)} converged, "
          f"{time.monotonic() - t0:.0f} s")
    assert not failures, f"{len(failures)} of {len(points)} kill points did not converge:\n" + "\n\n".join(failures[:4])


# ---- one fetch at a time -----------------------------------------------------------------------
def _without(tmp: Path, tool: str) -> str:
    """A PATH like the router's, minus `tool` (a directory of links to everything else)."""
    d = tmp / f"no-{tool}"
    d.mkdir()
    for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for f in Path(p).iterdir():
            if f.name != tool and not (d / f.name).exists():
                (d / f.name).symlink_to(f)
    return str(d)


@pytest.mark.parametrize("lock", ["flock", "symlink"])
@pytest.mark.parametrize("shell", [" ".join(s) for s in SHELLS])
def test_of_six_fetches_started_together_exactly_one_runs_in_every_round(tmp_path, shell, lock):
    """60 rounds of 6 fetches started at once (the server answers after 0.3 s, so they overlap):
    in every round exactly one gets past the lock; the others say so and change nothing. With
    flock, and with the symlink lock of routers that lack it."""
    from support import HostileServer
    w = World(tmp_path, shell.split(), "curl")
    w.release("v1.0.0")
    assert w.fetch().returncode == 0
    w.server.stop()
    slow = HostileServer(w.dist)
    slow.behave["SHA256SUMS"] = ("slow", 0.3)
    conf = w.root / "etc/wan/fetch.conf"
    conf.write_text(conf.read_text() + f"WAN_RELEASE_URL={slow.url}\n")
    env = dict(w.env)
    if lock == "symlink":
        env["PATH"] = f"{tmp_path / 'bin'}:{_without(tmp_path, 'flock')}"
    rounds = []
    try:
        for _ in range(60):
            ps = [subprocess.Popen(w.shell + [str(FETCH), "--root", str(w.root)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for _ in range(6)]
            outs = [(p.wait(timeout=60), p.stderr.read()) for p in ps]
            ran = [o for rc, o in outs if "fetching the latest release" in o]
            held = [o for rc, o in outs if rc == 1 and "not starting a second" in o]
            rounds.append((len(ran), len(held)))
            assert len(ran) == 1 and len(held) == 5, outs
            assert "v1.0.0 is installed and is the latest" in ran[0]
    finally:
        slow.stop()
    print(f"\n{shell} {lock}: {len(rounds)} rounds of 6, exactly one ran in each")


@pytest.mark.parametrize("lock", ["flock", "symlink"])
def test_a_lock_left_by_kill_9_or_a_power_cut_does_not_block_the_next_run(world, tmp_path, lock):
    world.release("v1.0.0")
    if lock == "symlink":
        world.env["PATH"] = f"{tmp_path / 'bin'}:{_without(tmp_path, 'flock')}"
    (world.root / "etc/wan/test-hooks").write_text("")
    env = dict(world.env, WAN_TEST_STOP_AT="fetch:download", WAN_TEST_SIGNAL="KILL")
    r = subprocess.run(world.shell + [str(FETCH), "--root", str(world.root)], env=env, capture_output=True, text=True)
    assert r.returncode == -9 or r.returncode == 137, r.stderr
    if lock == "symlink":
        assert (world.root / "var/run/wan-acme.lock.l").is_symlink()  # left behind by the killed run
    r = world.fetch()
    assert r.returncode == 0 and "applied and healthy" in r.stderr, r.stderr
    assert lock == "flock" or "removed a stale lock" in r.stderr
    if lock == "symlink":  # the owner's pid is alive but it was another boot's: a reboot with a reused pid
        (world.root / "var/run/wan-acme.lock.l").symlink_to(f"another-boot:{os.getpid()}")
        r = world.fetch()
        assert r.returncode == 0 and "nothing to do" in r.stderr and "of another boot is gone" in r.stderr, r.stderr
    shutil.rmtree(world.root / "var")  # a reboot: tmpfs is empty
    r = world.fetch()
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr


# ---- hostile servers, sizes and room -------------------------------------------------------------
def _hostile(world):
    from support import HostileServer
    world.server.stop()
    h = HostileServer(world.dist)
    conf = world.root / "etc/wan/fetch.conf"
    conf.write_text(conf.read_text() + f"WAN_RELEASE_URL={h.url}\n")
    return h


def test_hostile_servers_are_bounded_in_size_and_time(world):
    """An endless SHA256SUMS, a bundle larger than its signed size and a server that drips a byte
    every second: each refused or given up within WAN_FETCH_TIMEOUT (no `timeout` needed: BusyBox
    on OpenWrt has none), the router unchanged and nothing left in its state directory."""
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    world.release("v1.1.0")
    h = _hostile(world)
    before = world.snapshot()
    try:
        def once(rc: int, words: str) -> None:
            r = world.fetch()
            assert r.returncode == rc and words in r.stderr, r.stderr
            assert world.snapshot() == before
            assert not list((world.root / "etc/wan/releases").glob("work.*"))

        h.behave["SHA256SUMS"] = ("huge", 64 << 20)
        once(2, "SHA256SUMS is larger than the 262144 bytes allowed for it")
        h.behave.clear()
        h.behave["acme.tar.gz"] = ("huge", 8 << 20)
        once(2, f"acme.tar.gz is larger than the {(world.dist / 'v1.1.0/acme.tar.gz').stat().st_size} bytes allowed for it")
        h.behave.clear()
        with open(world.root / "etc/wan/fetch.conf", "a") as f:
            f.write("WAN_FETCH_TIMEOUT=3\n")
        before = world.snapshot()
        h.behave["RELEASE"] = ("drip", 1)
        once(1, "within WAN_FETCH_TIMEOUT=3 s (a slow or stalled server)")
    finally:
        h.stop()


def test_no_room_for_the_bundle_changes_nothing(world, tmp_path):
    """WAN_STATE on a 96 KiB file system (a real tmpfs): the signed sizes say the bundle needs more."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with open(world.root / "etc/wan/fetch.conf", "a") as f:
            f.write(f"WAN_STATE={small}/releases\n")
        world.release("v1.0.0")
        before = world.snapshot()
        r = world.fetch()
        assert r.returncode == 1 and "not enough room in" in r.stderr, r.stderr
        assert world.snapshot() == before
        assert os.listdir(small / "releases") == ["bundles"]
    finally:
        subprocess.run(["umount", str(small)])


# ---- freshness and floors ------------------------------------------------------------------------
def test_an_expired_release_and_an_unset_clock_are_reported_and_change_nothing(world):
    day = 86400
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    before = world.snapshot()
    build(world.wan, world.key, "v1.1.0", world.dist, "test", date=int(time.time()) - 91 * day)
    (world.dist / "latest").write_text("v1.1.0\n")
    r = world.fetch()
    assert r.returncode == 4 and "EXPIRED: the newest release v1.1.0 expired on" in r.stderr, r.stderr
    assert world.snapshot() == before
    # a server frozen on the installed release: noticed once that one expires
    build(world.wan, world.key, "v1.0.0", world.dist, "test", date=int(time.time()) - 91 * day)
    (world.dist / "latest").write_text("v1.0.0\n")
    r = world.fetch()
    assert r.returncode == 4 and "EXPIRED" in r.stderr, r.stderr
    build(world.wan, world.key, "v1.2.0", world.dist, "test", date=int(time.time()) + 5 * day)
    (world.dist / "latest").write_text("v1.2.0\n")
    r = world.fetch()
    assert r.returncode == 5 and "CLOCK: this router's clock says" in r.stderr and "not set yet" in r.stderr, r.stderr
    assert world.snapshot() == before


def test_a_fresh_router_refuses_a_release_below_its_floor_even_forced(world):
    with open(world.root / "etc/wan/fetch.conf", "a") as f:
        f.write("WAN_MIN_SERIAL=1001000\n")  # v1.1.0, recorded at enrolment
    world.release("v1.0.0")
    for args in ((), ("--force", "--tag", "v1.0.0")):
        r = world.fetch(*args)
        assert r.returncode == 2 and "below this router's floor WAN_MIN_SERIAL=1001000" in r.stderr, r.stderr
    assert not (world.root / "etc/wan/release.env").exists()
    world.release("v1.1.0")
    assert world.fetch().returncode == 0


@pytest.mark.parametrize("bad", ["01000000", "1e6", "-1", "0", "", "1000000x", "12345678901"])
def test_a_serial_that_is_not_a_plain_positive_number_is_refused(world, bad):
    d = world.release("v1.0.0")
    rel = d / "RELEASE"
    rel.write_text(re.sub(r"WAN_SERIAL=\d+", f"WAN_SERIAL={bad}", rel.read_text()))
    resign(d, world.key)
    r = world.fetch()
    assert r.returncode == 2 and "RELEASE has no valid serial" in r.stderr, r.stderr
    assert not (world.root / "etc/wan/release.env").exists()


def test_a_damaged_installed_serial_fails_closed(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    marker = world.root / "etc/wan/release.env"
    marker.write_text(marker.read_text().replace("WAN_SERIAL=1000000", "WAN_SERIAL=one"))
    world.release("v0.9.0")
    r = world.fetch()
    assert r.returncode == 2 and "has no valid serial" in r.stderr, r.stderr


# ---- paths and modes in a bundle's lists ---------------------------------------------------------
@pytest.mark.parametrize("line, words", [
    ("{sha} 0755 ../x", "../x is not a plain relative path"),
    ("{sha} 0644 /etc/shadow", "/etc/shadow is not a plain relative path"),
    ("{sha} 0644 etc/./x", "etc/./x is not a plain relative path"),
    ("{sha} 4755 etc/ipsec.d/acme-home.conf", "mode 4755 of etc/ipsec.d/acme-home.conf is above 0755 or sets setuid/setgid/sticky"),
    ("{sha} 2755 etc/ipsec.d/acme-home.conf", "mode 2755"),
    ("{sha} 1755 etc/ipsec.d/acme-home.conf", "mode 1755"),
    ("{sha} 0777 etc/ipsec.d/acme-home.conf", "mode 0777"),
    ("{sha} 0755 etc/wan/reconcile", "etc/wan/reconcile is not one of the WAN's own files"),
    ("{sha} 0644 etc/wan/keys/release/1234", "etc/wan/keys/release/1234 is not one of the WAN's own files"),
    ("{sha} 0644 etc/wan/a b", "not \"sha256 mode path\""),
])
def test_unsafe_paths_and_modes_in_a_signed_bundle_are_refused_before_anything_is_installed(world, line, words):
    from render.render import RenderedFile
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    before = world.snapshot()
    trees = render_wan(world.wan, "test", release_env("v1.1.0", "test"))
    fl = trees["acme"]["etc/wan/files.list"]
    sha = hashlib.sha256(trees["acme"]["etc/ipsec.d/acme-home.conf"].content).hexdigest()
    text = fl.content.decode()
    if " etc/ipsec.d/acme-home.conf\n" in line.format(sha=sha) + "\n":  # the same file, another mode
        text = "".join(x + "\n" for x in text.splitlines() if not x.endswith(" etc/ipsec.d/acme-home.conf"))
    trees["acme"]["etc/wan/files.list"] = RenderedFile((text + line.format(sha=sha) + "\n").encode(), fl.mode)
    world.release("v1.1.0", trees=trees)
    r = world.fetch()
    assert r.returncode == 2 and words in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert world.snapshot() == before


# ---- private work files, explicit modes -----------------------------------------------------------
def test_work_files_are_private_and_leftovers_of_a_killed_run_go(world, tmp_path):
    world.release("v1.0.0")
    (world.root / "etc/wan/test-hooks").write_text("")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    world.env["TMPDIR"] = str(tmpdir)
    for where in ("fetch:stage", "reconcile:install-files"):
        env = dict(world.env, WAN_TEST_STOP_AT=where, WAN_TEST_SIGNAL="KILL", WAN_TEST_TARGET="group")
        subprocess.run(world.shell + [str(FETCH), "--root", str(world.root)], env=env, capture_output=True,
                       start_new_session=True)
        work = list((world.root / "etc/wan/releases").glob("work.*")) + list((world.root / "etc/wan").glob(".reconcile.*"))
        assert work, where
        for d in work:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
            for f in d.rglob("*"):
                assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    assert stat.S_IMODE((world.root / "etc/wan/releases").stat().st_mode) == 0o700
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    assert not list((world.root / "etc/wan/releases").glob("work.*")) and not list((world.root / "etc/wan").glob(".reconcile.*"))
    # what was installed has its listed mode; directories made for it 0755 (dnsmasq reads as its own user)
    for d in ("etc/dnsmasq.d", "etc/nftables", "etc/ipsec.d"):
        assert stat.S_IMODE((world.root / d).stat().st_mode) == 0o755, d
    assert stat.S_IMODE((world.root / "etc/dnsmasq.d/wan.conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((world.root / "etc/ipsec.d/acme-home.conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((world.root / "etc/wan/release.env").stat().st_mode) == 0o644
    assert os.listdir(tmpdir) == []  # nothing in a shared temporary directory


# ---- peers that apply later ------------------------------------------------------------------------
class Pair:
    """acme and home, each its own / and stand-in pluto, each the other's peer, fetching from one server."""

    def __init__(self, tmp: Path, shell: list[str], grace: int = 600):
        self.tmp, self.shell = tmp, shell
        self.wan = load_sites(WAN)
        self.key = signify.generate()
        self.dist = tmp / "dist"
        self.dist.mkdir()
        self.server = Server(self.dist, tmp / "server.log")
        bin_ = tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(STUB_IPSEC)
        (bin_ / "ipsec").chmod(0o755)
        self.env = {}
        for me, peer in (("acme", "home"), ("home", "acme")):
            root = tmp / me
            enrolled(root, self.key)
            (root / "etc/wan/fetch.conf").write_text(
                f"WAN_RELEASE_URL={self.server.url}\nWAN_ROUTER={me}\nWAN_HEALTH_TIMEOUT=1\nWAN_DOWNLOADER=curl\nWAN_PEER_GRACE={grace}\n")
            (tmp / f"pluto-{me}").mkdir()
            self.env[me] = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "STUB_LOG": str(tmp / f"{me}.log"),
                            "STUB_STATE": str(tmp / f"pluto-{me}"), "STUB_ROOT": str(root),
                            "STUB_PEER": str(tmp / f"pluto-{peer}"),
                            "WAN_RELOAD_DNS": "true", "WAN_RELOAD_FIREWALL": "true"}

    def release(self, tag: str, acme: Wan, home: Wan) -> None:
        """A release whose acme bundle is rendered from `acme` and home's from `home`."""
        trees = {"acme": render_wan(acme, "test", release_env(tag, "test"))["acme"],
                 "home": render_wan(home, "test", release_env(tag, "test"))["home"]}
        build(self.wan, self.key, tag, self.dist, "test", trees=trees)
        (self.dist / "latest").write_text(tag + "\n")

    def fetch(self, me: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.shell + [str(FETCH), "--root", str(self.tmp / me)], capture_output=True, text=True,
                              env=self.env[me], timeout=120)

    def tag(self, me: str) -> str:
        return (self.tmp / me / "etc/wan/release.env").read_text().split("\n")[0].split("=")[1]

    def up(self, me: str) -> bool:
        return "acme-home" in subprocess.run(["sh", str(self.tmp / "bin/ipsec"), "whack", "--trafficstatus"], env=self.env[me],
                                             capture_output=True, text=True).stdout


@pytest.mark.parametrize("shell", [" ".join(s) for s in SHELLS])
def test_a_change_to_both_ends_converges_when_the_peer_applies_later(tmp_path, shell):
    """Two stand-in routers: v2 gives both routers new keys (no overlap), a change to both ends of
    acme-home. acme applies it, the tunnel cannot come up until home applies it too: pending, not
    rolled back. home fetches more than WAN_HEALTH_TIMEOUT later and the tunnel comes up; acme's
    next run sees its peer caught up. A release broken on one end (v3: only acme's end changed, a
    wrong key for home; home's did not) is rolled back at once."""
    p = Pair(tmp_path, shell.split())
    try:
        p.release("v1.0.0", p.wan, p.wan)
        assert p.fetch("acme").returncode == 0 and p.fetch("home").returncode == 0
        assert p.up("acme") and p.up("home")
        v2 = rekeyed(p.wan)
        p.release("v2.0.0", v2, v2)
        r = p.fetch("acme")
        assert r.returncode == 0 and "acme-home wait for their peers to apply it too" in r.stderr, r.stderr
        assert p.tag("acme") == "v2.0.0" and not p.up("acme")
        time.sleep(2.5)  # more than WAN_HEALTH_TIMEOUT=1 apart
        r = p.fetch("home")
        assert r.returncode == 0 and "applied and healthy" in r.stderr, r.stderr
        r = p.fetch("acme")
        assert r.returncode == 0 and "the peers caught up" in r.stderr, r.stderr
        assert p.up("acme") and p.tag("home") == "v2.0.0"
        assert not (tmp_path / "acme/etc/wan/releases/failed").exists()
        assert not (tmp_path / "home/etc/wan/releases/failed").exists()
        # broken on one router: only acme's end changes, home's stays: rolled back at once
        p.release("v3.0.0", with_wrong_peer_keys(v2, "acme"), v2)
        r = p.fetch("acme")
        assert r.returncode == 1 and "v3.0.0 was rolled back; v2.0.0 is installed again" in r.stderr, r.stderr
        r = p.fetch("home")
        assert r.returncode == 0 and "applied and healthy" in r.stderr, r.stderr
        assert p.up("acme") and p.up("home")
    finally:
        p.server.stop()


def test_a_peer_that_never_applies_is_given_up_after_the_grace(tmp_path):
    p = Pair(tmp_path, ["bash"], grace=1)
    try:
        p.release("v1.0.0", p.wan, p.wan)
        assert p.fetch("acme").returncode == 0 and p.fetch("home").returncode == 0
        v2 = rekeyed(p.wan)
        p.release("v2.0.0", v2, v2)
        r = p.fetch("acme")
        assert r.returncode == 0 and "wait for their peers" in r.stderr, r.stderr
        time.sleep(2.5)
        r = p.fetch("acme")
        assert r.returncode == 1, r.stderr
        assert "still down after WAN_PEER_GRACE" in r.stderr and "v2.0.0 was rolled back" in r.stderr, r.stderr
        assert p.tag("acme") == "v1.0.0" and p.up("acme")
        assert (tmp_path / "acme/etc/wan/releases/failed").read_text() == "v2.0.0\n"
    finally:
        p.server.stop()


# ---- the RELEASE file's date and expiry ------------------------------------------------------------
def test_release_date_is_the_annotated_tags_and_its_expiry_follows_wan_yaml(tmp_path):
    from release.git import tag_time
    from release.policy import release_date
    from render.errors import WanError
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True,
                   env=dict(os.environ, GIT_COMMITTER_DATE="1700000000 +0000"))
    subprocess.run(git + ["tag", "v1.4.0"], check=True)
    subprocess.run(git + ["tag", "-a", "-m", "renew", "v1.4.1", "v1.4.0^{}"], check=True,
                   env=dict(os.environ, GIT_COMMITTER_DATE="1710000000 +0000"))
    assert tag_time(repo, "v1.4.0") == 0  # lightweight: the commit's time is used
    assert tag_time(repo, "v1.4.1") == 1710000000  # the renewal carries its own date
    assert release_date(tag_time(repo, "v1.4.0"), 1700000000) == 1700000000
    assert release_date(tag_time(repo, "v1.4.1"), 1700000000) == 1710000000
    sites = tmp_path / "sites"
    shutil.copytree(WAN, sites)
    (sites / "wan.yaml").write_text((sites / "wan.yaml").read_text() + "release: {valid_days: 7}\n")
    r = build(load_sites(sites), signify.generate(), "v1.4.1", tmp_path / "dist", "abc", mtime=1700000000, date=1710000000)
    text = (r.dir / "RELEASE").read_text()
    assert "WAN_DATE=1710000000\n" in text and f"WAN_EXPIRES={1710000000 + 7 * 86400}\n" in text
    assert f"WAN_SIZE_acme={(r.dir / 'acme.tar.gz').stat().st_size}\n" in text
    with tarfile.open(r.dir / "acme.tar.gz") as t:
        own, peer = t.extractfile("peers.list").read().decode().split("\n")[0].split()[1:]
    with tarfile.open(r.dir / "home.tar.gz") as t:
        assert t.extractfile("peers.list").read().decode().split() == ["acme-home", peer, own]  # the same pair, seen from home
    (sites / "wan.yaml").write_text((sites / "wan.yaml").read_text().replace("valid_days: 7", "valid_days: 0"))
    with pytest.raises(WanError) as e:
        load_sites(sites)
    assert "wan.yaml" in str(e.value.problems[0].file) and e.value.problems[0].line > 0
