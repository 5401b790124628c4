"""A change in the running lab: every router gets its new tree the way a real router would.

mode "reconcile": the router's own program (router/reconcile, as a program release installs it; trees
carry no program) runs in the router, against real pluto; new routers start; removed routers stop.
mode "restart": for contrast, the new files are copied in and pluto is restarted everywhere
(what the racoon-era WAN had to do).
Several changes may follow each other in one lab (options "to": a list of sites directories).
Evidence per change: the SPIs of every tunnel the change does not touch (they must survive), a
ping stream across such a tunnel (it must lose nothing), and how long each router took.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from render import paths
from render.manifest import Manifest
from render.render import render_wan, write_trees

from ..contracts import Check, Record, WanView
from ..network import ns_path
from ..probes import ping_many
from ..proofs import sa_kept
from . import PrepareContext, Prepared

STAGE = "after_tunnels"

RECONCILE = Path(__file__).resolve().parents[2] / "router" / "reconcile"


@dataclass(frozen=True)
class Stream(Record):
    tunnel: str
    from_ns: str
    to: str


@dataclass(frozen=True)
class Step(Record):
    after: WanView
    new: tuple[str, ...]
    gone: tuple[str, ...]
    unchanged_tunnels: tuple[str, ...]
    stream: Stream | None


@dataclass(frozen=True)
class ChangeData(Record):
    mode: str  # reconcile | restart
    steps: tuple[Step, ...]


# ---- host side -----------------------------------------------------------------------------------
def revisions(options: dict) -> list[Path]:
    return [Path(p) for p in options["to"]]


def digests(out: Path, wan) -> dict[str, list[tuple]]:
    d: dict[str, list[tuple]] = {}
    for s in wan.sites:
        for t, v in Manifest.read(out / s.name / paths.MANIFEST).tunnels.items():
            d.setdefault(t, []).append((s.name, v.conf_sha256))
    return d


def prepare(ctx: PrepareContext) -> Prepared:
    wans = [(ctx.wan, ctx.out)]
    notes: list[str] = []
    for k, sites in enumerate(revisions(ctx.options), 1):
        wan, more = ctx.load(sites)
        notes += more
        out = ctx.results / f"out-after{k}"
        write_trees(render_wan(wan, f"after{k}"), out)
        wans.append((wan, out))
    names = sorted({s.name for wan, _ in wans for s in wan.sites})
    index = {n: i for i, n in enumerate(names)}
    views = [ctx.view(wan, out, index) for wan, out in wans]
    steps = []
    for (wb, ob), (wa, oa), vb, va in zip(wans, wans[1:], views, views[1:], strict=False):
        db, da = digests(ob, wb), digests(oa, wa)
        old = {t.name: t for t in vb.tunnels}
        unchanged = tuple(t.name for t in va.tunnels if t.name in old and sorted(db[t.name]) == sorted(da[t.name]))
        stream = None
        if unchanged:  # a ping stream across a tunnel the change does not touch: it must lose nothing
            t = old[unchanged[0]]
            stream = Stream(tunnel=t.name, from_ns=vb.site(t.a).lans[0].host_ns, to=vb.site(t.b).lans[0].host)
        steps.append(Step(after=va, new=tuple(sorted(set(va.names) - set(vb.names))),
                          gone=tuple(sorted(set(vb.names) - set(va.names))), unchanged_tunnels=unchanged, stream=stream))
    data = ChangeData(mode=ctx.options.get("mode", "reconcile"), steps=tuple(steps))
    return Prepared(data=data.to_dict(), index=index, more_sites=views[1:], notes=notes)


# ---- in the lab ----------------------------------------------------------------------------------
class PingStream:
    """ICMP echoes every 20 ms across one tunnel while the change runs."""

    def __init__(self, ns: str, dst: str):
        self.ns, self.dst = ns, dst
        self.sent = self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = ping_many([(ns_path(self.ns), self.dst)] * 10, count=1, interval=0, wait=1.0)
            self.sent += sum(x["sent"] for x in r)
            self.received += sum(x["received"] for x in r)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)  # the echoes sent last get their chance to come back
        self._stop.set()
        self._thread.join(timeout=30)


def _reconcile(router, tree: str) -> dict:
    t = time.monotonic()
    r = router.exec(["sh", str(RECONCILE), tree], env=router.reload_env(), timeout=300)
    return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-4000:]}


def _restart(router, tree: str) -> dict:
    t = time.monotonic()
    router.stop()
    r = router.exec(["cp", "-a", f"{tree}/etc/.", "/etc/"], timeout=60)
    if r.returncode == 0:
        router.start_ipsec()
    return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-4000:]}


def _one(lab, mode: str, step: Step) -> dict:
    before_view = lab.view
    before = {n: r.spis() for n, r in lab.routers.items() if n in before_view.names}
    for s in step.after.sites:  # LANs renumbered by the change: the router's bridge and the hosts follow
        if s.name in before_view.names and before_view.site(s.name).lans != s.lans:
            lab.network.readdress(before_view.site(s.name), s)
    lab.switch_view(step.after)  # from here on the lab proves the new WAN
    per_router: dict[str, dict] = {}
    t0 = time.monotonic()
    stream = PingStream(step.stream.from_ns, step.stream.to) if step.stream else None
    if stream:
        stream.__enter__()
    try:
        order = step.after.start_order
        for k, name in enumerate(order, 1):
            if name in step.new:
                t = time.monotonic()
                lab.start_routers([name], mode="serial")
                per_router[name] = {"rc": 0, "seconds": round(time.monotonic() - t, 2), "output": "new router started"}
            else:
                apply = _reconcile if mode == "reconcile" else _restart
                per_router[name] = apply(lab.routers[name], step.after.site(name).tree)
                lab.wait_initiated(name)
            per_router[name]["until_new_tunnels_up"] = round(time.monotonic() - t0, 2)
            print(f"@@ change {k}/{len(order)} {name}", flush=True)
        for name in step.gone:
            lab.routers[name].stop()
            per_router[name] = {"rc": 0, "seconds": 0, "output": "router removed: pluto shut down"}
    finally:
        if stream:
            stream.__exit__(None, None, None)
    lab.wait_tunnels()
    after = {n: lab.routers[n].spis() for n in step.after.names}
    disturbed = []
    for name in step.unchanged_tunnels:
        tun = next(t for t in before_view.tunnels if t.name == name)
        kept = sa_kept(before_view, before, after, tun)
        if not kept:
            disturbed.append(name)
        why = "" if kept else "its SAs were torn down or rekeyed by the change"
        lab.add(Check("sa_kept", tun.a, tun.b, kept, {"tunnel": name, "why": why}))
    for name, r in per_router.items():
        lab.add(Check("change", name, name, r["rc"] == 0, {"mode": mode, **r}))
    if stream:
        lab.add(Check("stream", "stream", "stream", stream.sent > 0 and stream.received == stream.sent,
                      {"tunnel": step.stream.tunnel, "sent": stream.sent, "lost": stream.sent - stream.received}))
    return {"mode": mode, "routers": {n: {k: v for k, v in r.items() if k != "output"} for n, r in per_router.items()},
            "unchanged_tunnels": len(step.unchanged_tunnels), "disturbed": disturbed,
            "stream": {"sent": stream.sent, "lost": stream.sent - stream.received} if stream else None,
            "seconds": round(time.monotonic() - t0, 2)}


def play(lab, data: dict) -> None:
    d = ChangeData.from_dict(data)
    lab.report("change", {"steps": [_one(lab, d.mode, step) for step in d.steps]})
