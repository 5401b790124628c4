"""Bundles: one signed, reproducible archive per router.

dist/<tag>/
  <router>.tar.gz     the router's tree (as out/<router>/) plus etc/wan/release.env and peers.list
  RELEASE             WAN_TAG, WAN_SERIAL, WAN_REVISION, WAN_NAME, WAN_DATE (the release's date:
                      policy.release_date), WAN_EXPIRES (policy.expires), WAN_SIZE_<router> and
                      WAN_UNPACKED_<router> (the bundle's bytes, gzipped and as tar: routers cap
                      their downloads at these)
  (each bundle also carries peers.list at its root: see with_peers())
  lab-result.json     the lab's result of the released commit (CI; release/provenance.py)
  plan.md             what changes on which router since the previous tag (CI)
  (RELEASE also names WAN_PROGRAMS, the program release routers should run: release/programs.py)
  SHA256SUMS          sha256 of every file above ("HASH  NAME", as sha256sum writes it)
  SHA256SUMS.sig      Ed25519 signature over SHA256SUMS, usign/signify format

No secret is in a bundle (the routers' public keys only), so a release may be public.
Same sites and tag give the same bytes: entries sorted, owner root, one fixed time (the
revision's commit time), gzip without name or time.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from render import paths
from render.model import Wan
from render.render import RenderedFile, Tree, render_wan

from . import signify
from .keys import PUBLIC_KEY
from .policy import expires, serial

PEERS_LIST = "peers.list"  # at a bundle's root, beside MANIFEST.json: read by fetch, never installed


def release_env(tag: str, revision: str, date: int | None = None) -> str:
    """etc/wan/release.env of a bundle: fetch installs it last, as the marker of the release in use."""
    return f"WAN_TAG={tag}\nWAN_SERIAL={serial(tag)}\nWAN_REVISION={revision}\n" + (f"WAN_DATE={date}\n" if date else "")


def release_text(wan: Wan, tag: str, revision: str, date: int, bundles: dict[str, bytes]) -> bytes:
    """The RELEASE file: what a router reads (signed) before it downloads its bundle."""
    lines = [f"WAN_TAG={tag}", f"WAN_SERIAL={serial(tag)}", f"WAN_REVISION={revision}", f"WAN_NAME={wan.name}",
             f"WAN_DATE={date}", f"WAN_EXPIRES={expires(date, wan.release_valid_days)}"]
    for name in sorted(bundles):
        if name.endswith(".tar.gz"):
            r, gz = name[:-len(".tar.gz")], bundles[name]
            lines += [f"WAN_SIZE_{r}={len(gz)}", f"WAN_UNPACKED_{r}={len(gzip.decompress(gz))}"]
    return ("\n".join(lines) + "\n").encode()


def with_peers(trees: dict[str, Tree]) -> dict[str, Tree]:
    """Each tree plus `peers.list` at its root (in the bundle, never installed): one line per tunnel,
    "NAME OWN PEER", digests of this end's and the peer's conf (which holds both ends' public keys).
    fetch compares it with the installed bundle's to tell a change that needs the peer to apply the
    release too."""
    ends: dict[tuple[str, str], str] = {}
    for name, tree in trees.items():
        listed = tree.get(paths.TUNNELS_LIST)
        for line in (listed.content.decode().splitlines() if listed else []):
            tunnel, conf = line.split()[:2]  # name conf_sha256 initiator
            ends[tunnel, name] = hashlib.sha256(conf.encode()).hexdigest()[:16]
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


def build(wan: Wan, signing: signify.SecretKey, tag: str, dist: Path, revision: str,
          mtime: int = 0, trees: dict[str, Tree] | None = None, date: int | None = None,
          extras: dict[str, bytes] | None = None, programs: int = 0) -> Release:
    """Render every router, pack, checksum and sign into dist/<tag>/ (replaced atomically).
    `trees` may be given instead of rendering (tests build deliberately broken releases this way).
    `date` (the release's date, from which it expires: policy.release_date) defaults to `mtime`
    (the commit's time, so the same commit and tag give the same bytes), or now when that is
    unknown (0). `extras` (name -> content: the lab result, the plan) are attached and listed in
    SHA256SUMS; `programs`, when set, is the program release routers should run (WAN_PROGRAMS)."""
    t0 = time.perf_counter()
    serial(tag)
    date = date if date is not None else (mtime or int(time.time()))
    trees = trees if trees is not None else render_wan(wan, revision, release_env(tag, revision, date))
    files: dict[str, bytes] = {f"{name}.tar.gz": pack(tree, mtime) for name, tree in sorted(with_peers(trees).items())}
    files["RELEASE"] = release_text(wan, tag, revision, date, files)
    if programs:
        files["RELEASE"] += f"WAN_PROGRAMS={programs}\n".encode()
    files.update(extras or {})
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
