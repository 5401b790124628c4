"""The lab, host side: render the WAN, boot a kernel with ESP, run the lab inside, give a verdict."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from render.model import Wan
from render.render import render_wan, write_trees
from render.secrets import lab_key
from render.validate import load_sites

from . import kernels, report
from .plan import lab_plan

REPO = Path(__file__).resolve().parent.parent
KINDS = ("host", "qemu", "uml")


@dataclass
class LabOutcome:
    ok: bool
    kernel: str
    result: dict
    results_dir: Path
    boot_seconds: float = 0.0
    total_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def installed_libreswan_major() -> int:
    r = subprocess.run(["ipsec", "--version"], capture_output=True, text=True)
    m = re.search(r"Libreswan (?:U)?(\d+)\.", r.stdout + r.stderr)
    if not m:
        raise RuntimeError("Libreswan is not installed: apt-get install libreswan (./run does it)")
    return int(m.group(1))


def choose_kernel(wanted: str | None) -> str:
    """The kernel to run in: the one asked for, else host where it has ESP, else QEMU."""
    avail = kernels.available_kernels()
    if wanted:
        if wanted not in KINDS:
            raise SystemExit(f"--kernel {wanted}: choose one of {', '.join(KINDS)}")
        if avail[wanted] is not None:
            raise SystemExit(f"--kernel {wanted} cannot run here: {avail[wanted]}")
        return wanted
    if os.geteuid() == 0 and avail["host"] is None:
        return "host"
    if avail["qemu"] is None:
        return "qemu"
    if avail["uml"] is None:
        return "uml"
    raise SystemExit("no kernel with ESP can run the lab here:\n" + "\n".join(f"  {k}: {v}" for k, v in avail.items()))


def _as_lab_version(wan: Wan, major: int) -> tuple[Wan, list[str]]:
    """Routers that target another Libreswan major are rendered for the one the lab has."""
    notes, sites = [], []
    for s in wan.sites:
        if s.router.libreswan != major:
            notes.append(f"{s.name} targets Libreswan {s.router.libreswan}; the lab has {major} and runs it with a {major}.x rendering")
            s = dataclasses.replace(s, router=dataclasses.replace(s.router, libreswan=major))
        sites.append(s)
    return dataclasses.replace(wan, sites=tuple(sites)), notes


class Progress:
    """One line per phase step on a terminal (overwritten), phase ends only elsewhere (CI logs)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, line: str) -> None:
        m = re.match(r"^@@ (.+?) (\d+)/(\d+)(?: (.*))?$", line.strip())
        if m:
            phase, k, n = m.group(1), int(m.group(2)), int(m.group(3))
            text = f"lab: {phase} {k}/{n}"
            if self.tty:
                self.stream.write("\r\033[K" + text)
                if k == n:
                    self.stream.write("\n")
            elif k == n and text != self.last:
                self.stream.write(text + "\n")
            self.last = text
        elif line.startswith("lab: ") or "@@GUEST-READY" in line:
            if self.tty and self.last:
                self.stream.write("\r\033[K")
            self.stream.write(("lab: kernel booted" if "@@GUEST-READY" in line else line.strip()) + "\n")
        self.stream.flush()


def run_lab(sites: str | Path = "sites", kernel: str | None = None, results: str | Path = "lab-results",
            timeout: float = 1500, tamper: Callable[[Path], None] | None = None,
            on_line: Callable[[str], None] | None = None) -> LabOutcome:
    """Prove the WAN in `sites` in a lab kernel; results (result.json, junit.xml, diagnostics) in `results`.

    `tamper(out)` may change the rendered trees before the lab starts (the negative tests do).
    """
    results = Path(results).resolve()
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    kind = choose_kernel(kernel)
    major = installed_libreswan_major()
    wan, notes = _as_lab_version(load_sites(sites), major)
    out = results / "out"
    write_trees(render_wan(wan, lab_key(), "lab"), out)
    if tamper:
        tamper(out)
    firewall = kind != "uml"
    if not firewall:
        notes.append("User-Mode Linux has no nftables ip/inet family: the firewall was NOT exercised (use --kernel qemu)")
    prefix = "w" + uuid.uuid4().hex[:5]
    plan = lab_plan(wan, out, prefix, firewall, major)
    (results / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    for k in ("WAN_LAB_TUNNEL_TIMEOUT",):
        if k in os.environ:
            env[k] = os.environ[k]
    inner = results / "inner"
    argv = [sys.executable, "-m", "lab.inner", str(results / "plan.json"), str(inner)]
    t0 = time.monotonic()
    run = kernels.run_in_guest(kind, argv, results, cwd=REPO, env=env, timeout=timeout, on_line=on_line or Progress())
    (results / "console.log").write_text(run.console)
    try:
        result = json.loads((inner / "result.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        why = "timed out" if run.timed_out else f"exit code {run.exit_code}"
        result = {"ok": False, "checks": [], "error": f"the lab did not report ({why}); see {results}/console.log"}
    if (inner / "diagnostics").exists():
        shutil.move(str(inner / "diagnostics"), str(results / "diagnostics"))
    result["notes"] = notes + result.get("notes", [])
    result["kernel"] = kind
    result["boot_seconds"] = round(run.boot_seconds, 2)
    result["total_seconds"] = round(time.monotonic() - t0, 2)
    (results / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    report.junit(result, results / "junit.xml", kind)
    shutil.rmtree(inner, ignore_errors=True)
    return LabOutcome(bool(result.get("ok")), kind, result, results, run.boot_seconds, result["total_seconds"], result["notes"])


def verdict(outcome: LabOutcome, sites: list[str]) -> str:
    r = outcome.result
    passed, total = report.summary(r)
    lines = ["", report.matrix(r, sites), ""]
    failed = [c for c in r.get("checks", []) if not c["ok"]]
    for c in failed[:30]:
        lines.append(f"FAILED {c['kind']} {c['src']} -> {c['dst']}: {c['evidence'].get('why') or json.dumps(c['evidence'], sort_keys=True)}")
    if r.get("error"):
        lines.append(f"ERROR {r['error']}")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    t = r.get("timings", {})
    lines.append(f"kernel {outcome.kernel}: boot {outcome.boot_seconds:.1f} s, " +
                 ", ".join(f"{k} {v} s" for k, v in t.items() if k != "inside_total") + f"; total {outcome.total_seconds:.1f} s")
    fw = "firewall active with drop policies" if r.get("firewall_exercised") else "firewall NOT exercised"
    word = "PASS" if outcome.ok else "FAIL"
    lines.append(f"{word}: {passed}/{total} checks passed ({fw}); results in {outcome.results_dir}")
    return "\n".join(lines)
