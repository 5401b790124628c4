#!/usr/bin/env python3
"""Docker routers against netns routers: lab wall time for the same generated mesh WANs, split into
image, engine (restore of the saved data-root + dockerd start), containers, setup (namespaces, DNS
servers, routers up), tunnels and checks (a benchmark, not a test).

    .venv/bin/python benchmarks/docker_lab_bench.py [--sizes 3,6] [--kernel uml]

The image is built once per recipe (`./run lab.image`); a cached image costs only the check that
it is there. The lab runs one at a time (the lab lock), so the runs follow each other.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lab.run import LabRequest, run_lab

from lab_bench import generate

COLS = ("image", "engine restore", "engine start", "containers", "setup", "tunnels", "checks")


def row(n: int, routers: str, o) -> str:
    t = o.result.timings
    setup = t.get("network", 0) + t.get("dns servers", 0) + t.get("routers", 0)
    vals = [t.get("image"), t.get("engine restore"), t.get("engine start"), t.get("containers"), setup,
            t.get("tunnels"), t.get("checks")]
    cells = " ".join(f"{v:>10.1f}" if isinstance(v, (int, float)) else f"{'-':>10}" for v in vals)
    return (f"{n:>5} {routers:>7} {o.kernel:>5} {o.boot_seconds:>6.1f} {cells} {o.total_seconds:>8.1f}  "
            f"{'PASS' if o.ok else 'FAIL'} {o.result.error or ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3,6")
    ap.add_argument("--kernel", default="uml")
    ap.add_argument("--routers", default="netns,docker")
    args = ap.parse_args()
    print(f"{'sites':>5} {'routers':>7} {'kern':>5} {'boot':>6} " + " ".join(f"{c:>10}" for c in COLS) + f" {'total':>8}")
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-") as tmp:
        tmp = Path(tmp)
        for n in (int(x) for x in args.sizes.split(",") if x):
            sites = generate(tmp / f"mesh{n}", n)
            for routers in args.routers.split(","):
                o = run_lab(LabRequest(sites=sites, kernel=args.kernel, results=tmp / f"res{n}-{routers}", timeout=3600,
                                       on_line=lambda line: None, routers=routers))
                print(row(n, routers, o), flush=True)


if __name__ == "__main__":
    main()
