"""The verbs behind tasks.py: each returns an exit code and prints for a person.

They take plain values: the revision of the sites and the sites at the plan's base are handed in
by tasks.py (render/ knows no version control)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .check import check_out, missing_tools
from .errors import WanError
from .graph import mermaid
from .model import Wan
from .render import render_wan, write_trees
from .validate import load_sites

REPO = Path(__file__).resolve().parent.parent


def print_problems(e: WanError, fmt: str = "text") -> int:
    for p in e.problems:
        print(p, file=sys.stderr)
        if fmt == "github":  # annotations go to stdout, where the runner reads workflow commands
            print(p.github())
    n = len(e.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found; nothing was written.", file=sys.stderr)
    return 1


def validate(sites: str, fmt: str = "text") -> int:
    try:
        wan = load_sites(sites)
    except WanError as e:
        return print_problems(e, fmt)
    print(f"{wan.source_dir}: {len(wan.sites)} sites, {len(wan.tunnels)} tunnels ({wan.topology}): valid")
    return 0


def render(sites: str, out: str, revision: str = "unknown") -> int:
    """Render every router into `out` (atomically); `revision` is stamped into each MANIFEST.
    No secret is needed: the trees hold the routers' public keys only."""
    try:
        wan = load_sites(sites)
        t0 = time.perf_counter()
        trees = render_wan(wan, revision)
        write_trees(trees, Path(out))
    except WanError as e:
        return print_problems(e)
    files = sum(len(t) for t in trees.values())
    print(f"rendered {len(trees)} routers, {len(wan.tunnels)} tunnels, {files} files into {out}/ "
          f"in {time.perf_counter() - t0:.2f} s")
    return 0


def check(sites: str, out: str, revision: str = "unknown") -> int:
    missing = missing_tools()
    if missing:
        print(f"check needs {', '.join(missing)}: run ./run check (it installs them) or "
              "apt-get install libreswan dnsmasq-base nftables util-linux", file=sys.stderr)
        return 2
    rc = render(sites, out, revision=revision)
    if rc:
        return rc
    failed = 0
    for r in check_out(Path(out)):
        print(r)
        failed += not r.ok
    print(f"{failed} check(s) failed" if failed
          else "every router's files pass ipsec addconn --checkconfig, algparse, dnsmasq --test and nft -c")
    return 1 if failed else 0


def graph(sites: str, out: str | None) -> int:
    try:
        wan: Wan = load_sites(sites)
    except WanError as e:
        return print_problems(e)
    text = mermaid(wan)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0


def plan(sites: str, base_sites: Path, base: str, fmt: str) -> int:
    """What the sites change on each router against `base_sites` (the sites as they were at `base`)."""
    from .plan import as_json, as_markdown, as_text
    from .plan import plan as make_plan
    try:
        wan, plans = make_plan(Path(base_sites), Path(sites), base)
    except WanError as e:
        return print_problems(e)
    if fmt == "text":
        from .plan import dynamic_sites
        for line in dynamic_sites(wan):
            print(f"shape {line}")
    print({"text": as_text, "json": as_json}.get(fmt, lambda p: as_markdown(wan, p, base))(plans), end="")
    return 0
