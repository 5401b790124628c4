#!/usr/bin/env python3
"""From a router's fetch start to its new tunnels carrying traffic, in the lab (a benchmark, not
a test): routers start with their enrolment only and fetch a signed release from a server inside
the lab, one after the other (responders first); for each, the fetch itself (download, signature,
checksums, reconcile, health) and the time until a ping from its LAN crossed every tunnel it
initiates.

    .venv/bin/python benchmarks/release_lab_bench.py [--sites sites] [--kernel uml]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from lab.run import LabRequest, run_lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="sites")
    ap.add_argument("--kernel", default="uml")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-") as tmp:
        o = run_lab(LabRequest(sites=Path(args.sites), kernel=args.kernel, results=Path(tmp) / "res", timeout=3600,
                               on_line=lambda line: None, scenarios=(("release", {"negatives": False}),)))
    enrol = o.result.scenarios.get("release", {}).get("enrol", {})
    print(f"{'router':>10} {'fetch':>8} {'until traffic':>14}")
    for name, e in enrol.items():
        t = e["until_traffic"]
        print(f"{name:>10} {e['fetch_seconds']:>7.1f}s {(f'{t:.1f}s' if t is not None else 'NONE'):>14}")
    fetches = [e["fetch_seconds"] for e in enrol.values()]
    if fetches:
        print(f"fetch: median {statistics.median(fetches):.1f} s, max {max(fetches):.1f} s; lab {'PASS' if o.ok else 'FAIL'} "
              f"in {o.total_seconds:.1f} s ({o.kernel})")
    else:
        print(f"no release data: {o.result.error}")


if __name__ == "__main__":
    main()
