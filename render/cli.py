"""The verbs behind tasks.py: each returns an exit code and prints for a person."""
from __future__ import annotations

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


def _errors(e: WanError) -> int:
    for p in e.problems:
        print(p, file=sys.stderr)
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


def validate(sites: str) -> int:
    try:
        wan = load_sites(sites)
    except WanError as e:
        return _errors(e)
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
