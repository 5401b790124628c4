#!/usr/bin/env python3
"""Lab wall time for generated mesh WANs, split into boot / setup / tunnels / checks
(a benchmark, not a test). Also: a seventh site added by reconcile versus a restart of IPsec
on every router, on the 6-site WAN; or, with --change-size N, a site N+1 added to a mesh of N.

    .venv/bin/python benchmarks/lab_bench.py [--sizes 2,6,12,24] [--kernel uml] [--change]
        [--change-size N] [--change-modes reconcile,restart] [--keep DIR]

--keep DIR keeps the generated sites and every lab's results (result.json, diagnostics) in DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from lab.run import LabRequest, run_lab

from render_bench import bench_key


def generate(d: Path, n: int) -> Path:
    d.mkdir(parents=True)
    (d / "wan.yaml").write_text(
        "name: bench\ntopology: mesh\ncrypto_profiles:\n  modern:\n    ike: [\"aes256-sha2_256;dh19\"]\n"
        "    esp: [\"aes_gcm256\"]\ndefaults:\n  crypto_profile: modern\n")
    for i in range(n):
        (d / f"s{i:02d}.yaml").write_text(
            f"name: s{i:02d}\nrouter:\n  platform: {'el' if i % 3 else 'openwrt'}\n  libreswan: 4\n"
            f"  public_address: 198.18.0.{i + 1}\n  lan_address: 10.{i}.0.1\n{bench_key(i)}"
            f"lans: [10.{i}.0.0/24]\ndns:\n  domain: s{i:02d}.corp\n  server: 10.{i}.0.53\n"
            f"  records: {{host: 10.{i}.0.10}}\n")
    return d


def row(label: str, o) -> str:
    t = o.result.timings
    setup = t.get("network", 0) + t.get("dns servers", 0) + t.get("routers", 0)
    return (f"{label:>24} {o.kernel:>5} {o.boot_seconds:>6.1f} {setup:>7.1f} {t.get('tunnels', 0):>8.1f} "
            f"{t.get('checks', 0):>7.1f} {o.total_seconds:>7.1f}  {'PASS' if o.ok else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2,6,12")
    ap.add_argument("--kernel", default="uml")
    ap.add_argument("--change", action="store_true", help="also reconcile vs restart on the example WAN")
    ap.add_argument("--change-size", type=int, metavar="N",
                    help="with --change: a mesh of N sites, then N+1 (instead of the 6-site example + zurich)")
    ap.add_argument("--change-modes", default="reconcile,restart", help="with --change: which ways to apply it")
    ap.add_argument("--keep", metavar="DIR", help="keep sites and results in DIR (default: a scratch directory, removed)")
    ap.add_argument("--progress", action="store_true", help="the labs' progress lines on stderr")
    args = ap.parse_args()
    quiet = (lambda line: print(line.rstrip(), file=sys.stderr, flush=True)) if args.progress else (lambda line: None)
    print(f"{'WAN':>24} {'kern':>5} {'boot':>6} {'setup':>7} {'tunnels':>8} {'checks':>7} {'total':>7}")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        Path(args.keep).mkdir(parents=True)
        scratch = contextlib.nullcontext(args.keep)
    else:
        scratch = tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-")
    with scratch as tmp:
        tmp = Path(tmp)
        for n in (int(x) for x in args.sizes.split(",") if x):
            o = run_lab(LabRequest(sites=generate(tmp / f"mesh{n}", n), kernel=args.kernel, results=tmp / f"res{n}", timeout=3600,
                                  on_line=quiet))
            print(row(f"mesh of {n} ({n * (n - 1) // 2} tunnels)", o), flush=True)
        if args.change:
            repo = Path(__file__).resolve().parent.parent
            if args.change_size:
                n = args.change_size
                before, after = generate(tmp / f"chg{n}-before", n), generate(tmp / f"chg{n}-after", n + 1)
                what = f"site {n + 1} to the {n}-site mesh"
            else:
                before, after = repo / "sites", tmp / "seven"
                shutil.copytree(repo / "sites", after)
                text = (after / "rome.yaml").read_text()
                (after / "zurich.yaml").write_text(text.replace("name: rome", "name: zurich")
                                                   .replace("203.0.113.60", "203.0.113.70")
                                                   .replace("10.5.0", "10.6.0").replace("rome.acme.it", "zurich.acme.ch"))
                what = "a 7th site"
            for mode in (m for m in args.change_modes.split(",") if m):
                o = run_lab(LabRequest(sites=before, kernel=args.kernel, results=tmp / f"chg-{mode}", timeout=3600, on_line=quiet,
                                       scenarios=(("change", {"to": [str(after)], "mode": mode}),)))
                c = (o.result.scenarios.get("change") or {"steps": [{}]})["steps"][0]
                routers = c.get("routers", {})
                print(row(f"{mode}: lab", o), flush=True)
                print(f"add {what} by {mode}: change {c.get('seconds')} s; unrelated SAs disturbed "
                      f"{len(c.get('disturbed', []))}/{c.get('unchanged_tunnels')}; stream {c.get('stream')}; per router "
                      + ", ".join(f"{n} {r['seconds']} s (new tunnels up at +{r['until_new_tunnels_up']} s)"
                                  for n, r in sorted(routers.items())),
                      flush=True)


if __name__ == "__main__":
    main()
