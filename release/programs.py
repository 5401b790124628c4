"""The router programs' own channel: `fetch`, `reconcile` and `enrol` reach routers only in a
program release signed by the program key, which never goes to CI (a stolen release signing key
then cannot run code as root on the routers: the installed reconcile applies bundles, and refuses
any path outside the WAN's own files).

dist/programs-<N>/ (published as a GitHub release tagged programs-<N>, not marked latest)
  fetch, reconcile, enrol, openwrt-*  the programs (router/)
  release-key-<id>.pub               every trusted release signing key (release/wan-release*.pub)
  programs-key-<id>.pub              every trusted program key (release/wan-programs*.pub)
  PROGRAMS                           WAN_PROGRAMS_SERIAL=<N>, WAN_REVISION
  SHA256SUMS, SHA256SUMS.sig         signed by a program key

<id> is the key number as usign names the files of a key directory (`usign -V -P DIR` opens
DIR/<key number as %PRIx64>: openwrt/usign main.c, verify()), so the router installs them as
/etc/wan/keys/{release,programs}/<id> and verifies with `usign -P` or, with signify, picks the file
named by the signature's key number. Two keys in a set give an overlap for rotating either.
release/programs.env names the program release the WAN's releases expect (RELEASE carries it as
WAN_PROGRAMS; fetch installs that program release when it is newer than its own).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from render.errors import Problem, WanError

from . import signify
from .bundle import sign_sums

# every program (router/fetch and router/enrol PROGRAM_FILES name the same); the OpenWrt helpers go to
# every router (one program release for all platforms: render/paths.py PROGRAMS)
PROGRAMS = ("fetch", "reconcile", "enrol", "openwrt-dns", "openwrt-init", "openwrt-sourceip", "openwrt-23.05-ipsec")
PUBLIC_GLOB = "release/wan-programs*.pub"  # committed: the program keys routers trust
RELEASE_GLOB = "release/wan-release*.pub"  # committed: the release keys routers trust
PUBLIC_KEY = "release/wan-programs.pub"
SECRET_FILE = ".wan-programs.sec"  # git-ignored; kept offline, never in CI (no environment variable is read)
PROGRAMS_ENV = "release/programs.env"  # WAN_PROGRAMS_SERIAL=N: the program release the WAN's releases name
CI_VARIABLES = ("CI", "GITHUB_ACTIONS")


def key_id(key: signify.PublicKey) -> str:
    """The file name usign -P looks for: the key number as a hexadecimal integer, no leading zeros."""
    return format(int.from_bytes(key.keynum, "big"), "x")


def trusted(repo: Path, pattern: str) -> list[signify.PublicKey]:
    """Every committed public key matching `pattern` (a set: two during a rotation)."""
    keys = []
    for p in sorted(repo.glob(pattern)):
        try:
            keys.append(signify.read_public(p.read_text()))
        except signify.SignifyError as e:
            raise WanError([Problem(str(p.relative_to(repo)), 1, "", f"{e}; restore it from git")]) from None
    return keys


def current_serial(repo: Path) -> int:
    """The program serial of release/programs.env (0 when there is none yet)."""
    try:
        m = re.search(r"(?m)^WAN_PROGRAMS_SERIAL=(\d+)$", (repo / PROGRAMS_ENV).read_text())
    except FileNotFoundError:
        return 0
    return int(m.group(1)) if m else 0


def refuse_in_ci() -> str | None:
    if any(os.environ.get(v) for v in CI_VARIABLES):
        return ("the program key is never used in CI (a stolen CI secret must not reach the routers' programs): "
                "make program releases on the offline machine that holds " + SECRET_FILE)
    return None


def keygen(repo: Path, force: bool = False) -> tuple[Path, Path]:
    """A program key pair: .wan-programs.sec (0600, keep it offline) and release/wan-programs.pub."""
    pub, sec = repo / PUBLIC_KEY, repo / SECRET_FILE
    if not force and (pub.exists() or sec.exists()):
        raise WanError([Problem(str(pub if pub.exists() else sec), 0, "", "a program key exists already; routers trust it. "
                                "To rotate, make the new pair elsewhere and commit it as release/wan-programs-2.pub "
                                "(an overlap), or use --force")])
    key = signify.generate()
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.text("wan program secret key (offline only: never in CI or git)"))
    pub.write_text(key.public.text(f"wan program public key {key.keynum.hex()}"))
    return pub, sec


def signing_key(repo: Path, file: Path | None = None) -> signify.SecretKey:
    path = file or repo / SECRET_FILE
    try:
        return signify.read_secret(path.read_text())
    except FileNotFoundError:
        raise WanError([Problem(str(path), 0, "", "no program signing key; it lives offline (./run programs.keygen made it): "
                                                 "pass --key FILE")]) from None
    except signify.SignifyError as e:
        raise WanError([Problem(str(path), 0, "", f"the program signing key is unusable: {e}")]) from None


def build(repo: Path, serial: int, dist: Path, signing: signify.SecretKey, revision: str) -> Path:
    """dist/programs-<serial>/, signed by `signing` (which must be a trusted program key)."""
    program_keys = trusted(repo, PUBLIC_GLOB)
    release_keys = trusted(repo, RELEASE_GLOB)
    if signing.public not in program_keys:
        raise WanError([Problem(PUBLIC_KEY, 0, "", f"the program signing key ({signing.keynum.hex()}) is not one of the "
                                                   "committed program keys: routers would refuse it")])
    if not release_keys:
        raise WanError([Problem("release/wan-release.pub", 0, "", "no release key to trust; ./run release.keygen")])
    files = {name: (repo / "router" / name).read_bytes() for name in PROGRAMS}
    files |= {f"release-key-{key_id(k)}.pub": k.text(f"wan release public key {k.keynum.hex()}").encode() for k in release_keys}
    files |= {f"programs-key-{key_id(k)}.pub": k.text(f"wan program public key {k.keynum.hex()}").encode() for k in program_keys}
    files["PROGRAMS"] = f"WAN_PROGRAMS_SERIAL={serial}\nWAN_REVISION={revision}\n".encode()
    files.update(sign_sums(files, signing))
    target = dist / f"programs-{serial}"
    dist.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".programs-{serial}.new-", dir=dist))
    try:
        for name, b in files.items():
            (tmp / name).write_bytes(b)
            os.chmod(tmp / name, 0o755 if name in PROGRAMS else 0o644)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def digest(release_dir: Path) -> str:
    """The sha256 of a program release's SHA256SUMS: what a person compares on a new router."""
    return hashlib.sha256((release_dir / "SHA256SUMS").read_bytes()).hexdigest()
