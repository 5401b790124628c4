"""The lab, host side: render the WAN, boot a kernel with ESP, run the lab inside, give a verdict."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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
from render.validate import load_sites

from . import kernels, report
from .keys import LabKeys
from .plan import change_plan, lab_plan

REPO = Path(__file__).resolve().parent.parent
KINDS = ("host", "qemu", "uml")
ROUTERS = ("netns", "docker")


@dataclass
class LabOutcome:
    ok: bool
    kernel: str
    result: dict
    results_dir: Path
    boot_seconds: float = 0.0
    total_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


_lock_depth = 0
LOCK_HELD = "WAN_LAB_LOCK_HELD"  # the pid holding the lock, for the processes it starts


@contextlib.contextmanager
def one_lab_at_a_time(say: Callable[[str], None]):
    """Hold a machine-wide lock while a lab kernel runs. Two labs at once on a small machine starve
    each other's IKE exchanges (a QEMU lab under contention lost a Child SA), so a second run waits.
    Re-entrant within a process: a test session may hold it across all its labs."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    path = kernels.cache_dir() / "lab.lock"
    held = os.environ.get(LOCK_HELD)
    try:
        by_parent = bool(held) and path.read_text().strip() == f"pid {held}" and _alive(int(held))
    except (OSError, ValueError):
        by_parent = False
    if by_parent:  # a process of ours that holds it started this one (lab.up's background lab)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            say(f"lab: another lab is running ({f.read().strip() or 'unknown'}); waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        _lock_depth = 1
        os.environ[LOCK_HELD] = str(os.getpid())
        try:
            yield
        finally:
            _lock_depth = 0
            os.environ.pop(LOCK_HELD, None)
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


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


def choose_docker_kernel(wanted: str | None) -> str:
    """Docker routers share their engine's kernel: the host's engine where the host kernel has
    ESP, else an engine started inside User-Mode Linux (the recipe of reference/lab-substrate.md)."""
    if wanted not in (None, "host", "uml"):
        raise SystemExit(f"--routers docker runs on --kernel host or uml, not {wanted}")
    avail = kernels.available_kernels()
    if wanted != "uml" and os.geteuid() == 0 and avail["host"] is None:
        from .docker_engine import host_engine
        client, why = host_engine()
        if client is not None:
            return "host"
        if wanted == "host":
            raise SystemExit(f"--kernel host --routers docker: {why}")
    elif wanted == "host":
        raise SystemExit(f"--kernel host cannot run here: {avail['host']}")
    if avail["uml"] is not None:
        raise SystemExit(f"--routers docker needs a kernel with ESP: {avail['uml']}")
    if shutil.which("dockerd") is None:
        raise SystemExit("--routers docker needs the Docker engine: apt-get install docker.io (./run does it)")
    return "uml"


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
            on_line: Callable[[str], None] | None = None, hold: bool = False,
            change_to: str | Path | None = None, change_mode: str = "reconcile", routers: str = "netns",
            release: str | None = None) -> LabOutcome:
    """Prove the WAN in `sites` in a lab kernel; results (result.json, junit.xml, diagnostics) in `results`.

    `tamper(out)` may change the rendered trees before the lab starts (the negative tests do).
    `routers`: "netns" (a network and mount namespace per router) or "docker" (a container per router).
    `release`: "enrol" (routers start with their enrolment only and fetch a signed release from a
    server in the lab) or "full" (then also the refusals and the rollback; lab/release_lab.py).
    """
    if routers not in ROUTERS:
        raise SystemExit(f"--routers {routers}: choose one of {', '.join(ROUTERS)}")
    if routers == "docker" and (change_to is not None or release):
        raise SystemExit("the change lab and the release lab run with netns routers only")
    results = Path(results).resolve()
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    kind = choose_docker_kernel(kernel) if routers == "docker" else choose_kernel(kernel)
    major = installed_libreswan_major()
    wan, notes = _as_lab_version(load_sites(sites), major)
    out = results / "out"
    # the lab's own key pair per router in place of the site files' keys (one mapping for both
    # revisions of a change: an untouched tunnel renders byte-identical)
    lab_keys = LabKeys()
    wan = lab_keys.apply(wan)
    notes.append("the lab used its own key pair per router (made in each router's NSS database) in place of the "
                 "public keys in the site files")
    write_trees(render_wan(wan, "before" if change_to is not None else "lab"), out)
    if tamper:
        tamper(out)
    firewall = kind != "uml" and not release
    if kind == "uml":
        notes.append("User-Mode Linux has no nftables ip/inet family: the firewall was NOT exercised (use --kernel qemu)")
    elif release:
        notes.append("the release lab installs no firewall: the firewall was NOT exercised")
    prefix = "w" + uuid.uuid4().hex[:5]
    if change_to is not None:
        wan_after, more = _as_lab_version(load_sites(change_to), major)
        wan_after = lab_keys.apply(wan_after)
        notes += [n for n in more if n not in notes]
        out_after = results / "out-after"
        write_trees(render_wan(wan_after, "after"), out_after)
        plan = change_plan(wan, out, wan_after, out_after, prefix, firewall, major, change_mode)
    else:
        plan = lab_plan(wan, out, prefix, firewall, major)
    # each router's lab copies its own NSS database (lab/router-setup.sh)
    for s in plan["sites"] + plan.get("network_sites", []) + plan.get("change", {}).get("sites", []):
        if s["name"] in lab_keys.routers:
            s["nss"] = str(lab_keys.nss(s["name"]))
    if release:
        from . import release_lab
        plan["release"] = release_lab.scenario(wan, out, results, negatives=release == "full")
    if hold:
        plan["hold"] = str(results / "control")
    if routers == "docker":
        from . import docker_image
        plan["routers"] = "docker"
        plan["docker"] = {"engine": "host" if kind == "host" else "guest", "image": docker_image.image_tag()}
    (results / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    for k in ("WAN_LAB_TUNNEL_TIMEOUT",):
        if k in os.environ:
            env[k] = os.environ[k]
    inner = results / "inner"
    argv = [sys.executable, "-m", "lab.inner", str(results / "plan.json"), str(inner)]
    say = on_line or Progress()
    t0 = time.monotonic()
    image_seconds = None
    try:
        with one_lab_at_a_time(say):
            t0 = time.monotonic()  # the wait for another lab does not count
            if routers == "docker":
                # the image (built once per recipe, then cached) before the lab kernel boots
                from . import docker_image
                if kind == "host":
                    docker_image.build_rootfs(say)  # imported into the host's engine by the lab
                else:
                    plan["docker"]["data_root"] = str(docker_image.ensure_data_root(say))
                image_seconds = round(time.monotonic() - t0, 2)
                (results / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
            run = kernels.run_in_guest(kind, argv, results, cwd=REPO, env=env, timeout=timeout, on_line=say,
                                       mem_mb=2048 if routers == "docker" else 1024)
    finally:
        if kind == "host":
            cleanup_host(prefix)
            if routers == "docker":
                from .docker_routers import cleanup_host_engine
                cleanup_host_engine(prefix)
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
    result["routers"] = routers
    if image_seconds is not None:
        result["timings"] = {"image": image_seconds, **result.get("timings", {})}
    if lab_keys.generation_seconds():
        result["key_generation_seconds"] = lab_keys.generation_seconds()
    result["keys"] = {"origin": "lab", "why": "the lab made its own key pair per router in place of the routers' "
                      "public keys in the site files (their private halves never leave the routers)",
                      "ckaids": {r: [k.ckaid for k in v.keys] for r, v in sorted(lab_keys.routers.items())}}
    # which commit and which site files this result proves (a release attaches it: release/provenance.py)
    from release.provenance import source
    result["source"] = source(Path(sites))
    result["boot_seconds"] = round(run.boot_seconds, 2)
    result["total_seconds"] = round(time.monotonic() - t0, 2)
    (results / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    report.junit(result, results / "junit.xml", kind)
    shutil.rmtree(inner, ignore_errors=True)
    return LabOutcome(bool(result.get("ok")), kind, result, results, run.boot_seconds, result["total_seconds"], result["notes"])


def cleanup_host(prefix: str) -> None:
    """After a lab on the host kernel (killed or not): end the processes still running in the
    lab's own namespaces and delete those namespaces. A lab kernel needs none of this: powering it
    off ends everything in it."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    ours = [ns for ns in listed if re.fullmatch(rf"{prefix}(inet|r\d+|d\d+|h\d+x\d+)", ns)]
    for ns in ours:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (OSError, ValueError):
                pass
    for ns in ours:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def verdict(outcome: LabOutcome, sites: list[str]) -> str:
    r = outcome.result
    passed, total = report.summary(r)
    lines = ["", report.matrix(r, sites), ""]
    failed = [c for c in r.get("checks", []) if not c["ok"]]
    for c in failed[:30]:
        lines.append(f"FAILED {c['kind']} {c['src']} -> {c['dst']}: {c['evidence'].get('why') or json.dumps(c['evidence'], sort_keys=True)}")
    if r.get("error"):
        lines.append(f"ERROR {r['error']}")
    rel = r.get("release") or {}
    for name, e in rel.get("enrol", {}).items():
        lines.append(f"release: {name} fetched, verified and applied its release in {e['fetch_seconds']} s; "
                     + (f"a ping crossed its new tunnels {e['until_traffic']} s after the fetch started"
                        if e.get("until_traffic") is not None else "NO ping crossed its new tunnels"))
    for st in rel.get("steps", []):
        lines.append(f"release: {st['step']}: {'handled as it must be' if st['ok'] else 'WRONG'} (fetch exit {st['rc']}, {st['seconds']} s)")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    t = r.get("timings", {})
    where = f"kernel {outcome.kernel}" + (", Docker routers" if r.get("routers") == "docker" else "")
    lines.append(f"{where}: boot {outcome.boot_seconds:.1f} s, " +
                 ", ".join(f"{k} {v} s" for k, v in t.items() if k != "inside_total") + f"; total {outcome.total_seconds:.1f} s")
    fw = "firewall active with drop policies" if r.get("firewall_exercised") else "firewall NOT exercised"
    word = "PASS" if outcome.ok else "FAIL"
    lines.append(f"{word}: {passed}/{total} checks passed ({fw}); results in {outcome.results_dir}")
    return "\n".join(lines)


# ---- lab.up / lab.shell / lab.down: the lab kept running for a person ---------------------------

def up(sites: str, kernel: str | None, results: str | Path = "lab-results", hours: float = 4) -> int:
    """Start the lab in the background and return once it is up (or failed to come up)."""
    results = Path(results).resolve()
    pidfile = results.parent / f".{results.name}.up.pid"
    if pidfile.exists():
        print(f"a lab is already up (PID {pidfile.read_text().strip()}); lab.down first", file=sys.stderr)
        return 1
    log = results.parent / f".{results.name}.up.log"
    proc = subprocess.Popen([sys.executable, "-m", "lab.run", "--up", str(sites), kernel or "", str(results), str(hours * 3600)],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    control = results / "control"
    while proc.poll() is None and not (control / "up.json").exists():
        time.sleep(0.5)
    if proc.poll() is not None:
        pidfile.unlink(missing_ok=True)
        print(log.read_text()[-3000:], file=sys.stderr)
        print("the lab did not come up", file=sys.stderr)
        return 1
    places = json.loads((control / "up.json").read_text())["places"]
    print(f"lab up (PID {proc.pid}); results so far in {results}/result.json")
    print(f"  ./run lab.shell <place> [--cmd '...']   places: {', '.join(places)}")
    print("  ./run lab.down")
    return 0


def shell(place: str, cmd: str | None, results: str | Path = "lab-results") -> int:
    """Run commands in a router (or LAN host, DNS server, internet) of the running lab."""
    control = Path(results).resolve() / "control"
    if not (control / "up.json").exists():
        print("no lab is up: ./run lab.up first", file=sys.stderr)
        return 1

    def ask(line: str) -> int:
        name = uuid.uuid4().hex
        tmp = control / f"{name}.tmp-req"
        tmp.write_text(json.dumps({"place": place, "cmd": line}))
        tmp.rename(control / f"{name}.req")
        out = control / f"{name}.out"
        while not out.exists():
            time.sleep(0.1)
        reply = json.loads(out.read_text())
        out.unlink()
        sys.stdout.write(reply["output"])
        return reply["rc"]

    if cmd:
        return ask(cmd)
    print(f"{place}: each line runs in the lab (ip a, ip xfrm state, ipsec whack --trafficstatus, ...); Ctrl-D ends")
    while True:
        try:
            line = input(f"{place}# ")
        except EOFError:
            print()
            return 0
        if line.strip():
            ask(line)


def down(results: str | Path = "lab-results") -> int:
    """Stop the lab started by lab.up: ask it to finish, then end its process by PID if it must."""
    results = Path(results).resolve()
    pidfile = results.parent / f".{results.name}.up.pid"
    if not pidfile.exists():
        print("no lab is up")
        return 0
    pid = int(pidfile.read_text())
    (results / "control").mkdir(parents=True, exist_ok=True)
    (results / "control" / "down").write_text("down\n")
    end = time.monotonic() + 60
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.5)
    if _alive(pid):
        os.killpg(pid, 15)  # our own background process group (start_new_session)
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when lab.up ran in this very process (tests)
    except ChildProcessError:
        pass
    pidfile.unlink(missing_ok=True)
    print("lab down")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of nobody we know is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--up":
    _, _, _sites, _kernel, _results, _timeout = sys.argv
    outcome = run_lab(_sites, _kernel or None, _results, float(_timeout), hold=True)
    print(verdict(outcome, [s["name"] for s in json.loads((Path(_results) / "plan.json").read_text())["sites"]]))


def build_docker_image(base: str | None = None, engine: str | None = None) -> int:
    """`lab.image`: the router image for the Docker lab, built once per recipe (reused after)."""
    from . import docker_engine, docker_image
    say = lambda m: print(m, flush=True)  # noqa: E731
    if engine is None:
        engine = "host" if (os.geteuid() == 0 and kernels.esp_probe_host()[0] and docker_engine.host_engine()[0]) else "guest"
    t0 = time.monotonic()
    if engine == "host":
        client, why = docker_engine.host_engine()
        if client is None:
            print(why, file=sys.stderr)
            return 1
        tag = docker_image.ensure_image(client, say, base)
    elif engine == "guest":
        if base:
            print("--base needs a registry and the host's engine (--engine host)", file=sys.stderr)
            return 2
        with one_lab_at_a_time(say):
            docker_image.ensure_data_root(say)
        tag = docker_image.image_tag()
    else:
        print(f"--engine {engine}: choose host or guest", file=sys.stderr)
        return 2
    print(f"image {tag} ready ({engine} engine; cache {docker_image.cache()}) in {time.monotonic() - t0:.1f} s")
    return 0
