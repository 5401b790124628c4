"""Tasks: thin; each calls one function of render/, release/ or lab/ (and asks release/git.py for
the revisions render/ stamps or compares). `./run --list` shows them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import Collection, Exit, task

SITES = "sites"
OUT = "out"


def _exit(rc: int) -> None:
    if rc:
        raise Exit(code=rc)


@task(help={"sites": "the sites directory (default: sites)",
            "format": "text, or github (also print each problem as an annotation on its file and line)"})
def validate(c, sites=SITES, format="text"):
    """Validate the sites against the schemas and the semantic rules; list every problem."""
    from render import cli
    _exit(cli.validate(sites, format))


@task(help={"sites": "the sites directory", "out": "where the router trees go (replaced atomically)"})
def render(c, sites=SITES, out=OUT):
    """Render every router's files into out/<router>/ (public keys only: no secret is needed or written)."""
    from release import git
    from render import cli
    _exit(cli.render(sites, out, revision=git.revision(Path(sites))))


@task(help={"sites": "the sites directory", "out": "where the router trees go"})
def check(c, sites=SITES, out=OUT):
    """Render and check every file with the real tools."""
    from release import git
    from render import cli
    _exit(cli.check(sites, out, revision=git.revision(Path(sites))))


@task(help={"sites": "the sites directory", "out": "write the Mermaid text here instead of printing it"})
def graph(c, sites=SITES, out=None):
    """The WAN as a Mermaid flowchart (sites, LANs, tunnels)."""
    from render import cli
    _exit(cli.graph(sites, out))


@task(help={"sites": "the sites directory", "base": "git ref to compare with (default: merge base with main)",
            "format": "text, markdown (pull requests: Mermaid picture, tables) or json"})
def plan(c, sites=SITES, base=None, format="text"):
    """What the change does to each router: tunnels added, changed (why), removed; the commands."""
    from release import git
    from render import cli
    base = base or git.merge_base("main")
    try:
        with git.sites_at(base, Path(sites)) as base_sites:
            rc = cli.plan(sites, base_sites, base, format)
    except git.GitError as e:
        raise Exit(str(e), code=2) from None
    _exit(rc)


@task(help={"k": "only tests matching this expression", "quick": "skip the lab tests (they boot kernels)"})
def test(c, k=None, quick=False):
    """The test suite (real tools, real kernels)."""
    args = [sys.executable, "-m", "pytest", "-q", "-ra", "--durations=40"]  # the slowest, for the CI budget
    if k:
        args += ["-k", k]
    if quick:
        args += ["-m", "not lab"]
    os.execv(sys.executable, args)


def _lab_errors(fn):
    """Library code raises LabError; here it becomes one sentence and exit code 2."""
    from lab.proc import LabError
    try:
        return fn()
    except LabError as e:
        raise Exit(f"lab: {e}", code=2) from None


@task(help={"sites": "the sites directory", "kernel": "host, qemu or uml (default: host where it has ESP, else qemu)",
            "results": "where result.json, junit.xml and diagnostics go", "timeout": "seconds for the whole run",
            "release": "enrol: routers start empty and fetch a signed release from a server in the lab; "
                       "full: also tampered, unsigned, misaddressed, older and broken releases and a broken-off download",
            "routers": "netns (default: a namespace per router) or docker (a container per router; see lab.image)",
            "scenario": "also play these lab scenarios, comma-separated (faults: kill -9, stop, WAN cut, reboot; heal: repairs; "
                        "rotation: a router key rolled in three releases; later: peers that apply a release later)",
            "generate": "prove a WAN generated from this seed (lab/generate.py) instead of --sites; it is kept in "
                        "<results>/sites"},
      default=True, name="run")
def lab_run(c, sites=SITES, kernel=None, results="lab-results", timeout=1500, release=None, routers="netns",
            scenario="", generate=None):
    """Validate, render and prove the WAN in the lab: tunnels, pings through ESP, DNS; print the verdict."""
    from lab.run import LabRequest, run_lab
    from render.cli import print_problems
    from render.errors import WanError
    from render.validate import load_sites
    if release not in (None, "enrol", "full"):
        raise Exit("--release must be enrol or full", code=2)
    if generate is not None:
        from lab.generate import write_generated
        sites = str(write_generated(int(generate), Path(results).resolve().parent / f".{Path(results).name}.sites"))
        print(f"sites: generated from seed {generate} into {sites}")
    try:
        wan = load_sites(sites)  # loaded once: the lab gets the model
    except WanError as e:
        raise Exit(code=print_problems(e)) from None
    print(f"{wan.source_dir}: {len(wan.sites)} sites, {len(wan.tunnels)} tunnels ({wan.topology}): valid")
    scenarios = [("release", {"negatives": release == "full"})] if release else []
    scenarios += [(n.strip(), {}) for n in scenario.split(",") if n.strip()]
    outcome = _lab_errors(lambda: run_lab(LabRequest(sites=Path(sites), wan=wan, kernel=kernel, results=Path(results),
                                                     timeout=float(timeout), routers=routers, scenarios=tuple(scenarios))))
    print(outcome.verdict())
    _exit(0 if outcome.ok else 1)


@task(help={"sites": "the sites directory", "kernel": "host, qemu or uml", "hours": "stop by itself after this long"})
def up(c, sites=SITES, kernel=None, hours=4):
    """Start the lab and keep it running for you to poke around (lab.shell, lab.down)."""
    from lab.session import up as lab_up
    _exit(lab_up(sites, kernel, "lab-results", float(hours)))


@task(help={"place": "a router (site name), <site>-host0, <site>-dns or internet", "cmd": "one command instead of a prompt"})
def shell(c, place, cmd=None):
    """Run commands inside a router (or LAN host, DNS server) of the running lab."""
    from lab.session import shell as lab_shell
    _exit(lab_shell(place, cmd))


@task
def down(c):
    """Stop the lab started by lab.up."""
    from lab.session import down as lab_down
    _exit(lab_down())


@task(help={"tag": "the release tag, vMAJOR.MINOR.PATCH (it must grow)", "sites": "the sites directory",
            "dist": "where dist/<tag>/ goes", "allow_dirty": "release sites with uncommitted changes (a try-out)",
            "allow_older": "a tag older than one released already",
            "on": "refuse unless the released commit is reachable from this ref (CI: origin/main)",
            "lab_result": "attach this lab result.json of the released commit (refused if it failed or proved another commit)",
            "plan": "attach plan.md: what changes on which router since the previous tag"},
      default=True, name="build", positional=[])
def release_build(c, tag=None, sites=SITES, dist="dist", allow_dirty=False, allow_older=False, on=None, lab_result=None,
                  plan=False):
    """Signed per-router bundles for a tag: dist/<tag>/<router>.tar.gz, RELEASE, SHA256SUMS(.sig)."""
    # --tag is a flag, not a positional: a positional would swallow --help as the tag
    if not tag:
        raise Exit("release: --tag vMAJOR.MINOR.PATCH is required (see ./run release --help)", code=2)
    from release import cli
    _exit(cli.release(sites, tag, dist, allow_dirty, allow_older, on, lab_result, plan))


@task(help={"force": "replace an existing pair (every router must then be given the new public key)"})
def keygen(c, force=False):
    """Make the release signing key pair: release/wan-release.pub (commit) and .wan-release.sec (secret)."""
    from release import cli
    _exit(cli.keygen(force))


@task(help={"base": "build from this registry image with a Dockerfile (e.g. debian:bookworm-slim) instead of debootstrap",
            "engine": "guest (a saved data-root for the engine inside User-Mode Linux; default where the host kernel "
                      "has no ESP) or host (import into the host's Docker engine)"})
def image(c, base=None, engine=None):
    """Build the Docker lab's router image once (debootstrap + docker import; cached by its recipe)."""
    from lab.session import build_docker_image
    _exit(_lab_errors(lambda: build_docker_image(base, engine)))


@task(help={"serial": "the program release's number (it must grow)", "dist": "where dist/programs-<serial>/ goes",
            "key": "the program secret key file (default .wan-programs.sec; it lives offline)",
            "allow_dirty": "uncommitted changes (a try-out)"}, default=True, name="release", positional=[])
def programs_release(c, serial=0, dist="dist", key=None, allow_dirty=False):
    """A program release (fetch, reconcile, enrol, the trusted keys) signed by the offline program key."""
    if int(serial) <= 0:
        raise Exit("programs: --serial N is required (a whole number above the last one; see ./run programs --help)", code=2)
    from release import cli
    _exit(cli.programs_release(int(serial), dist, key, allow_dirty))


@task(help={"force": "replace an existing pair (every router must then be re-enrolled by hand)"}, name="keygen")
def programs_keygen(c, force=False):
    """Make the program key pair: release/wan-programs.pub (commit) and .wan-programs.sec (offline, never CI)."""
    from release import cli
    _exit(cli.programs_keygen(force))


lab = Collection("lab", lab_run, up, shell, down, image)
release = Collection("release", release_build, keygen)
programs = Collection("programs", programs_release, programs_keygen)
ns = Collection(validate, render, check, graph, plan, test, lab, release, programs)
