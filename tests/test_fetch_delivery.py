"""fetch's delivery and trust (issue 12, items 2, 5 and 7), against release/server.py on loopback,
the real signify-openbsd and curl, under BusyBox ash and bash:

- a private GitHub repository through the REST API: the asset ids from the release's JSON (jq
  here; jsonfilter on OpenWrt is not in Debian and is not run here), `Accept:
  application/octet-stream`, the token from a root-only file, never as an argument (a recording
  `curl` wrapper on PATH logs every argv and runs the real curl), never to the storage host;
- an HTTPS mirror with a CA file of our own;
- a set of trusted release keys (signify: the key file named by the signature's key number);
- program releases: the only way the programs and the trusted keys change, signed by a program key;
- a bundle naming a key whose private half is not in the NSS database: refused before any change;
- the rollover keys pluto lost in a restart, added back by a run that finds nothing to do.
`ipsec` is test_fetch.py's stand-in (this kernel holds no SA); test_rollover_keys_with_real_pluto
drives a real pluto for the key handling.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_fetch import SHELLS, World

from release import programs, signify
from release.bundle import build
from release.programs import key_id

from support import REPO

TOKEN = "ghp_fetchTEST0123456789abcdef"
REAL_IPSEC = shutil.which("ipsec", path="/usr/local/sbin:/usr/sbin:/sbin") or "/usr/sbin/ipsec"
pytestmark = pytest.mark.skipif(not shutil.which("signify-openbsd") or not shutil.which("curl"), reason="needs signify and curl")


@pytest.fixture(params=[" ".join(s) for s in SHELLS])
def world(request, tmp_path):
    w = World(tmp_path, request.param.split(), "curl")
    # a curl that records its arguments, then is the real curl
    real = shutil.which("curl")
    (tmp_path / "bin/curl").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/curl.argv\nexec {real} "$@"\n')
    (tmp_path / "bin/curl").chmod(0o755)
    yield w
    w.server.stop()


def configure(w: World, **settings: str) -> None:
    conf = w.root / "etc/wan/fetch.conf"
    conf.write_text(conf.read_text() + "".join(f"{k}={v}\n" for k, v in settings.items()))


def api_url(w: World) -> str:
    return w.server.url.removesuffix("/releases") + "/repos/acme-corp/wan"


def private(w: World, token_mode: int = 0o600) -> None:
    (w.dist / ".private").write_text(TOKEN + "\n")
    tok = w.root / "etc/wan/token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(token_mode)
    configure(w, WAN_RELEASE_URL=api_url(w), WAN_RELEASE_API="github")


def test_a_private_github_repository_through_the_api(world):
    private(world)
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    assert world.installed_tag() == "WAN_TAG=v1.0.0"
    log = world.server.log.read_text()
    assert "GET /repos/acme-corp/wan/releases/latest" in log and "/releases/assets/" in log
    assert "release-storage:" in log and "GET /storage/v1.0.0/acme.tar.gz" in log
    assert "REFUSED a request carrying an Authorization header" not in log  # the storage host never got the token
    argv = (world.tmp / "curl.argv").read_text()
    assert TOKEN not in argv and TOKEN not in r.stderr + r.stdout  # never an argument, never logged
    assert "Accept: application/octet-stream" in argv
    # a named tag through the API too; then nothing to do
    world.release("v1.1.0", latest=False)
    r = world.fetch("--tag", "v1.1.0")
    assert r.returncode == 0 and world.installed_tag() == "WAN_TAG=v1.1.0", r.stderr
    assert "GET /repos/acme-corp/wan/releases/tags/v1.1.0" in world.server.log.read_text()


def test_a_mirror_behind_a_token_gets_it_from_curl_privately(world):
    (world.dist / ".mirror-token").write_text(TOKEN + "\n")
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 1 and "cannot download" in r.stderr, r.stderr  # 401 without the token
    tok = world.root / "etc/wan/token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(0o600)
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    argv = (world.tmp / "curl.argv").read_text()
    assert TOKEN not in argv + r.stderr and " -K " in argv


def test_a_private_repository_without_a_token_is_not_found_and_nothing_changes(world):
    private(world)
    (world.root / "etc/wan/token").unlink()
    world.release("v1.0.0")
    before = world.snapshot()
    r = world.fetch()
    assert r.returncode == 1 and "cannot download" in r.stderr and "releases/latest" in r.stderr, r.stderr
    assert world.snapshot() == before


@pytest.mark.parametrize("case, words", [
    ("group-readable token", "must belong to root with mode 0600"),
    ("token with wget", "a token or WAN_RELEASE_API=github needs curl"),
    ("token with a quote", "does not hold a token"),
    ("api unknown", "WAN_RELEASE_API must be github"),
])
def test_token_settings_that_would_leak_or_cannot_work_are_refused(world, case, words):
    private(world, 0o640 if case == "group-readable token" else 0o600)
    if case == "token with wget":
        (world.tmp / "bin/wget").symlink_to(shutil.which("busybox"))
        configure(world, WAN_DOWNLOADER="wget")
    elif case == "token with a quote":
        (world.root / "etc/wan/token").write_text('abc" -K /etc/shadow\n')
    elif case == "api unknown":
        configure(world, WAN_RELEASE_API="gitlab")
    world.release("v1.0.0")
    r = world.fetch()
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert TOKEN not in r.stderr and not (world.root / "etc/wan/release.env").exists()


def _ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A CA of our own and a certificate for 127.0.0.1 it signed (cryptography)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wan test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_an_https_mirror_with_a_ca_file_of_our_own(world):
    ca, cert, key = _ca_and_cert(world.tmp)
    world.server.stop()
    import sys
    portfile = world.tmp / "tls-port"
    proc = subprocess.Popen([sys.executable, "-m", "release.server", str(world.dist), "127.0.0.1", "0", str(portfile),
                             "--tls", str(cert), str(key)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(world.tmp / "tls.log", "w"))
    try:
        end = time.monotonic() + 20
        while not portfile.exists():
            assert proc.poll() is None and time.monotonic() < end, (world.tmp / "tls.log").read_text()
            time.sleep(0.02)
        configure(world, WAN_RELEASE_URL=f"https://127.0.0.1:{portfile.read_text().split()[0]}/releases")
        world.release("v1.0.0")
        r = world.fetch()
        assert r.returncode == 1 and "cannot download" in r.stderr, r.stderr  # the CA is not the system's
        configure(world, WAN_CA_FILE=str(ca))
        r = world.fetch()
        assert r.returncode == 0, r.stderr
        assert world.installed_tag() == "WAN_TAG=v1.0.0" and f"--cacert {ca}" in (world.tmp / "curl.argv").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_either_key_of_the_trusted_set_verifies_a_release(world):
    """Rotation with an overlap: a release signed by the second key of the set is accepted
    (signify is given the key file named by the signature's key number), one by a key outside
    the set is not."""
    # a key number with leading zero bytes: usign names its file without them ("%"PRIx64)
    second = signify.SecretKey(bytes.fromhex("00000a0b0c0d0e0f"), signify.generate().seed)
    assert key_id(second.public) == "a0b0c0d0e0f"
    (world.root / "etc/wan/keys/release" / key_id(second.public)).write_text(second.public.text("second"))
    world.release("v1.0.0", signing=second)
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    world.release("v1.1.0", signing=signify.generate())
    r = world.fetch()
    assert r.returncode == 2 and "is not signed by a trusted release key" in r.stderr and "which is not in" in r.stderr


def _program_release(world: World, serial: int, signing: signify.SecretKey, release_keys: list[signify.PublicKey],
                     marker: str = "") -> Path:
    """dist/programs-<serial>/ of this checkout's programs (reconcile with `marker` appended)."""
    repo = world.tmp / f"prog-repo-{serial}"
    (repo / "release").mkdir(parents=True)
    shutil.copytree(REPO / "router", repo / "router")
    if marker:
        with open(repo / "router/reconcile", "a") as f:
            f.write(f"# {marker}\n")
    (repo / programs.PUBLIC_KEY).write_text(signing.public.text("the key that signs this program release"))
    for i, k in enumerate(release_keys):
        (repo / f"release/wan-release{'-' + str(i) if i else ''}.pub").write_text(k.text("r"))
    return programs.build(repo, serial, world.dist, signing, "test")


def test_programs_and_trusted_keys_change_only_through_a_program_release(world):
    next_key = signify.generate()
    _program_release(world, 2, world.program_key, [world.key.public, next_key.public], marker="program release 2")
    build(world.wan, world.key, "v1.0.0", world.dist, "test", programs=2)
    (world.dist / "latest").write_text("v1.0.0\n")
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    lib = world.root / "etc/wan"
    assert "program release 2 installed" in r.stderr
    assert (lib / "reconcile").read_text().endswith("# program release 2\n")
    assert (lib / "reconcile").stat().st_mode & 0o777 == 0o755
    assert (lib / "programs.env").read_text() == "WAN_PROGRAMS_SERIAL=2\n"
    assert sorted(os.listdir(lib / "keys/release")) == sorted([key_id(world.key.public), key_id(next_key.public)])
    # a release signed by the new key now verifies (the rotation's overlap)
    world.release("v1.1.0", signing=next_key)
    assert world.fetch().returncode == 0


def test_a_stolen_release_key_cannot_install_programs(world):
    """The thief signs a program release with the release key and names it in a validly signed
    RELEASE: refused, and the programs, the keys and the WAN files stay as they were."""
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    before = world.snapshot()
    _program_release(world, 9, world.key, [world.key.public], marker="owned")
    build(world.wan, world.key, "v1.1.0", world.dist, "test", programs=9)
    (world.dist / "latest").write_text("v1.1.0\n")
    r = world.fetch()
    assert r.returncode == 2 and "programs-9 is not signed by a trusted program key" in r.stderr, r.stderr
    assert world.snapshot() == before


def test_a_router_without_the_private_key_of_its_bundle_is_refused_before_anything_changes(world):
    (world.state / "nss").write_text("0" * 40 + "\n")  # the NSS database holds another key than the site file's
    world.release("v1.0.0")
    before = world.snapshot()
    r = world.fetch()
    ckaid = world.wan.site("acme").router.key.ckaid
    assert r.returncode == 2, r.stderr
    assert f"holds no private key for ckaid {ckaid}" in r.stderr and "run /etc/wan/enrol here" in r.stderr
    assert world.snapshot() == before and not [c for c in world.calls() if "showhostkey" not in c and "--trafficstatus" not in c]


def installed_peer_keys(world, tag: str, text: str) -> None:
    """etc/wan/peer-keys.list as a release carrying `text` leaves it: the installed file, the staged
    bundle of `tag` and both files.list agree (a hand edit of the installed file alone is put back
    by the repair every current run makes)."""
    import hashlib
    digest = hashlib.sha256(text.encode()).hexdigest()
    for base in (world.root, world.root / "etc/wan/releases/bundles" / tag):
        (base / "etc/wan/peer-keys.list").write_text(text)
        fl = base / "etc/wan/files.list"
        fl.chmod(0o644)
        fl.write_text("".join(f"{digest} {line.split()[1]} {line.split()[2]}\n" if line.endswith(" etc/wan/peer-keys.list")
                              else line + "\n" for line in fl.read_text().splitlines()))


def test_rollover_keys_pluto_lost_are_added_back_when_the_release_is_current(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    peer = world.wan.site("home").router
    from lab.keys import stranger_key
    k = stranger_key()
    installed_peer_keys(world, "v1.0.0", f"{peer.ike_id} {k.ckaid} {k.rsasigkey}\n")
    r = world.fetch()  # pluto (the stand-in) holds no key: the run adds it back
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert f"ipsec whack --keyid {peer.ike_id} --addkey --pubkeyrsa {k.rsasigkey}" in world.calls(), r.stderr
    # the stand-in now holds it (and lists it as pluto 4.10 does): not added twice
    r = world.fetch()
    assert r.returncode == 0 and not [c for c in world.calls() if "--addkey" in c], r.stderr
    # a pluto restart: the conns come back from their files, the --addkey key does not
    for f in (world.state / "keys").iterdir():
        f.write_text("\n".join(x for x in f.read_text().splitlines() if x != k.rsasigkey) + "\n")
    r = world.fetch()
    assert r.returncode == 0 and "pluto lacks the rollover key" in r.stderr
    assert k.rsasigkey in (world.state / "keys" / peer.ike_id).read_text().split()


class Pluto:
    """A real pluto (Libreswan's IKE daemon) in a network namespace of its own, with its own run
    directory and NSS database: enough to hold and list public keys (this kernel has no ESP, so no
    tunnel comes up here; only the key handling is under test)."""

    def __init__(self, tmp: Path):
        import uuid
        self.ns, self.dir = f"wank2{uuid.uuid4().hex[:6]}", tmp / "pluto-real"
        (self.dir / "run").mkdir(parents=True)
        (self.dir / "nss").mkdir()
        subprocess.run(["certutil", "-N", "-d", f"sql:{self.dir}/nss", "--empty-password"], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.start()

    def start(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "/usr/libexec/ipsec/pluto", "--config", "/dev/null",
                        "--rundir", f"{self.dir}/run", "--nssdir", f"{self.dir}/nss", "--secretsfile", "/dev/null",
                        "--ipsecdir", str(self.dir), "--logfile", f"{self.dir}/pluto.log"], check=True, capture_output=True)
        end = time.monotonic() + 20
        while not (self.dir / "run/pluto.ctl").exists():
            assert time.monotonic() < end, (self.dir / "pluto.log").read_text()[-2000:]
            time.sleep(0.05)

    def stop(self) -> None:
        pid = (self.dir / "run/pluto.pid").read_text().strip()
        os.kill(int(pid), 15)
        end = time.monotonic() + 20
        while (self.dir / "run/pluto.ctl").exists() or Path(f"/proc/{pid}").exists():
            assert time.monotonic() < end
            time.sleep(0.05)

    def keys(self) -> str:
        return subprocess.run([REAL_IPSEC, "whack", "--ctlsocket", f"{self.dir}/run/pluto.ctl", "--listpubkeys"],
                              capture_output=True, text=True).stdout

    def close(self) -> None:
        try:
            self.stop()
        finally:
            subprocess.run(["ip", "netns", "del", self.ns])


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/libexec/ipsec/pluto").exists(), reason="needs root and pluto")
def test_rollover_keys_with_real_pluto_are_added_back_once_after_a_restart(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    pluto = Pluto(world.tmp)
    try:
        # the key handling goes to the real pluto; everything else stays with the stand-in
        stub = world.tmp / "bin/ipsec-stub"
        (world.tmp / "bin/ipsec").rename(stub)
        (world.tmp / "bin/ipsec").write_text(
            "#!/bin/sh\n"
            f'case "$1 $2" in "whack --listpubkeys"|"whack --keyid") echo "ipsec $*" >> "$STUB_LOG"; '
            f'shift; exec {REAL_IPSEC} whack --ctlsocket {pluto.dir}/run/pluto.ctl "$@" ;; esac\n'
            f'exec {stub} "$@"\n')
        (world.tmp / "bin/ipsec").chmod(0o755)
        from lab.keys import stranger_key
        k = stranger_key()
        peer = world.wan.site("home").router.ike_id
        installed_peer_keys(world, "v1.0.0", f"{peer} {k.ckaid} {k.rsasigkey}\n")
        kid = k.rsasigkey[2:11]

        def held() -> int:
            lines = pluto.keys().splitlines()
            return sum(1 for a, b in zip(lines, lines[1:], strict=False) if f"Key {kid} " in a and f"'{peer}'" in b)

        assert held() == 0
        for _ in range(2):  # added once, and not again by the next run
            r = world.fetch()
            assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
            assert held() == 1, pluto.keys()
        pluto.stop()  # a restart mid-rollover loses the --addkey keys
        pluto.start()
        assert held() == 0
        r = world.fetch()
        assert r.returncode == 0 and "pluto lacks the rollover key" in r.stderr, r.stderr
        assert held() == 1
    finally:
        pluto.close()


def test_a_key_set_swap_killed_half_way_is_undone_at_the_next_start(world):
    """Killed between moving the old set aside and moving the new one in: the next run puts the
    old set back before it verifies anything."""
    world.release("v1.0.0")
    keys = world.root / "etc/wan/keys"
    keys.rename(world.root / "etc/wan/keys.old")
    r = world.fetch()
    assert r.returncode == 0, r.stderr
    assert (keys / "release" / key_id(world.key.public)).exists() and not (world.root / "etc/wan/keys.old").exists()
