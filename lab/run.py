"""The lab, host side: render the WAN, let the scenarios prepare, boot a kernel with ESP, run the
lab engine inside, give back an outcome.

    outcome = run_lab(LabRequest(sites=Path("sites"), kernel="uml"))
    outcomes = run_labs([LabRequest(...), LabRequest(...)])  # several labs, one kernel boot

Library code raises `LabError` (lab/proc.py) and its kinds (`KernelUnavailable`, `LabRequestError`);
only tasks.py turns them into exit codes.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from release.provenance import source
from render.model import Wan
from render.render import render_wan, write_trees
from render.validate import load_sites

from . import console, docker_image, firewalld, kernels, libreswan5, scenarios, substrate
from .contracts import DockerPlan, LabPlan, LabResult, ScenarioCall
from .docker_routers import cleanup_host_engine
from .keys import LabKeys
from .plan import pick_infra, wan_view
from .proc import LabError
from .roots import meta as roots_meta

REPO = Path(__file__).resolve().parent.parent
STARTS = ("gated", "serial")


class LabRequestError(LabError):
    """The request cannot be run as asked (a wrong option, a combination the lab does not offer)."""


@dataclass(frozen=True)
class LabRequest:
    """One lab run. `wan` is the already loaded sites (tasks.py loads them once); else `sites` is read."""

    sites: Path = Path("sites")
    wan: Wan | None = None
    kernel: str | None = None  # host | qemu | uml; None: host where it has ESP, else qemu
    results: Path = Path("lab-results")
    timeout: float = 1500
    routers: str = "netns"  # netns | docker
    scenarios: tuple[tuple[str, dict], ...] = ()  # (name, options) in the order they play
    tamper: Callable[[Path], None] | None = None  # changes the rendered trees before the lab (negative tests)
    hold: bool = False  # lab.up: keep the lab running for lab.shell
    tunnel_timeout: float | None = None  # bound on the wait for tunnels (a negative test's broken tunnel never comes)
    # gated or serial; None: WAN_LAB_START, else serial on User-Mode Linux (one CPU: gating gained
    # nothing there, and under a load average of 13 one of three gated runs lost a Child SA) and
    # gated on QEMU and the host (more than one CPU: routers negotiate side by side)
    start: str | None = None
    on_line: Callable[[str], None] | None = None
    # real firewalld on the EL routers where the firewall is loaded (lab/firewalld.py); False: the lab's
    # model (a suite lab that proves other things saves firewalld's start-up); None: $WAN_LAB_FIREWALLD
    firewalld: bool | None = None


@dataclass
class LabOutcome:
    ok: bool
    kernel: str
    result: LabResult
    results_dir: Path
    sites: list[str]

    @property
    def notes(self) -> list[str]:
        return self.result.notes

    @property
    def boot_seconds(self) -> float:
        return self.result.boot_seconds

    @property
    def total_seconds(self) -> float:
        return self.result.total_seconds

    def verdict(self) -> str:
        return console.verdict(self.result, self.sites, self.results_dir)


def as_lab_version(wan: Wan, major: int, also: frozenset[int] = frozenset(), why_not: str | None = None
                   ) -> tuple[Wan, dict[str, int], list[str]]:
    """Routers that target a Libreswan major the lab cannot run (neither the lab kernel's `major`
    nor one of `also`, the majors a root of their own carries: lab/libreswan5.py) are rendered for
    the lab kernel's; `why_not` says why no root carries theirs."""
    notes, sites, targets = [], [], {}
    for s in wan.sites:
        targets[s.name] = s.router.libreswan
        if s.router.libreswan != major and s.router.libreswan not in also:
            notes.append(f"{s.name} targets Libreswan {s.router.libreswan}; the lab has {major} "
                         f"and runs it with a {major}.x rendering: NOT proven on {s.router.libreswan}.x"
                         + (f" ({why_not})" if why_not else ""))
            s = dataclasses.replace(s, router=dataclasses.replace(s.router, libreswan=major))
        sites.append(s)
    return dataclasses.replace(wan, sites=tuple(sites)), targets, notes


def libreswan_per_router(sites: tuple, versions: dict[int, str], why_not: str | None) -> dict[str, dict]:
    """router -> {"target", "ran", "root", "why"}: the contract field of LabPlan and LabResult."""
    out = {}
    for s in sites:
        out[s.name] = {"target": s.target_libreswan, "ran": versions.get(s.libreswan, str(s.libreswan)), "root": s.root,
                       "why": (why_not or "no root with it") if s.libreswan != s.target_libreswan else ""}
    return out


def firewalls_per_router(sites: tuple, firewall: bool, notes: list[str], fw_why: str | None, routers: str) -> dict[str, str]:
    """router -> which firewall runs on it (LabPlan.firewalls, LabResult.firewalls, the verdict)."""
    out = {}
    for s in sites:
        if not firewall:
            why = next((n for n in notes if "NOT exercised" in n), "the lab kernel loads no firewall")
            out[s.name] = f"not exercised ({why.split(': the firewall')[0]})"
        elif s.firewalld:
            where = "the Libreswan 5 root (Debian 13) of lab/libreswan5.py" if s.libreswan == 5 else \
                "the Debian 12 root of lab/firewalld.py"
            out[s.name] = f"firewalld {s.firewalld} (real, in {where})"
        elif s.platform == "openwrt":
            out[s.name] = "the lab's model of fw4 (lab/platform.py)"
        elif s.firewall == "nftables":
            out[s.name] = "the lab's model of EL's firewall (lab/platform.py; `firewall: nftables`: no firewalld on it)"
        else:
            why = ("a Libreswan 5.x router: its root has no firewalld, or this lab asks for the model" if s.root else
                   "the Docker routers run one image" if routers == "docker" else fw_why or "no firewalld root")
            out[s.name] = f"the lab's model of EL's firewall (lab/platform.py; firewalld NOT run: {why})"
    return out


@dataclass
class _Prepared:
    request: LabRequest
    plan: LabPlan
    results: Path
    names: list[str]
    notes: list[str]
    other_major: dict[str, str]
    keys: LabKeys


def _prepare(req: LabRequest, kind: str, major: int, say: Callable[[str], None] = print) -> _Prepared:
    """Render, let the scenarios prepare, and write the plan (host side; nothing boots yet)."""
    if req.routers not in substrate.ROUTERS:
        raise LabRequestError(f"--routers {req.routers}: choose one of {', '.join(substrate.ROUTERS)}")
    start = req.start or os.environ.get("WAN_LAB_START") or ("serial" if kind == "uml" else "gated")
    if start not in STARTS:
        raise LabRequestError(f"start {start!r}: choose one of {', '.join(STARTS)}")
    names = [n for n, _ in req.scenarios]
    for n in names:
        scenarios.load(n)  # an unknown name is refused before anything is rendered
    if req.routers == "docker" and names:
        raise LabRequestError("the scenarios (change, release, faults, heal) run with netns routers only")
    results = Path(req.results).resolve()
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    wan0 = req.wan or load_sites(req.sites)
    versions = {major: substrate.installed_libreswan_version()}
    roots: dict[int, str] = {}
    root5, why_not = (None, None)
    if req.routers == "netns":  # the Docker routers run one image (Debian 12's Libreswan)
        root5, why_not = libreswan5.choose({s.name: s.router.libreswan for s in wan0.sites}, say)
    if root5 is not None:
        roots[5] = str(root5)
        versions[5] = libreswan5.meta(root5)["libreswan"]
    also = frozenset(roots)
    wan, targets, notes = as_lab_version(wan0, major, also, why_not)
    # real firewalld for the EL routers (lab/firewalld.py), where the lab kernel loads a firewall
    fw_dir, fw_why = (None, "this lab asks for the model (LabRequest.firewalld=False)") if req.firewalld is False else \
        firewalld.choose([s for s in wan.sites if s.router.libreswan not in roots], major,
                         req.routers == "netns" and kind != "uml", say)
    fw_root = (str(fw_dir), roots_meta(fw_dir)["firewalld"]) if fw_dir else None
    # the Libreswan 5 root's own firewalld (Debian 13's) for its EL firewalld routers, on the same terms
    fw_in_roots = {m: roots_meta(Path(d)).get("firewalld", "") for m, d in roots.items()} \
        if req.firewalld is not False and firewalld.wanted() and req.routers == "netns" and kind != "uml" else {}
    if (req.routers == "netns" and "nat" not in names and not {"change", "release", "later"} & set(names)
            and any(s.router.dynamic for s in wan.sites)):
        # a dynamic site sits behind a CGNAT in the lab: its address change is played and measured, except
        # in a lab that proves a change or a release (it takes about two minutes; those labs prove other
        # things, and name "nat" themselves if they want it)
        req = dataclasses.replace(req, scenarios=req.scenarios + (("nat", {}),))
    other_major = {s: f"targets Libreswan {t}; ran a {major}.x rendering" for s, t in targets.items()
                   if t != major and t not in also}
    # the lab's own key pair per router (made in that router's own NSS database, lab/keys.py) in
    # place of the site files' public keys, whose private halves only the real routers hold; one
    # mapping for every revision of a change: an untouched tunnel renders byte-identical
    lab_keys = LabKeys()
    wan = lab_keys.apply(wan)
    notes.append("the lab used its own key pair per router (made in each router's NSS database) in place of the "
                 "public keys in the site files")
    out = results / "out"
    write_trees(render_wan(wan, "lab"), out)
    if req.tamper:
        req.tamper(out)
    prefix = "w" + uuid.uuid4().hex[:5]
    loaded: dict[Path, tuple[Wan, dict[str, int], list[str]]] = {}

    def nss() -> dict[str, str]:  # each router's own lab NSS database (read-only in the lab kernel: copied)
        return {r: str(lab_keys.nss(r)) for r in lab_keys.routers}

    def load(sites: Path) -> tuple[Wan, list[str]]:
        if Path(sites) not in loaded:
            w, t, n = as_lab_version(load_sites(sites), major, also, why_not)
            loaded[Path(sites)] = (lab_keys.apply(w), t, n)
        w, t, n = loaded[Path(sites)]
        targets.update({k: v for k, v in t.items() if k not in targets})
        return w, n

    extra = [load(p)[0] for n, opts in req.scenarios for p in getattr(scenarios.load(n), "revisions", lambda o: [])(opts)]
    infra = pick_infra([wan, *extra], prefix)
    firewall = kind != "uml"
    if kind == "uml":
        notes.append("User-Mode Linux has no nftables ip/inet family: the firewall was NOT exercised (use --kernel qemu)")
    calls, install, serve, index, more = [], {}, False, None, []
    for n, opts in req.scenarios:
        ctx = scenarios.PrepareContext(wan=wan, out=out, keys=lab_keys, results=results, prefix=prefix, infra=infra,
                                       options=opts, load=load,
                                       view=lambda w, o, i: wan_view(w, o, prefix, i, targets, nss(), roots, fw_root,
                                                                           fw_in_roots))
        p = scenarios.load(n).prepare(ctx)
        calls.append(ScenarioCall(name=n, data=p.data))
        install.update(p.install)
        serve |= p.serve_release
        index = index or p.index
        more += p.more_sites
        notes += [x for x in p.notes if x not in notes]
        if p.no_firewall and firewall:
            firewall = False
            notes.append(p.no_firewall)
    view = wan_view(wan, out, prefix, index, targets, nss(), roots, fw_root, fw_in_roots)
    network_sites = list(view.sites)
    for v in more:
        network_sites += [s for s in v.sites if s.name not in {x.name for x in network_sites}]
    docker = None
    if req.routers == "docker":
        docker = DockerPlan(engine="host" if kind == "host" else "guest", image=docker_image.image_tag())
    plan = LabPlan(prefix=prefix, firewall=firewall, libreswan_major=major, routers=req.routers, infra=infra, wan=view,
                   network_sites=tuple(network_sites), install=install, serve_release=serve, scenarios=tuple(calls),
                   start=start, tunnel_timeout=req.tunnel_timeout, hold=str(results / "control") if req.hold else None,
                   docker=docker, libreswan=libreswan_per_router(tuple(network_sites), versions, why_not),
                   firewalls=firewalls_per_router(tuple(network_sites), firewall, notes, fw_why, req.routers))
    plan.write(results / "plan.json")
    return _Prepared(req, plan, results, [s.name for s in wan.sites], notes, other_major, lab_keys)


def run_lab(request: LabRequest) -> LabOutcome:
    """Prove the WAN of `request` in a lab kernel; results (plan.json, result.json, junit.xml,
    console.log, diagnostics/) in request.results."""
    return run_labs([request])[0]


def run_labs(requests: list[LabRequest], jobs: int = 1) -> list[LabOutcome]:
    """Several labs in ONE kernel boot, one after another or up to `jobs` at once in the order given
    (lab/inner.py); they must want the same kernel and router kind, and their results directories
    must share a parent. Each gets its own outcome."""
    first = requests[0]
    kind = (substrate.choose_docker_kernel(first.kernel) if first.routers == "docker"
            else substrate.choose_kernel(first.kernel))
    for r in requests[1:]:
        if (r.kernel or kind) != kind or r.routers != first.routers:
            raise LabRequestError("labs in one boot must use the same kernel and router kind")
    major = substrate.installed_libreswan_major()
    say = first.on_line or console.Progress()
    prepared = [_prepare(r, kind, major, say) for r in requests]
    share = Path(os.path.commonpath([str(p.results) for p in prepared]))
    if len(prepared) > 1:
        share = share if share not in {p.results for p in prepared} else share.parent
    if share == Path("/"):
        raise LabRequestError("the results directories of labs in one boot must share a parent directory")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    for k in ("WAN_LAB_TUNNEL_TIMEOUT", "WAN_LAB_DIAGNOSTICS"):
        if k in os.environ:
            env[k] = os.environ[k]
    argv = [sys.executable, "-m", "lab.inner"] + (["--jobs", str(jobs)] if jobs > 1 and len(prepared) > 1 else [])
    for p in prepared:
        argv += [str(p.results / "plan.json"), str(p.results / "inner")]
    image_seconds = None
    try:
        with substrate.one_lab_at_a_time(say):
            t0 = time.monotonic()  # the wait for another lab does not count
            if first.routers == "docker":  # the image (built once per recipe, then cached) before the kernel boots
                p = prepared[0]
                if kind == "host":
                    docker_image.build_rootfs(say)  # imported into the host's engine by the lab
                else:
                    p.plan = dataclasses.replace(p.plan, docker=dataclasses.replace(
                        p.plan.docker, data_root=str(docker_image.ensure_data_root(say))))
                    p.plan.write(p.results / "plan.json")
                image_seconds = round(time.monotonic() - t0, 2)
            mem = 2048 if first.routers == "docker" else 1024 + 512 * (max(jobs, 1) - 1)
            guest = kernels.run_in_guest(kind, argv, share, cwd=REPO, env=env, timeout=sum(r.timeout for r in requests),
                                         on_line=say, mem_mb=mem)
            total = round(time.monotonic() - t0, 2)
    finally:
        if kind == "host":
            for p in prepared:
                substrate.cleanup_host(p.plan.prefix)
                if first.routers == "docker":
                    cleanup_host_engine(p.plan.prefix)
    return [_collect(p, kind, guest, total if len(prepared) == 1 else None, image_seconds) for p in prepared]


def _collect(p: _Prepared, kind: str, guest: kernels.GuestRun, total: float | None, image_seconds: float | None) -> LabOutcome:
    results, inner = p.results, p.results / "inner"
    (results / "console.log").write_text(guest.console)
    try:
        result = LabResult.read(inner / "result.json")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        why = "timed out" if guest.timed_out else f"exit code {guest.exit_code}"
        result = LabResult(error=f"the lab did not report ({why}); see {results}/console.log")
    if (inner / "diagnostics").exists():
        shutil.move(str(inner / "diagnostics"), str(results / "diagnostics"))
    result.notes = p.notes + [n for n in result.notes if n not in p.notes]
    result.other_major = p.other_major
    result.libreswan = p.plan.libreswan
    result.firewalls = p.plan.firewalls
    result.kernel, result.kernel_origin, result.routers = kind, guest.origin, p.plan.routers
    result.keys = {"origin": "lab", "why": "the lab made its own key pair per router in place of the routers' public "
                   "keys in the site files (their private halves never leave the routers)",
                   "ckaids": {r: [k.ckaid for k in v.keys] for r, v in sorted(p.keys.routers.items())}}
    result.key_generation_seconds = p.keys.generation_seconds()
    # which commit and which site files this result proves (a release attaches it: release/provenance.py)
    result.source = source(p.request.sites)
    if image_seconds is not None:
        result.timings = {"image": image_seconds, **result.timings}
    result.boot_seconds = round(guest.boot_seconds, 2)
    # one lab per boot: the host's wall time; several: boot plus the lab's own time inside
    result.total_seconds = total if total is not None else round(result.timings.get("inside_total", 0) + guest.boot_seconds, 2)
    result.write(results / "result.json")
    console.junit(result, results / "junit.xml")
    shutil.rmtree(inner, ignore_errors=True)
    return LabOutcome(result.ok, kind, result, results, p.names)
