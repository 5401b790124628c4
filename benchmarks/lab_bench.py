#!/usr/bin/env python3
"""Lab wall time for generated mesh WANs, split into boot / setup / tunnels / checks
(a benchmark, not a test). Also: a seventh site added by reconcile versus a restart of IPsec
on every router, on the 6-site WAN.

    .venv/bin/python benchmarks/lab_bench.py [--sizes 2,6,12,24] [--kernel uml] [--change]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.run import run_lab  # noqa: E402


def generate(d: Path, n: int) -> Path:
    d.mkdir(parents=True)
    (d / "wan.yaml").write_text(
        "name: bench\ntopology: mesh\ncrypto_profiles:\n  modern:\n    ike: [\"aes256-sha2_256;dh19\"]\n"
        "    esp: [\"aes_gcm256\"]\ndefaults:\n  crypto_profile: modern\n")
    for i in range(n):
        (d / f"s{i:02d}.yaml").write_text(
            f"name: s{i:02d}\nrouter:\n  platform: {'el' if i % 3 else 'openwrt'}\n  libreswan: 4\n"
            f"  public_address: 198.18.0.{i + 1}\n  lan_address: 10.{i}.0.1\n"
            f"lans: [10.{i}.0.0/24]\ndns:\n  domain: s{i:02d}.corp\n  server: 10.{i}.0.53\n"
            f"  records: {{host: 10.{i}.0.10}}\n")
    return d


def row(label: str, o) -> str:
    t = o.result.get("timings", {})
    setup = t.get("network", 0) + t.get("dns servers", 0) + t.get("routers", 0)
    return (f"{label:>24} {o.kernel:>5} {o.boot_seconds:>6.1f} {setup:>7.1f} {t.get('tunnels', 0):>8.1f} "
            f"{t.get('checks', 0):>7.1f} {o.total_seconds:>7.1f}  {'PASS' if o.ok else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2,6,12")
    ap.add_argument("--kernel", default="uml")
    ap.add_argument("--change", action="store_true", help="also reconcile vs restart on the example WAN")
    args = ap.parse_args()
    print(f"{'WAN':>24} {'kern':>5} {'boot':>6} {'setup':>7} {'tunnels':>8} {'checks':>7} {'total':>7}")
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-") as tmp:
        tmp = Path(tmp)
        for n in (int(x) for x in args.sizes.split(",") if x):
            o = run_lab(generate(tmp / f"mesh{n}", n), args.kernel, tmp / f"res{n}", timeout=3600, on_line=lambda l: None)
            print(row(f"mesh of {n} ({n * (n - 1) // 2} tunnels)", o), flush=True)
        if args.change:
            repo = Path(__file__).resolve().parent.parent
            seven = tmp / "seven"
            shutil.copytree(repo / "sites", seven)
            text = (seven / "rome.yaml").read_text()
            (seven / "zurich.yaml").write_text(text.replace("name: rome", "name: zurich").replace("203.0.113.60", "203.0.113.70")
                                               .replace("10.5.0", "10.6.0").replace("rome.acme.it", "zurich.acme.ch"))
            for mode in ("reconcile", "restart"):
                o = run_lab(repo / "sites", args.kernel, tmp / f"chg-{mode}", timeout=3600, on_line=lambda l: None,
                            change_to=seven, change_mode=mode)
                c = o.result.get("change") or {}
                routers = c.get("routers", {})
                print(f"add a 7th site by {mode}: change {c.get('seconds')} s; unrelated SAs disturbed "
                      f"{len(c.get('disturbed', []))}/{c.get('unchanged_tunnels')}; stream {c.get('stream')}; per router "
                      + ", ".join(f"{n} {r['seconds']} s (new tunnels up at +{r['until_new_tunnels_up']} s)" for n, r in sorted(routers.items())),
                      flush=True)


if __name__ == "__main__":
    main()
