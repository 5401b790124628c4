"""Releases: one signed, reproducible bundle per router.

dist/<tag>/
  <router>.tar.gz     the router's tree (as out/<router>/) plus etc/wan/release.env and peers.list
  RELEASE             WAN_TAG, WAN_SERIAL, WAN_REVISION, WAN_NAME, WAN_DATE (the commit's time),
                      WAN_EXPIRES (WAN_DATE + wan.yaml release.valid_days), WAN_SIZE_<router> and
                      WAN_UNPACKED_<router> (the bundle's bytes, gzipped and as tar: routers cap
                      their downloads at these)
  (each bundle also carries peers.list at its root: see with_peers())
  SHA256SUMS          sha256 of every file above ("HASH  NAME", as sha256sum writes it)
  SHA256SUMS.sig      Ed25519 signature over SHA256SUMS, usign/signify format

Same sites, key and tag give the same bytes: entries sorted, owner root, one fixed time (the
revision's commit time), gzip without name or time. Tags are vMAJOR.MINOR.PATCH; the serial
MAJOR*1000000 + MINOR*1000 + PATCH orders them for routers (POSIX sh compares integers).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths, signify
from .errors import Problem, WanError
from .model import Wan
from .render import RenderedFile, Tree, render_wan
from .secrets import MasterKey

TAG = re.compile(r"^v(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
PUBLIC_KEY = "release/wan-release.pub"  # committed: what routers trust
SECRET_ENV = "WAN_RELEASE_KEY"  # the secret key file's text, from the CI secret store
SECRET_FILE = ".wan-release.sec"  # or this git-ignored file at the repository root
PEERS_LIST = "peers.list"  # at a bundle's root, beside MANIFEST.json: read by fetch, never installed


def serial(tag: str) -> int:
    m = TAG.match(tag)
    if not m:
        raise WanError([Problem("--tag", 0, "", f"{tag!r} is not a release tag; use vMAJOR.MINOR.PATCH, each part 0-999, e.g. v1.4.0")])
    major, minor, patch = (int(x) for x in m.groups())
    return major * 1_000_000 + minor * 1_000 + patch


def release_env(tag: str, revision: str, date: int | None = None) -> str:
    """etc/wan/release.env of a bundle: fetch installs it last, as the marker of the release in use."""
    return f"WAN_TAG={tag}\nWAN_SERIAL={serial(tag)}\nWAN_REVISION={revision}\n" + (f"WAN_DATE={date}\n" if date else "")


def release_text(wan: Wan, tag: str, revision: str, date: int, bundles: dict[str, bytes]) -> bytes:
    """The RELEASE file: what a router reads (signed) before it downloads its bundle."""
    lines = [f"WAN_TAG={tag}", f"WAN_SERIAL={serial(tag)}", f"WAN_REVISION={revision}", f"WAN_NAME={wan.name}",
             f"WAN_DATE={date}", f"WAN_EXPIRES={date + wan.release_valid_days * 86400}"]
    for name in sorted(bundles):
        if name.endswith(".tar.gz"):
            r, gz = name[:-len(".tar.gz")], bundles[name]
            lines += [f"WAN_SIZE_{r}={len(gz)}", f"WAN_UNPACKED_{r}={len(gzip.decompress(gz))}"]
    return ("\n".join(lines) + "\n").encode()


def with_peers(trees: dict[str, Tree]) -> dict[str, Tree]:
    """Each tree plus `peers.list` at its root (in the bundle, never installed): one line per tunnel,
    "NAME OWN PEER", digests of this end's and the peer's conf and secret. fetch compares it with the
    installed bundle's to tell a change that needs the peer to apply the release too."""
    ends: dict[tuple[str, str], str] = {}
    for name, tree in trees.items():
        listed = tree.get(paths.TUNNELS_LIST)
        for line in (listed.content.decode().splitlines() if listed else []):
            tunnel, conf, secret = line.split()[:3]
            ends[tunnel, name] = hashlib.sha256(f"{conf} {secret}".encode()).hexdigest()[:16]
    out = {}
    for name, tree in trees.items():
        lines = [f"{t} {d} {next((e for (t2, s), e in ends.items() if t2 == t and s != name), '-')}"
                 for (t, s), d in sorted(ends.items()) if s == name]
        out[name] = dict(tree) | {PEERS_LIST: RenderedFile(("".join(x + "\n" for x in lines)).encode(), 0o644)}
    return out


def pack(tree: Tree, mtime: int) -> bytes:
    """A tree as a reproducible tar.gz: sorted, directories included, root-owned, one mtime."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({str(Path(p).parents[i]) for p in tree for i in range(len(Path(p).parents) - 1)})
        entries = [(d, None) for d in dirs] + [(p, tree[p]) for p in tree]
        for name, f in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "root", "root"
            if f is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(f.content), f.mode
                tar.addfile(info, io.BytesIO(f.content))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


@dataclass
class Release:
    tag: str
    dir: Path
    routers: list[str]
    bytes: int
    seconds: float


def build(wan: Wan, key: MasterKey, signing: signify.SecretKey, tag: str, dist: Path, revision: str,
          mtime: int = 0, trees: dict[str, Tree] | None = None, date: int | None = None) -> Release:
    """Render every router with `key`, pack, checksum and sign into dist/<tag>/ (replaced atomically).
    `trees` may be given instead of rendering (tests build deliberately broken releases this way).
    `date` (the release's date, from which it expires) defaults to `mtime` (the commit's time, so
    the same commit and tag give the same bytes), or now when that is unknown (0)."""
    t0 = time.perf_counter()
    serial(tag)
    date = date if date is not None else (mtime or int(time.time()))
    trees = trees if trees is not None else render_wan(wan, key, revision, release_env(tag, revision, date))
    files: dict[str, bytes] = {f"{name}.tar.gz": pack(tree, mtime) for name, tree in sorted(with_peers(trees).items())}
    files["RELEASE"] = release_text(wan, tag, revision, date, files)
    files.update(sign_sums(files, signing))
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / tag
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.new-", dir=dist))
    try:
        for name, b in files.items():
            (tmp / name).write_bytes(b)
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        if target.exists():
            old = dist / f".{tag}.old-{os.getpid()}"
            os.rename(target, old)
            shutil.rmtree(old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Release(tag, target, sorted(trees), sum(len(b) for b in files.values()), time.perf_counter() - t0)


def sign_sums(files: dict[str, bytes], signing: signify.SecretKey) -> dict[str, bytes]:
    """SHA256SUMS over `files` (name -> content) and its signature, as name -> content."""
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {name}\n" for name, b in sorted(files.items())).encode()
    return {"SHA256SUMS": sums, "SHA256SUMS.sig": signing.sign(sums).text(f"verify with {Path(PUBLIC_KEY).name}").encode()}


def resign(release_dir: Path, signing: signify.SecretKey) -> None:
    """Checksum and sign a release directory's files again, as they are now (the lab and the tests
    make validly signed but wrong releases this way)."""
    d = Path(release_dir)
    files = {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if not n.startswith(("SHA256SUMS", "."))}
    if "RELEASE" in files:  # the sizes it lists follow the bundles as they are now
        sizes = {}
        for n, b in files.items():
            if n.endswith(".tar.gz"):
                r = n[:-len(".tar.gz")]
                sizes[f"WAN_SIZE_{r}"], sizes[f"WAN_UNPACKED_{r}"] = len(b), len(gzip.decompress(b))
        lines = [f"{k}={sizes[k]}" if (k := line.split("=", 1)[0]) in sizes else line
                 for line in files["RELEASE"].decode().splitlines()]
        files["RELEASE"] = ("\n".join(lines) + "\n").encode()
        (d / "RELEASE").write_bytes(files["RELEASE"])
    for name, b in sign_sums(files, signing).items():
        (d / name).write_bytes(b)


def verify(release_dir: Path, public: signify.PublicKey) -> list[str]:
    """Check a release directory as a router would (signature, then every listed file); the problems."""
    d = Path(release_dir)
    problems = []
    try:
        sums = (d / "SHA256SUMS").read_bytes()
        public.verify(signify.read_signature((d / "SHA256SUMS.sig").read_text()), sums)
    except (OSError, signify.SignifyError) as e:
        return [f"{d}/SHA256SUMS.sig: {e}"]
    for line in sums.decode().splitlines():
        digest, name = line.split("  ", 1)
        try:
            if hashlib.sha256((d / name).read_bytes()).hexdigest() != digest:
                problems.append(f"{d}/{name}: does not match SHA256SUMS")
        except OSError as e:
            problems.append(f"{d}/{name}: {e.strerror}")
    return problems


# ---- keys --------------------------------------------------------------------------------------
def find_signing_key(repo: Path, file: Path | None = None) -> signify.SecretKey:
    """The release signing key: $WAN_RELEASE_KEY (CI secret store) or the ignored local file."""
    text = os.environ.get(SECRET_ENV)
    where = SECRET_ENV
    if file is not None or not text:
        path = file or repo / SECRET_FILE
        where = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise WanError([Problem(SECRET_ENV, 0, "", f"no release signing key: set {SECRET_ENV} to the text of the secret key "
                                                       f"file (CI secret store), or write it to {path} (git-ignored); "
                                                       "`./run release.keygen` makes a pair")]) from None
    try:
        return signify.read_secret(text)
    except signify.SignifyError as e:
        raise WanError([Problem(where, 0, "", f"the release signing key is unusable: {e}")]) from None


def trusted_key(repo: Path) -> signify.PublicKey:
    path = repo / PUBLIC_KEY
    try:
        return signify.read_public(path.read_text())
    except FileNotFoundError:
        raise WanError([Problem(PUBLIC_KEY, 0, "", "no trusted release key in the repository; `./run release.keygen` makes a pair "
                                                   "and writes the public half here (commit it)")]) from None
    except signify.SignifyError as e:
        raise WanError([Problem(PUBLIC_KEY, 1, "", f"{e}; restore it from git or make a new pair with release.keygen")]) from None


def keygen(repo: Path, secret_file: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    pub, sec = repo / PUBLIC_KEY, secret_file or repo / SECRET_FILE
    if not force and (pub.exists() or sec.exists()):
        raise WanError([Problem(str(pub if pub.exists() else sec), 0, "", "a release key exists already; routers trust it. "
                                "Use --force to replace it (then every router must be given the new public key)")])
    key = signify.generate()
    sec.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.text("wan release secret key (keep it in the CI secret store, never in git)"))
    pub.parent.mkdir(parents=True, exist_ok=True)
    pub.write_text(key.public.text(f"wan release public key {key.keynum.hex()}"))
    return pub, sec


def commit_time(repo: Path, revision: str) -> int:
    rev = revision.split("+")[0]
    r = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%ct", rev], capture_output=True, text=True, timeout=10)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


def tag_time(repo: Path, tag: str) -> int:
    """The date of an annotated tag (its tagger date), 0 for a lightweight or missing one. A release's
    date is this, else its commit's time: the same tag always gives the same bytes, and a new patch
    tag of the same commit (`git tag -a v1.4.1 -m renew v1.4.0^{}`) renews a release before it expires."""
    r = subprocess.run(["git", "-C", str(repo), "for-each-ref", "--format=%(objecttype) %(taggerdate:unix)", f"refs/tags/{tag}"],
                       capture_output=True, text=True, timeout=10)
    kind, _, when = r.stdout.strip().partition(" ")
    return int(when) if r.returncode == 0 and kind == "tag" and when.isdigit() else 0


def released_tags(repo: Path) -> list[str]:
    r = subprocess.run(["git", "-C", str(repo), "tag", "--list", "v*"], capture_output=True, text=True, timeout=10)
    return [t for t in r.stdout.split() if TAG.match(t)]
