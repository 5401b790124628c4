"""Releases in the lab: routers that start with nothing but their enrolment (the trusted key, the
fetch program, its settings) fetch a signed release from a release server inside the lab, verify
it with the real verifier (signify-openbsd), apply it with reconcile against real pluto; then
(options "negatives": true) the refusals and the rollback are played against one router.

Host side: `prepare()` builds the releases (dist/<tag>/, rendered with the lab's own router keys,
signed with a throw-away signing key) and the enrolment trees, and describes the steps as data.
In the lab: `play(lab)` serves dist/ from the "internet" namespace and plays the steps; every
step becomes a check row of kind "release".
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from release import signify
from release.bundle import build, release_env, resign
from release.programs import key_id
from render.render import render_wan

from ..contracts import Check, Record
from ..keys import with_wrong_peer_keys
from ..network import ns_path, popen_ns
from ..probes import ping_many
from ..proc import LabError, progress
from ..proofs import wait_tunnels_of
from . import PrepareContext, Prepared

STAGE = "before_tunnels"
GOOD = "v1.0.0"
HEALTH_TIMEOUT = 20

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ReleaseStep(Record):
    name: str
    tag: str
    router: str = ""
    rc: int = 0
    words: str = ""
    server_dies: bool = False
    rollback: bool = False


@dataclass(frozen=True)
class ReleaseData(Record):
    dist: str
    steps: tuple[ReleaseStep, ...]
    victim: str


# ---- host side ---------------------------------------------------------------------------------
def prepare(ctx: PrepareContext, signing: signify.SecretKey | None = None) -> Prepared:
    """Releases, enrolment trees and the steps. Without options["negatives"]: only the enrolment fetch.
    `signing`: the lab's release key (another scenario that signs more releases passes its own)."""
    negatives = bool(ctx.options.get("negatives", True))
    signing = signing or signify.generate()
    dist = ctx.results / "releases"
    build(ctx.wan, signing, GOOD, dist, "lab")
    steps = [{"name": "enrol", "tag": GOOD}]
    first = ctx.wan.tunnels[0]
    victim = first.initiator  # it brings its own tunnel back after a rollback (no waiting on a peer)
    other = first.peer_of(victim)
    if negatives:
        d = build(ctx.wan, signing, "v1.1.0", dist, "lab").dir
        b = bytearray((d / f"{victim}.tar.gz").read_bytes())
        b[len(b) // 2] ^= 0x01
        (d / f"{victim}.tar.gz").write_bytes(bytes(b))
        build(ctx.wan, signify.generate(), "v1.2.0", dist, "lab")
        d = build(ctx.wan, signing, "v1.3.0", dist, "lab").dir
        shutil.copy(d / f"{other}.tar.gz", d / f"{victim}.tar.gz")
        resign(d, signing)
        build(ctx.wan, signing, "v0.9.0", dist, "lab")
        d = build(ctx.wan, signing, "v1.4.0", dist, "lab").dir
        (d / ".break-off").write_text(f"{victim}.tar.gz {(d / f'{victim}.tar.gz').stat().st_size // 2}\n")
        # signed and valid, but stale (its WAN_EXPIRES passed) or from the future (the router's clock
        # is behind it): fetch exits 4 and 5, nothing changed (router/fetch, "freshness")
        day = 86400
        build(ctx.wan, signing, "v1.6.0", dist, "lab", date=int(time.time()) - (ctx.wan.release_valid_days + 2) * day)
        build(ctx.wan, signing, "v1.7.0", dist, "lab", date=int(time.time()) + 2 * day)
        # broken on the victim only: it holds a wrong public key for every peer (one nobody has the
        # private half of), so none of its tunnels authenticates; its peers' trees are unchanged,
        # so its peers.list shows no peer that changed too: fetch must roll back, not wait
        trees = render_wan(ctx.wan, "lab", release_env("v1.8.0", "lab"))
        trees[victim] = render_wan(with_wrong_peer_keys(ctx.wan, victim), "lab", release_env("v1.8.0", "lab"))[victim]
        build(ctx.wan, signing, "v1.8.0", dist, "lab", trees=trees)
        steps += [
            {"name": "tampered bundle", "tag": "v1.1.0", "router": victim, "rc": 2,
             "words": f"{victim}.tar.gz does not match the signed SHA256SUMS"},
            {"name": "bad signature", "tag": "v1.2.0", "router": victim, "rc": 2,
             "words": "is not signed by a trusted release key"},
            {"name": "bundle for another router", "tag": "v1.3.0", "router": victim, "rc": 2,
             "words": f"the bundle is for router '{other}'"},
            {"name": "downgrade", "tag": "v0.9.0", "router": victim, "rc": 2, "words": f"older than the installed {GOOD}"},
            {"name": "download breaks off", "tag": "v1.4.0", "router": victim, "rc": 1, "words": "cannot download",
             "server_dies": True},
            {"name": "expired release", "tag": "v1.6.0", "router": victim, "rc": 4,
             "words": "EXPIRED: the newest release v1.6.0 expired"},
            {"name": "clock behind the release", "tag": "v1.7.0", "router": victim, "rc": 5,
             "words": "CLOCK: this router's clock says"},
            {"name": "broken release rolled back", "tag": "v1.8.0", "router": victim, "rc": 1,
             "words": f"v1.8.0 was rolled back; {GOOD} is installed again and its tunnels are up", "rollback": True},
        ]
    data = ReleaseData(dist=str(dist), steps=tuple(ReleaseStep(**s) for s in steps), victim=victim)
    return Prepared(data=data.to_dict(), install=enrolment(ctx, signing), serve_release=True,
                    no_firewall="the release lab installs no firewall: the firewall was NOT exercised")


def enrolment(ctx: PrepareContext, signing, health_timeout: int = HEALTH_TIMEOUT, fetch_timeout: int = 20) -> dict[str, str]:
    """router -> the tree it starts from: its enrolment only (the trusted release key, fetch.conf
    naming the lab's release server, this WAN_HEALTH_TIMEOUT and WAN_FETCH_TIMEOUT). Other scenarios
    enrol with it too."""
    pub = ctx.results / "release.pub"
    pub.write_text(signing.public.text("lab release key (throw-away)"))
    trees = {}
    for s in ctx.wan.sites:
        e = ctx.results / "enrol" / s.name
        tree = ctx.out / s.name
        for d in sorted(p for p in (tree / "etc").rglob("*") if p.is_dir()):
            (e / d.relative_to(tree)).mkdir(parents=True, exist_ok=True)
        (e / "etc/wan").mkdir(parents=True, exist_ok=True)
        # as `enrol --install` leaves a router: the trusted key set here, the programs (bundles carry
        # none) put in by the router's install (lab/platform.py enrolled_files)
        (e / "etc/wan/keys/release").mkdir(parents=True, exist_ok=True)
        shutil.copy(pub, e / "etc/wan/keys/release" / key_id(signing.public))
        downloader = "wget" if s.router.platform == "openwrt" else "curl"
        (e / "etc/wan/fetch.conf").write_text(
            f"WAN_RELEASE_URL=http://{ctx.infra.release_server}/releases\nWAN_ROUTER={s.name}\nWAN_HEALTH_TIMEOUT={health_timeout}\n"
            f"WAN_FETCH_TIMEOUT={fetch_timeout}\nWAN_DOWNLOADER={downloader}\n")
        trees[s.name] = str(e)
    return trees


# ---- in the lab --------------------------------------------------------------------------------
class Server:
    def __init__(self, lab, dist: str):
        self.lab, self.dist, self.proc = lab, dist, None
        self.log = lab.state / "release-server.log"
        self.port = lab.state / "release-server.port"

    def start(self) -> None:
        infra = self.lab.plan.infra
        self.proc = popen_ns(infra.inet_ns, [sys.executable, "-m", "release.server", self.dist, infra.release_server, "80",
                                             str(self.port)], stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        end = time.monotonic() + 30
        while not self.port.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise LabError(f"the release server did not start: {self.log.read_text()[-1000:]}")
            time.sleep(0.05)
        self.port.unlink()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc:
            self.proc.wait(timeout=10)


def _busybox_bin(lab) -> Path:
    """A directory whose `wget` is BusyBox's (OpenWrt's downloader, ahead of the host's)."""
    d = lab.state / "busybox-bin"
    if not d.exists():
        d.mkdir()
        (d / "wget").symlink_to(shutil.which("busybox"))
    return d


def fetch(lab, name: str, watch: tuple[str, ...] = ()) -> dict:
    """The router's real fetch, run once. `watch`: words of its log whose first appearance is timed
    (result "marks": word -> monotonic time; the log is then read as it is written)."""
    router = lab.routers[name]
    env = router.reload_env()
    env["WAN_RELOAD_FIREWALL"] = "true"  # the release lab runs without the firewall (see Prepared.no_firewall)
    if router.site.platform == "openwrt":  # OpenWrt's shell and downloader: BusyBox
        shell = ["busybox", "sh"]
        env["PATH"] = f"{_busybox_bin(lab)}:/usr/sbin:/usr/bin:/sbin:/bin"
    else:
        shell = ["bash"]
    t = time.monotonic()
    if not watch:
        r = router.exec([*shell, "/etc/wan/fetch"], env=env, timeout=300)
        return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-3000:], "t0": t}
    marks: dict[str, float] = {}
    out = []
    p = subprocess.Popen([*router.enter(), "env", *(f"{k}={v}" for k, v in env.items()), *shell, "/etc/wan/fetch"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(300, p.kill)
    killer.start()
    try:
        for line in p.stdout:
            out.append(line)
            for w in watch:
                if w in line and w not in marks:
                    marks[w] = time.monotonic()
        rc = p.wait()
    finally:
        killer.cancel()
    return {"rc": rc, "seconds": round(time.monotonic() - t, 2), "output": "".join(out)[-3000:], "t0": t, "marks": marks}


def _snapshot(router) -> str:
    """Digests of the router's WAN files (fetch's own staging area left out)."""
    script = ("cd /etc && find ipsec.conf ipsec.d wan dnsmasq.d nftables -type f 2>/dev/null "
              "| grep -v -e '^wan/releases/' -e '^wan/previous/' | sort | xargs sha256sum")
    return router.exec(["sh", "-c", script]).stdout


def set_latest(dist: str, tag: str) -> None:
    p = Path(dist) / "latest"
    p.with_suffix(".tmp").write_text(tag + "\n")
    p.with_suffix(".tmp").rename(p)


def _until_traffic(lab, name: str, t0: float, timeout: float = 60) -> float | None:
    """Seconds from t0 (the fetch's start) until a ping from this router's LAN crosses each of the
    tunnels it initiates; None if one does not within the timeout."""
    view = lab.view
    s = view.site(name)
    probes = [(ns_path(s.lans[0].host_ns), view.site(t.peer_of(name)).lans[0].host) for t in view.tunnels if t.initiator == name]
    end = time.monotonic() + timeout
    while probes:
        res = ping_many(probes, count=1, interval=0, wait=0.5)
        probes = [p for p, r in zip(probes, res, strict=True) if not r["received"]]
        if time.monotonic() > end:
            return None
    return round(time.monotonic() - t0, 2)


def enrol(lab, d: ReleaseData, report: dict) -> None:
    good = d.steps[0].tag
    order = lab.view.start_order
    for k, name in enumerate(order, 1):
        r = fetch(lab, name)
        lab.wait_initiated(name)
        traffic = _until_traffic(lab, name, r["t0"]) if r["rc"] == 0 else None
        ok = r["rc"] == 0 and f"{good} applied and healthy" in r["output"] and traffic is not None
        report["enrol"][name] = {"fetch_seconds": r["seconds"], "until_traffic": traffic}
        lab.add(Check("release", name, "enrol", ok, {
            "step": "enrol", "rc": r["rc"], "fetch_seconds": r["seconds"], "until_traffic_seconds": traffic,
            "output": r["output"],
            "why": "" if ok else "the first fetch did not apply the release, or no ping crossed its new tunnels"}))
        progress("routers fetched their release", k, len(order), name)


def _refusal(lab, server: Server, d: ReleaseData, step: ReleaseStep) -> Check:
    router = lab.routers[step.router]
    wait_tunnels_of(router)
    before, spi_before = _snapshot(router), router.spis()
    set_latest(d.dist, step.tag)
    r = fetch(lab, step.router)
    after, spi_after = _snapshot(router), router.spis()
    ok = r["rc"] == step.rc and step.words in r["output"]
    why = [] if ok else [f"expected exit {step.rc} saying '{step.words}'"]
    if step.rollback:
        up = wait_tunnels_of(router)
        ok = ok and up and after == before
        if not up:
            why.append("its tunnels did not come back")
        if after != before:
            why.append("its files are not those of the release it rolled back to")
    else:
        same = after == before and spi_after == spi_before
        ok = ok and same
        if not same:
            why.append("the router changed (files or SAs) though the release was refused")
    if step.server_dies:
        died = server.proc.wait(timeout=10) == 3
        ok = ok and died
        if not died:
            why.append("the server did not stop mid-download")
        server.start()
    return Check("release", step.router, step.name, ok, {"step": step.name, "tag": step.tag, "rc": r["rc"],
                 "seconds": r["seconds"], "output": r["output"], "why": "; ".join(why)})


def play(lab, data: dict) -> None:
    d = ReleaseData.from_dict(data)
    server = Server(lab, d.dist)
    server.start()
    report: dict = {"enrol": {}, "steps": []}
    try:
        set_latest(d.dist, d.steps[0].tag)
        enrol(lab, d, report)
        for k, step in enumerate(d.steps[1:], 1):
            c = _refusal(lab, server, d, step)
            lab.add(c)
            report["steps"].append({"step": step.name, "rc": c.evidence["rc"], "seconds": c.evidence["seconds"], "ok": c.ok})
            progress("release cases", k, len(d.steps) - 1, step.name)
        set_latest(d.dist, d.steps[0].tag)
    finally:
        server.stop()
        lab.report("release", report)

