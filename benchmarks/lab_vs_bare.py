#!/usr/bin/env python3
"""The lab against a hand-built mesh, side by side in one benchmark run (a benchmark, not a test).

Each round runs, one lab kernel at a time (the machine lock held throughout):
  1. the bare mesh (benchmarks/bare_mesh.sh N) in User-Mode Linux through the project's launcher;
  2. `./run lab` on the example WAN (or --sites) on the same kernel, with the router start mode(s) asked for.
It prints every run, then the median of each and the ratio lab / bare.

    .venv/bin/python benchmarks/lab_vs_bare.py [--rounds 3] [--kernel uml] [--sites sites] [--starts gated,serial]
        [--bare-sites 6] [--no-bare] [--before DIR] [--uml debian13,host]

--uml: which User-Mode Linux builds to measure, each with its bare mesh and its lab in every round
(lab/uml.py: Debian 13's, the default; `host`: the host's package, $WAN_LAB_UML=host).
"core" is the lab without the scenarios it plays after its proofs' set-up (boot plus network, DNS
servers, routers, tunnels and checks): the example's dynamic site adds the NAT scenario (`nat`), a
wait for liveness after its outside address changes, reported on its own.

--before DIR: also run the lab of another checkout (e.g. `git archive <commit> | tar -x -C DIR`) in
the same rounds, through its own run_lab(sites, kernel, results) (the API before LabRequest).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lab import kernels
from lab.run import LabRequest, run_lab
from lab.substrate import one_lab_at_a_time

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHASES = ("network", "dns servers", "routers", "tunnels", "checks")


def bare(kind: str, n: int, share: Path) -> tuple[float, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    run = kernels.run_in_guest(kind, ["sh", str(HERE / "bare_mesh.sh"), str(n)], share, cwd=REPO, env=env, timeout=900)
    result = next((line for line in run.console.splitlines() if line.startswith("RESULT")), "RESULT missing")
    return run.total_seconds, result


def before(checkout: Path, kind: str, sites: str, results: Path) -> tuple[float, dict, str]:
    """The lab of an older checkout, in a subprocess that imports that checkout's packages."""
    code = ("import sys; from lab.run import run_lab; "
            f"o = run_lab({sites!r}, {kind!r}, {str(results)!r}, timeout=1800, on_line=lambda line: None); "
            "print('OK' if o.ok else 'FAIL')")
    env = dict(os.environ, PYTHONPATH=str(checkout))
    subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True, timeout=2400)
    r = json.loads((results / "result.json").read_text())
    passed = sum(c["ok"] for c in r.get("checks", []))
    return r.get("total_seconds", 0.0), r.get("timings", {}), f"{passed}/{len(r.get('checks', []))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", default="uml")
    ap.add_argument("--sites", default=str(REPO / "sites"))
    ap.add_argument("--starts", default="gated", help="router start modes to measure: gated, serial or both")
    ap.add_argument("--bare-sites", type=int, default=6)
    ap.add_argument("--no-bare", action="store_true")
    ap.add_argument("--before", metavar="DIR", help="an older checkout whose lab runs in the same rounds")
    ap.add_argument("--uml", default="debian13", help="User-Mode Linux builds: debian13, host or both")
    args = ap.parse_args()
    umls = [u for u in args.uml.split(",") if u]
    if args.kernel != "uml":
        umls = [""]
    runs: dict[str, list[float]] = {}
    phases: dict[str, dict[str, list[float]]] = {}
    with one_lab_at_a_time(lambda m: print(m, file=sys.stderr)), tempfile.TemporaryDirectory(dir=REPO, prefix=".bench-") as tmp:
        tmp = Path(tmp)
        for k, u in [(k, u) for k in range(1, args.rounds + 1) for u in umls]:
            os.environ["WAN_LAB_UML"] = "host" if u == "host" else ""
            tag = f" [{u}]" if len(umls) > 1 else ""
            if not args.no_bare:
                secs, result = bare(args.kernel, args.bare_sites, tmp)
                runs.setdefault(f"bare{tag}", []).append(secs)
                print(f"round {k}{tag}: bare mesh of {args.bare_sites}: {secs:.1f} s  {result}", flush=True)
            if args.before:
                secs, t, checks = before(Path(args.before).resolve(), args.kernel, args.sites, tmp / f"before-{k}")
                runs.setdefault("lab before", []).append(secs)
                for p in PHASES:
                    phases.setdefault("before", {}).setdefault(p, []).append(t.get(p, 0.0))
                print(f"round {k}: lab before: {secs:.1f} s, " + ", ".join(f"{p} {t.get(p, 0):.1f} s" for p in PHASES)
                      + f"; {checks}", flush=True)
            for start in [s for s in args.starts.split(",") if s]:
                os.environ["WAN_LAB_START"] = start
                o = run_lab(LabRequest(sites=Path(args.sites), kernel=args.kernel, results=tmp / f"lab-{start}-{k}{u}",
                                       timeout=1800, on_line=lambda line: None, start=start))
                t = o.result.timings
                core = round(o.boot_seconds + sum(t.get(p, 0.0) for p in PHASES), 1)
                runs.setdefault(f"lab {start}{tag}", []).append(o.total_seconds)
                runs.setdefault(f"lab {start} core{tag}", []).append(core)
                for p in (*PHASES, "nat"):
                    phases.setdefault(start + tag, {}).setdefault(p, []).append(t.get(p, 0.0))
                passed, total = o.result.summary()
                print(f"round {k}{tag}: lab ({start} start): {o.total_seconds:.1f} s (core {core:.1f} s), "
                      f"boot {o.boot_seconds:.1f} s, "
                      + ", ".join(f"{p} {t.get(p, 0):.1f} s" for p in (*PHASES, "nat"))
                      + f"; {passed}/{total} {'PASS' if o.ok else 'FAIL'}; {o.result.kernel_origin}", flush=True)
    print("\nmedians (all runs above):")
    med = {name: statistics.median(v) for name, v in runs.items()}
    for name, v in runs.items():
        print(f"  {name}: median {med[name]:.1f} s of {', '.join(f'{x:.1f}' for x in v)}")
    for start, ph in phases.items():
        print(f"  lab {start} phases (median): " + ", ".join(f"{p} {statistics.median(v):.1f} s" for p, v in ph.items()))
    for u in umls:
        tag = f" [{u}]" if len(umls) > 1 else ""
        if f"bare{tag}" in med:
            for name in med:
                if name.startswith("lab") and name.endswith(tag):
                    print(f"  ratio {name} / bare{tag}: {med[name] / med[f'bare{tag}']:.2f}")


if __name__ == "__main__":
    main()
