"""The verbs behind tasks.py: each returns an exit code and prints for a person."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .check import check_out, missing_tools
from .errors import WanError
from .graph import mermaid
from .model import Wan
from .render import render_wan, write_trees
from .secrets import MasterKey, find_master, lab_key
from .validate import load_sites

REPO = Path(__file__).resolve().parent.parent


def _errors(e: WanError, fmt: str = "text") -> int:
    for p in e.problems:
        print(p, file=sys.stderr)
        if fmt == "github":  # annotations go to stdout, where the runner reads workflow commands
            print(p.github())
    n = len(e.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found; nothing was written.", file=sys.stderr)
    return 1


def revision(sites: Path) -> str:
    """The git revision of the sites directory, with '+dirty' when it has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "-C", str(sites), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(sites), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def validate(sites: str, fmt: str = "text") -> int:
    try:
        wan = load_sites(sites)
    except WanError as e:
        return _errors(e, fmt)
    print(f"{wan.source_dir}: {len(wan.sites)} sites, {len(wan.tunnels)} tunnels ({wan.topology}): valid")
    return 0


def render(sites: str, out: str, lab_secrets: bool = False, key: MasterKey | None = None) -> int:
    try:
        wan = load_sites(sites)
        key = key or (lab_key() if lab_secrets else find_master(REPO))
        t0 = time.perf_counter()
        trees = render_wan(wan, key, revision(Path(sites)))
        write_trees(trees, Path(out))
    except WanError as e:
        return _errors(e)
    files = sum(len(t) for t in trees.values())
    print(f"rendered {len(trees)} routers, {len(wan.tunnels)} tunnels, {files} files into {out}/ "
          f"in {time.perf_counter() - t0:.2f} s (secrets: {key.origin})")
    return 0


def check(sites: str, out: str) -> int:
    missing = missing_tools()
    if missing:
        print(f"check needs {', '.join(missing)}: run ./run check (it installs them) or apt-get install libreswan dnsmasq-base nftables util-linux", file=sys.stderr)
        return 2
    rc = render(sites, out, lab_secrets=True)
    if rc:
        return rc
    failed = 0
    for r in check_out(Path(out)):
        print(r)
        failed += not r.ok
    print(f"{failed} check(s) failed" if failed else "every router's files pass ipsec addconn --checkconfig, algparse, dnsmasq --test and nft -c")
    return 1 if failed else 0


def graph(sites: str, out: str | None) -> int:
    try:
        wan: Wan = load_sites(sites)
    except WanError as e:
        return _errors(e)
    text = mermaid(wan)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0


def plan(sites: str, base: str | None, fmt: str) -> int:
    from .plan import as_json, as_markdown, as_text, plan as make_plan
    if base is None:
        r = subprocess.run(["git", "merge-base", "HEAD", "main"], capture_output=True, text=True)
        base = r.stdout.strip() or "HEAD"
    try:
        wan, plans = make_plan(base, Path(sites))
    except WanError as e:
        return _errors(e)
    except subprocess.CalledProcessError as e:
        print(f"cannot read the sites at {base}: {e.stderr.decode(errors='replace').strip() if e.stderr else e}", file=sys.stderr)
        return 2
    print({"text": as_text, "json": as_json}.get(fmt, lambda p: as_markdown(wan, p, base))(plans), end="")
    return 0


def release(sites: str, tag: str, dist: str, allow_dirty: bool = False, allow_older: bool = False) -> int:
    from . import release as rel
    try:
        n = rel.serial(tag)
        wan = load_sites(sites)
        rev = revision(Path(sites))
        tracked = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True).stdout.strip()
        if (rev.endswith("+dirty") or tracked) and not allow_dirty:
            print(f"uncommitted changes ({sites} or the templates and programs): a release must come from a commit "
                  "so it can be rebuilt byte for byte (commit them, or --allow-dirty for a try-out)", file=sys.stderr)
            return 1
        if tracked and not rev.endswith("+dirty"):
            rev += "+dirty"
        newer = [t for t in rel.released_tags(REPO) if t != tag and rel.serial(t) > n]
        if newer and not allow_older:
            print(f"--tag {tag}: older than {max(newer, key=rel.serial)}, released already; routers refuse a downgrade, "
                  "so tags must grow (or --allow-older)", file=sys.stderr)
            return 1
        trusted = rel.trusted_key(REPO)
        signing = rel.find_signing_key(REPO)
        if signing.public != trusted:
            print(f"the signing key ({signing.keynum.hex()}) is not the one in {rel.PUBLIC_KEY} ({trusted.keynum.hex()}): "
                  "routers would refuse this release. Use the matching key, or commit its public half.", file=sys.stderr)
            return 1
        key = find_master(REPO)
        mtime = rel.commit_time(REPO, rev)
        r = rel.build(wan, key, signing, tag, Path(dist), rev, mtime, date=rel.tag_time(REPO, tag) or mtime or None)
    except WanError as e:
        return _errors(e)
    problems = rel.verify(r.dir, trusted)
    verifier = shutil.which("signify-openbsd") or shutil.which("signify")
    if verifier and not problems:
        v = subprocess.run([verifier, "-V", "-q", "-p", str(REPO / rel.PUBLIC_KEY), "-x", str(r.dir / "SHA256SUMS.sig"),
                            "-m", str(r.dir / "SHA256SUMS")], capture_output=True, text=True)
        if v.returncode:
            problems.append(f"{Path(verifier).name}: {v.stderr.strip()}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"released {tag} (serial {n}, revision {rev}): {len(r.routers)} router bundles, {r.bytes:,} bytes, in {r.seconds:.2f} s "
          f"-> {r.dir}/ (signed by key {signing.keynum.hex()}; verified{' with ' + Path(verifier).name if verifier else ''})")
    return 0


def keygen(force: bool = False) -> int:
    from . import release as rel
    try:
        pub, sec = rel.keygen(REPO, force=force)
    except WanError as e:
        return _errors(e)
    print(f"wrote {pub} (commit it: routers trust this key) and {sec} (secret, git-ignored: put its text into the "
          f"CI secret store as {rel.SECRET_ENV}, then keep it offline)")
    return 0
