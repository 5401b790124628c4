"""Releases in the lab: routers that start with nothing but their enrolment (the trusted key, the
fetch program, its settings) fetch a signed release from a release server inside the lab, verify
it with the real verifier (signify-openbsd), apply it with reconcile against real pluto; then the
refusals and the rollback are played against one router.

Host side: `scenario()` builds the releases (dist/<tag>/, with the lab's own router keys and a
throw-away signing key) and the enrolment trees, and describes the steps as plain data.
Guest side: `run(lab)` (called by lab/inner.py) serves dist/ from the "internet" namespace and
plays the steps; every step becomes a check row of kind "release".
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER = "100.64.0.80"
URL = f"http://{SERVER}/releases"
GOOD = "v1.0.0"
HEALTH_TIMEOUT = 20


# ---- host side ---------------------------------------------------------------------------------
def scenario(wan, out: Path, results: Path, negatives: bool = True) -> dict:
    """Releases, enrolment trees and the steps. `negatives=False`: only the enrolment fetch."""
    from release import signify
    from release.bundle import build, release_env, resign
    from release.programs import key_id
    from render.render import render_wan

    from .keys import with_wrong_peer_keys

    signing = signify.generate()
    dist = results / "releases"
    build(wan, signing, GOOD, dist, "lab")
    steps = [{"name": "enrol", "tag": GOOD}]
    first = wan.tunnels[0]
    victim = first.initiator  # it brings its own tunnel back after a rollback (no waiting on a peer)
    other = first.peer_of(victim)
    if negatives:
        d = build(wan, signing, "v1.1.0", dist, "lab").dir
        b = bytearray((d / f"{victim}.tar.gz").read_bytes())
        b[len(b) // 2] ^= 0x01
        (d / f"{victim}.tar.gz").write_bytes(bytes(b))
        build(wan, signify.generate(), "v1.2.0", dist, "lab")
        d = build(wan, signing, "v1.3.0", dist, "lab").dir
        shutil.copy(d / f"{other}.tar.gz", d / f"{victim}.tar.gz")
        resign(d, signing)
        build(wan, signing, "v0.9.0", dist, "lab")
        d = build(wan, signing, "v1.4.0", dist, "lab").dir
        (d / ".break-off").write_text(f"{victim}.tar.gz {(d / f'{victim}.tar.gz').stat().st_size // 2}\n")
        trees = render_wan(wan, "lab", release_env("v1.5.0", "lab"))
        # broken on the victim only: it holds a wrong public key for every peer, so none of its tunnels comes up
        trees[victim] = render_wan(with_wrong_peer_keys(wan, victim), "lab", release_env("v1.5.0", "lab"))[victim]
        build(wan, signing, "v1.5.0", dist, "lab", trees=trees)
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
            {"name": "broken release rolled back", "tag": "v1.5.0", "router": victim, "rc": 1,
             "words": f"v1.5.0 was rolled back; {GOOD} is installed again and its tunnels are up", "rollback": True},
        ]
    pub = results / "release.pub"
    pub.write_text(signing.public.text("lab release key (throw-away)"))
    enrol = {}
    for s in wan.sites:
        e = results / "enrol" / s.name
        tree = out / s.name
        for d in sorted(p for p in (tree / "etc").rglob("*") if p.is_dir()):
            (e / d.relative_to(tree)).mkdir(parents=True, exist_ok=True)
        for f in ("etc/ipsec.conf",):  # what the Libreswan package installs
            shutil.copy(tree / f, e / f)
        (e / "etc/wan").mkdir(parents=True, exist_ok=True)
        # as `enrol --install` leaves a router: the trusted key set and the programs (bundles carry none)
        (e / "etc/wan/keys/release").mkdir(parents=True, exist_ok=True)
        shutil.copy(pub, e / "etc/wan/keys/release" / key_id(signing.public))
        for program in ("fetch", "reconcile", "enrol"):
            shutil.copy(REPO / "router" / program, e / "etc/wan" / program)
        downloader = "wget" if s.router.platform == "openwrt" else "curl"
        (e / "etc/wan/fetch.conf").write_text(
            f"WAN_RELEASE_URL={URL}\nWAN_ROUTER={s.name}\nWAN_HEALTH_TIMEOUT={HEALTH_TIMEOUT}\n"
            f"WAN_FETCH_TIMEOUT=20\nWAN_DOWNLOADER={downloader}\n")
        enrol[s.name] = str(e)
    return {"dist": str(dist), "server": SERVER, "steps": steps, "enrol": enrol, "victim": victim}


# ---- guest side --------------------------------------------------------------------------------
class _Server:
    def __init__(self, lab):
        self.lab, self.proc = lab, None
        self.log = lab.state / "release-server.log"

    def start(self) -> None:
        r = self.lab.plan["release"]
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.lab.plan['inet_ns']}", "--", sys.executable, "-m", "release.server",
             r["dist"], r["server"], "80", str(self.lab.state / "release-server.port")],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "a"), cwd=str(Path(__file__).resolve().parent.parent))
        end = time.monotonic() + 30
        while not (self.lab.state / "release-server.port").exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the release server did not start: {self.log.read_text()[-1000:]}")
            time.sleep(0.05)
        (self.lab.state / "release-server.port").unlink()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc:
            self.proc.wait(timeout=10)


def _fetch(lab, name: str, *args: str) -> dict:
    s = lab.sites[name]
    d = lab.state / f"router-{name}"
    env = [f"WAN_RELOAD_DNS={sys.executable} {Path(__file__).resolve().parent / 'dns_reload.py'} {d} {s['platform']}",
           "WAN_RELOAD_FIREWALL=true"]  # the release lab runs without the firewall (see run_lab)
    if s["platform"] == "openwrt":  # OpenWrt's shell and downloader: BusyBox
        shell = ["busybox", "sh"]
        env.append(f"PATH={lab.busybox_bin()}:/usr/sbin:/usr/bin:/sbin:/bin")
    else:
        shell = ["bash"]
    argv = ["nsenter", "-t", str(lab.holders[name].pid), "-m", "-n", "--", "env", *env, *shell, "/etc/wan/fetch", *args]
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-3000:], "t0": t}


def _snapshot(lab, name: str) -> str:
    """Digests of the router's WAN files (fetch's own staging area left out)."""
    script = ("cd /etc && find ipsec.conf ipsec.d wan dnsmasq.d nftables -type f 2>/dev/null "
              "| grep -v -e '^wan/releases/' -e '^wan/previous/' | sort | xargs sha256sum")
    r = subprocess.run(["nsenter", "-t", str(lab.holders[name].pid), "-m", "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    return r.stdout


def _set_latest(lab, tag: str) -> None:
    p = Path(lab.plan["release"]["dist"]) / "latest"
    p.with_suffix(".tmp").write_text(tag + "\n")
    p.with_suffix(".tmp").rename(p)


def _until_traffic(lab, name: str, t0: float, timeout: float = 60) -> float | None:
    """Seconds from t0 (the fetch's start) until a ping from this router's LAN crosses each of the
    tunnels it initiates; None if one does not within the timeout."""
    from lab.probes import ping_many
    s = lab.sites[name]
    probes = []
    for t in lab.plan["tunnels"]:
        if t["initiator"] == name:
            peer = lab.sites[t["b"] if t["a"] == name else t["a"]]
            probes.append((f"/run/netns/{s['lans'][0]['host_ns']}", peer["lans"][0]["host"]))
    end = time.monotonic() + timeout
    while probes:
        res = ping_many(probes, count=1, interval=0, wait=0.5)
        probes = [p for p, r in zip(probes, res) if not r["received"]]
        if time.monotonic() > end:
            return None
    return round(time.monotonic() - t0, 2)


def run(lab) -> None:
    from lab.change import spis
    from lab.inner import progress
    rel = lab.plan["release"]
    server = _Server(lab)
    server.start()
    lab.release = {"enrol": {}, "steps": []}
    try:
        steps = rel["steps"]
        _set_latest(lab, steps[0]["tag"])
        order = lab.plan["start_order"]
        for k, name in enumerate(order, 1):
            r = _fetch(lab, name)
            lab._wait_initiated(name)
            traffic = _until_traffic(lab, name, r["t0"]) if r["rc"] == 0 else None
            ok = r["rc"] == 0 and f"{steps[0]['tag']} applied and healthy" in r["output"] and traffic is not None
            lab.release["enrol"][name] = {"fetch_seconds": r["seconds"], "until_traffic": traffic}
            lab.add("release", name, "enrol", ok, {"step": "enrol", "rc": r["rc"], "fetch_seconds": r["seconds"],
                    "until_traffic_seconds": traffic, "output": r["output"],
                    "why": "" if ok else "the first fetch did not apply the release, or no ping crossed its new tunnels"})
            progress("routers fetched their release", k, len(order), name)
        for k, step in enumerate(steps[1:], 1):
            name = step["router"]
            lab.wait_tunnels_of(name)
            before, spi_before = _snapshot(lab, name), spis(lab, name)
            _set_latest(lab, step["tag"])
            r = _fetch(lab, name)
            after, spi_after = _snapshot(lab, name), spis(lab, name)
            ok = r["rc"] == step["rc"] and step["words"] in r["output"]
            why = [] if ok else [f"expected exit {step['rc']} saying '{step['words']}'"]
            if step.get("rollback"):
                up = lab.wait_tunnels_of(name)
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
            if step.get("server_dies"):
                died = server.proc.wait(timeout=10) == 3
                ok = ok and died
                if not died:
                    why.append("the server did not stop mid-download")
                server.start()
            lab.release["steps"].append({"step": step["name"], "rc": r["rc"], "seconds": r["seconds"], "ok": ok})
            lab.add("release", name, step["name"], ok, {"step": step["name"], "tag": step["tag"], "rc": r["rc"],
                    "seconds": r["seconds"], "output": r["output"], "why": "; ".join(why)})
            progress("release cases", k, len(steps) - 1, step["name"])
        _set_latest(lab, steps[0]["tag"])
    finally:
        server.stop()
