#!/usr/bin/env python3
"""Release build time (a benchmark, not a test): validate + render with the master key + pack
every router's bundle + SHA256SUMS + signature, for the example WAN and generated meshes;
and the check a router does (signature + checksum of its bundle) with signify-openbsd.

    .venv/bin/python benchmarks/release_bench.py [--sizes 50,200] [--repeat 3]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from release import signify
from release.bundle import build
from render.validate import load_sites

from render_bench import generate

REPO = Path(__file__).resolve().parent.parent


def measure(sites: Path, repeat: int) -> tuple[float, float, int, int, int]:
    signing = signify.generate()
    best = verify = float("inf")
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".bench-") as tmp:
        for i in range(repeat):
            t = time.perf_counter()
            wan = load_sites(sites)
            r = build(wan, signing, "v1.0.0", Path(tmp) / f"d{i}", "bench")
            best = min(best, time.perf_counter() - t)
        pub = Path(tmp) / "k.pub"
        pub.write_text(signing.public.text("bench"))
        one = r.dir / f"{r.routers[0]}.tar.gz"
        t = time.perf_counter()
        subprocess.run(["signify-openbsd", "-V", "-q", "-p", str(pub), "-x", str(r.dir / "SHA256SUMS.sig"),
                        "-m", str(r.dir / "SHA256SUMS")], check=True)
        subprocess.run(["sha256sum", str(one)], check=True, capture_output=True)
        verify = time.perf_counter() - t
        return best, verify, len(r.routers), len(wan.tunnels), r.bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50,200")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'WAN':>22} {'routers':>8} {'tunnels':>8} {'bytes':>12} {'build':>8} {'router check':>13}")
    rows = [("example (sites/)", REPO / "sites")]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",") if x):
            d = Path(tmp) / f"mesh{n}"
            d.mkdir()
            generate(d, n)
            rows.append((f"mesh of {n}", d))
        for label, d in rows:
            best, verify, routers, tunnels, size = measure(d, args.repeat)
            print(f"{label:>22} {routers:>8} {tunnels:>8} {size:>12,} {best:>7.2f}s {verify * 1000:>10.1f} ms", flush=True)


if __name__ == "__main__":
    main()
