#!/usr/bin/env python3
"""Validate + render time for generated mesh WANs (a benchmark, not a test).

    .venv/bin/python benchmarks/render_bench.py [--sizes 6,50,200,500] [--repeat 3]

Each size: a sites directory with N sites (one LAN each, alternating el/openwrt), then
load_sites + render_wan + write_trees into a temporary directory, best of --repeat runs.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from render.render import render_wan, write_trees
from render.validate import load_sites


def bench_key(i: int) -> str:
    """The `key:` lines of generated site i: a public key of its own (nobody kept the private
    half), cached in ~/.cache/wan-lab/bench-keys.json since RSA generation is the slow part."""
    import json

    from lab.keys import keys_dir, stranger_key
    path = keys_dir().parent / "bench-keys.json"
    cache = json.loads(path.read_text()) if path.exists() else []
    if i >= len(cache):
        while len(cache) <= i:
            k = stranger_key()
            cache.append([k.ckaid, k.rsasigkey])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache) + "\n")
    ckaid, rsasigkey = cache[i]
    return f"  key:\n    ckaid: {ckaid}\n    rsasigkey: {rsasigkey}\n"


def generate(d: Path, n: int) -> None:
    (d / "wan.yaml").write_text(
        "name: bench\ntopology: mesh\ncrypto_profiles:\n  modern:\n    ike: [\"aes256-sha2_256;dh19\"]\n"
        "    esp: [\"aes_gcm256\"]\ndefaults:\n  crypto_profile: modern\n")
    for i in range(n):
        a, b = divmod(i, 250)
        platform = "el" if i % 2 == 0 else "openwrt"
        (d / f"s{i:04d}.yaml").write_text(
            f"name: s{i:04d}\nrouter:\n  platform: {platform}\n  libreswan: 4\n"
            f"  public_address: 198.18.{a}.{b + 1}\n  lan_address: 10.{a}.{b}.1\n{bench_key(i)}"
            f"lans: [10.{a}.{b}.0/24]\ndns:\n  domain: s{i:04d}.corp\n  server: 10.{a}.{b}.53\n"
            f"  records: {{host: 10.{a}.{b}.10}}\n")


def measure(n: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        sites.mkdir()
        generate(sites, n)
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            wan = load_sites(sites)
            t1 = time.perf_counter()
            trees = render_wan(wan, "bench")
            t2 = time.perf_counter()
            write_trees(trees, Path(tmp) / "out")
            t3 = time.perf_counter()
            runs.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        files = sum(len(t) for t in trees.values())
        best = min(runs, key=lambda x: x[3])
        return {"sites": n, "tunnels": len(wan.tunnels), "files": files, "validate_s": best[0], "render_s": best[1],
                "write_s": best[2], "total_s": best[3], "us_per_file": best[3] / files * 1e6,
                "median_total_s": statistics.median(r[3] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="6,50,200,500")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'sites':>6} {'tunnels':>8} {'files':>8} {'validate':>9} {'render':>8} {'write':>8} {'total':>8} {'us/file':>8}")
    for n in (int(x) for x in args.sizes.split(",")):
        m = measure(n, args.repeat)
        print(f"{m['sites']:>6} {m['tunnels']:>8} {m['files']:>8} {m['validate_s']:>8.2f}s {m['render_s']:>7.2f}s "
              f"{m['write_s']:>7.2f}s {m['total_s']:>7.2f}s {m['us_per_file']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
