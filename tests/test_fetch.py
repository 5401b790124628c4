"""The router-side fetch program against a real HTTP server (loopback) serving signed releases,
verified by the real `signify-openbsd`, downloaded by curl or BusyBox wget, under BusyBox ash and
bash.

Here `ipsec` is a stand-in (pluto cannot hold tunnels on this machine's kernel): it records its
calls and plays the peer: a connection counts as established once added if each end holds the
other's public key (this router's rightrsasigkey is the peer's leftrsasigkey and the other way round).
tests/lab/test_release_lab.py runs the same program against real pluto and ESP.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.keys import stranger_key, with_wrong_peer_keys
from release import signify
from release.bundle import build, pack, release_env, resign
from release.programs import key_id
from render.render import render_wan
from render.validate import load_sites

from support import REPO

FETCH = REPO / "router" / "fetch"
WAN = REPO / "tests/lab/wans/two"
SHELLS = [s for s in (["busybox", "sh"], ["bash"]) if shutil.which(s[0])]
DOWNLOADERS = [d for d in ("curl", "wget") if shutil.which("curl" if d == "curl" else "busybox")]
pytestmark = pytest.mark.skipif(not shutil.which("signify-openbsd"), reason="needs signify-openbsd (./run installs it)")


STUB_IPSEC = """#!/bin/sh
# stand-in for ipsec (see the module's docstring)
echo "ipsec $*" >> "$STUB_LOG"
case "$1" in
  showhostkey) echo "< 1> RSA keyid: AwEAAstub ckaid: $STUB_CKAID" ;;
  whack)
    case "$2" in
      --listpubkeys) cat "$STUB_PUBKEYS" 2>/dev/null ;;
      --trafficstatus) for f in "$STUB_STATE"/*; do [ -e "$f" ] && echo "006 #2: \\"${f##*/}\\", type=ESP, add_time=1, inBytes=0, outBytes=0, id='x'"; done ;;
      --delete) rm -f "$STUB_STATE/$4" ;;
    esac ;;
  auto|add)
    [ "$1" = auto ] && n=$3 || n=$2
    key() { sed -n "s/^[[:space:]]*$2=//p" "$1"; }
    mine=$STUB_ROOT/etc/ipsec.d/$n.conf peer=$STUB_PEERS/$n.conf
    if [ "$(key "$mine" leftrsasigkey)" = "$(key "$peer" rightrsasigkey)" ] && \
       [ "$(key "$mine" rightrsasigkey)" = "$(key "$peer" leftrsasigkey)" ]; then : > "$STUB_STATE/$n"; fi ;;
esac
exit 0
"""


class Server:
    """release/server.py on 127.0.0.1 (a free port); restartable (a test makes it die)."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log, self.proc = root, log, None
        self.start()

    def start(self) -> None:
        portfile = self.root.parent / "port"
        portfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "release.server", str(self.root), "127.0.0.1", "0", str(portfile)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        end = time.monotonic() + 20
        while not portfile.exists():
            assert self.proc.poll() is None and time.monotonic() < end, self.log.read_text()
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{portfile.read_text().split()[0]}/releases"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        if self.proc:
            self.proc.wait(timeout=10)


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
        (self.root / "etc/wan/keys/release").mkdir(parents=True)
        (self.root / "etc/wan/keys/programs").mkdir(parents=True)
        # as enrol --install leaves it: the trusted key set and the programs (bundles carry none)
        (self.root / "etc/wan/keys/release" / key_id(self.key.public)).write_text(self.key.public.text("test key"))
        self.program_key = signify.generate()
        (self.root / "etc/wan/keys/programs" / key_id(self.program_key.public)).write_text(self.program_key.public.text("p"))
        for name in ("reconcile", "fetch", "enrol"):
            shutil.copy(REPO / "router" / name, self.root / "etc/wan" / name)
        conf = [f"WAN_RELEASE_URL={self.server.url}", "WAN_ROUTER=acme", "WAN_HEALTH_TIMEOUT=3", "WAN_FETCH_TIMEOUT=10",
                f"WAN_DOWNLOADER={downloader}", "WAN_KEEP=2"]
        (self.root / "etc/wan/fetch.conf").write_text("\n".join(conf) + "\n")
        bin_ = tmp / "bin"
        bin_.mkdir()
        (bin_ / "ipsec").write_text(STUB_IPSEC)
        (bin_ / "ipsec").chmod(0o755)
        if downloader == "wget":  # BusyBox's, as on OpenWrt
            (bin_ / "wget").symlink_to(shutil.which("busybox"))
        self.state = tmp / "pluto"
        self.state.mkdir()
        self.peers = tmp / "peers"  # what home (the peer) holds: the good release's conns (and keys)
        self.peers.mkdir()
        for p, f in render_wan(self.wan)["home"].items():
            if p.endswith(".conf") and "/ipsec.d/" in p:
                (self.peers / Path(p).name).write_bytes(f.content)
        self.log = tmp / "ipsec.log"
        self.env = {"PATH": f"{bin_}:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp), "STUB_LOG": str(self.log),
                    "STUB_STATE": str(self.state), "STUB_ROOT": str(self.root), "STUB_PEERS": str(self.peers),
                    "WAN_RELOAD_DNS": "true", "WAN_RELOAD_FIREWALL": "true",
                    "STUB_CKAID": self.wan.site("acme").router.key.ckaid, "STUB_PUBKEYS": str(tmp / "pubkeys")}

    def release(self, tag: str, signing: signify.SecretKey | None = None, latest: bool = True, trees=None) -> Path:
        r = build(self.wan, signing or self.key, tag, self.dist, "test", trees=trees)
        if latest:
            (self.dist / "latest").write_text(tag + "\n")
        return r.dir

    def fetch(self, *args: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        return subprocess.run(self.shell + [str(FETCH), "--root", str(self.root), *args],
                              capture_output=True, text=True, env=self.env, timeout=120)

    def snapshot(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file()} | {"pluto": " ".join(sorted(x.name for x in self.state.iterdir()))}

    def installed_tag(self) -> str:
        return (self.root / "etc/wan/release.env").read_text().split("\n")[0]

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
    assert "v1.0.0 verified (signature, checksums, router)" in r.stderr and "applied and healthy" in r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"
    assert (world.root / "etc/ipsec.d/acme-home.conf").exists()
    assert (world.root / "etc/ipsec.d/acme-home.conf").stat().st_mode & 0o777 == 0o644
    assert not list(world.root.rglob("*.secrets"))
    assert "ipsec auto --add acme-home" in world.calls()
    assert (world.state / "acme-home").exists()  # the stand-in peer accepted its key
    r = world.fetch()
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert world.calls() == []  # no ipsec command at all


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
        assert not [c for c in world.calls() if "--trafficstatus" not in c]  # pluto untouched

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
    assert "not up after 3 s: acme-home" in r.stderr and "rolling back to v1.0.0" in r.stderr
    assert "v1.1.0 was rolled back; v1.0.0 is installed again and its tunnels are up" in r.stderr
    now = world.snapshot()
    changed = {k for k in good.keys() | now.keys() if good.get(k) != now.get(k)}
    # the router's files are v1.0.0's again; what differs is fetch's own record and the kept bundle
    assert all(k.startswith("etc/wan/releases/") or k.startswith("etc/wan/previous/") for k in changed), changed
    assert (world.state / "acme-home").exists()
    # cron runs again: the failed release is not retried by itself
    r = world.fetch()
    assert r.returncode == 1 and "v1.1.0 was rolled back here before" in r.stderr and world.calls() == []


def test_only_the_newest_bundles_are_kept(world):
    for tag in ("v1.0.0", "v1.1.0", "v1.2.0"):
        world.release(tag)
        assert world.fetch().returncode == 0
    assert sorted(os.listdir(world.root / "etc/wan/releases/bundles")) == ["v1.1.0", "v1.2.0"]


def test_bundles_are_reproducible_and_verify_with_signify(tmp_path):
    wan = load_sites(WAN)
    key = signify.generate()
    a = build(wan, key, "v1.0.0", tmp_path / "a", "abc", mtime=1700000000).dir
    b = build(wan, key, "v1.0.0", tmp_path / "b", "abc", mtime=1700000000).dir
    assert sorted(os.listdir(a)) == ["RELEASE", "SHA256SUMS", "SHA256SUMS.sig", "acme.tar.gz", "home.tar.gz"]
    for n in os.listdir(a):
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    (tmp_path / "k.pub").write_text(key.public.text("k"))
    v = subprocess.run(["signify-openbsd", "-V", "-p", str(tmp_path / "k.pub"), "-x", str(a / "SHA256SUMS.sig"), "-m", str(a / "SHA256SUMS")],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=a).returncode == 0
    # the bundle: the rendered tree plus release.env, root-owned, modes kept
    t = subprocess.run(["tar", "-tvzf", str(a / "acme.tar.gz")], capture_output=True, text=True).stdout
    assert "-rw-r--r-- root/root" in next(line for line in t.splitlines() if line.endswith("acme-home.conf"))
    assert "etc/wan/fetch" not in t and "etc/wan/reconcile" not in t  # programs come only from a program release
    assert "etc/wan/release.env" in t and ".secrets" not in t
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
    stranger = stranger_key().rsasigkey
    for p in world.peers.iterdir():
        p.write_text(re.sub(r"(?m)^\trightrsasigkey=.*$", "\trightrsasigkey=" + stranger, p.read_text()))
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 3 and "not up after 3 s: acme-home" in r.stderr, r.stderr
    assert "no previous bundle to go back to" in r.stderr
