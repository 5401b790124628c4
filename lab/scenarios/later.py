"""Peers that apply later (docs/releases.md): routers enrol and fetch release 1 from the lab's release
server (the release scenario's server, enrolment and fetch), then release 2, which changes BOTH
ends of several tunnels, is published and every router runs its real fetch at its own random moment,
spread over several WAN_HEALTH_TIMEOUTs (shortened for the lab). The change: the crypto profile of
the tunnels of one site (by default the OpenWrt one, as `overrides: crypto_profile:` in its site file
would), to proposals the old profile does not accept, so such a tunnel is down from the moment its
first end applies until its second end has applied too (IKE answers NO_PROPOSAL_CHOSEN until then).
Its other tunnels (between the other sites) are unchanged.

Evidence: each fetch's exit code and words (applied, healthy or waiting for its peers; never rolled
back), a ping probe across every changed tunnel every half second (its outage: from the last echo
answered before it went down to the first one answered after its second end began to apply, the
moment fetch logs "applying"; the probes while only one end had applied must all be lost: the change
really breaks the tunnel), a ping stream across an unchanged
tunnel (it loses nothing; its SAs are kept), then one more fetch on every router as its timer would run
it (it clears WAN_STATE/pending once the peers caught up): every router on release 2, nothing pending,
nothing marked failed, every tunnel up on both ends.

The seed of the moments is printed, is in result.json (scenarios/later/seed), and options {"seed": N}
(or WAN_LAB_LATER_SEED=N for `./run lab --scenario later`) plays the same moments again.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

from release import signify
from release.bundle import build
from render.model import CryptoProfile, Wan
from render.render import render_wan, write_trees

from ..contracts import Check, Record
from ..network import ns_path
from ..probes import ping_many
from ..proc import LabError, progress
from ..proofs import wait_tunnels_of
from . import PrepareContext, Prepared
from .change import PingStream, Stream, digests
from .release import ReleaseData, ReleaseStep, Server, enrol, enrolment, fetch, set_latest

STAGE = "before_tunnels"
FIRST, SECOND = "v1.0.0", "v2.0.0"
HEALTH_TIMEOUT = 12  # WAN_HEALTH_TIMEOUT in the lab (the field's default is 120 s)
# WAN_FETCH_TIMEOUT: the routers download at once from one server in a User-Mode Linux kernel, where
# every process start costs 0.1-0.2 s; 20 s (the release scenario's) ran out (the field's default: 60)
FETCH_TIMEOUT = 90
SPREAD = 4  # the moments fall within this many WAN_HEALTH_TIMEOUTs
SETTLE = 75  # pluto's own retries after the last apply (IKE_SA_INIT retransmits back off to 32 s)
PROBE_PERIOD = 0.5
APPLYING = f"applying {SECOND}"  # fetch logs it just before its reconcile changes anything
# the changed tunnels' profile: nothing in common with the lab WANs' own ("modern": aes256, dh19,
# aes_gcm256), so an end that still runs the old one answers NO_PROPOSAL_CHOSEN
PROFILE = CryptoProfile(name="later", ike=("aes128-sha2_256;dh19",), esp=("aes_gcm128",))


@dataclass(frozen=True)
class Probe(Record):
    tunnel: str
    a: str
    b: str
    from_ns: str
    to: str


@dataclass(frozen=True)
class LaterData(Record):
    dist: str
    seed: int
    health_timeout: int
    moments: tuple[tuple[str, float], ...]  # router, seconds after release 2 is published
    changed_sites: tuple[str, ...]
    changed: tuple[Probe, ...]
    unchanged: tuple[str, ...]
    stream: Stream | None


# ---- host side ---------------------------------------------------------------------------------
def with_profile(wan: Wan, sites: set[str], profile: CryptoProfile = PROFILE) -> Wan:
    """The WAN as it is when these sites name `profile` under overrides.crypto_profile: each of their
    tunnels takes it, at both ends (render/topology.py: both ends of a tunnel use one profile)."""
    return dataclasses.replace(
        wan, sites=tuple(dataclasses.replace(s, crypto_profile=profile.name) if s.name in sites else s for s in wan.sites),
        tunnels=tuple(dataclasses.replace(t, crypto=profile) if {t.a, t.b} & sites else t for t in wan.tunnels))


def moments(seed: int, names: list[str], pairs: list[tuple[str, str]], health_timeout: int) -> list[tuple[str, float]]:
    """A random moment per router within SPREAD health timeouts; drawn again (from the same seed) until
    the two ends of at least one changed tunnel fetch more than two health timeouts apart and a
    download, so that at least one end must find its tunnel down and wait for its peer, and the probes
    see the tunnel down before its second end begins to apply."""
    rng = random.Random(seed)
    while True:
        m = {n: round(rng.uniform(0, SPREAD * health_timeout), 1) for n in names}
        if any(abs(m[a] - m[b]) >= 2 * health_timeout + 8 for a, b in pairs):
            return sorted(m.items(), key=lambda x: (x[1], x[0]))


def prepare(ctx: PrepareContext) -> Prepared:
    wan = ctx.wan
    names = [s.name for s in wan.sites]
    sites = set(ctx.options.get("sites") or [next((s.name for s in wan.sites if s.router.platform == "openwrt"), names[0])])
    if not sites <= set(names):
        raise LabError(f"later: no site {', '.join(sorted(sites - set(names)))} in this WAN; choose among {', '.join(names)}")
    later = with_profile(wan, sites)
    out2 = ctx.results / "out-later"
    write_trees(render_wan(later, "lab"), out2)
    before, after = digests(ctx.out, wan), digests(out2, later)
    changed = [t for t in wan.tunnels if before[t.name] != after[t.name]]
    unchanged = [t for t in wan.tunnels if before[t.name] == after[t.name]]
    # both ends changed, or it is not the case this scenario proves
    both = all(dict(before[t.name])[e] != dict(after[t.name])[e] for t in changed for e in (t.a, t.b))
    if len(changed) < 2 or not unchanged or not both:
        raise LabError(f"later: changing the crypto profile of {', '.join(sorted(sites))} must change both ends of several "
                       "tunnels and leave one unchanged; use a WAN of at least four sites (tests/lab/wans/four)")
    given = ctx.options.get("seed", os.environ.get("WAN_LAB_LATER_SEED") or None)
    if given is not None and not str(given).isdigit():
        raise LabError(f"later: the seed must be a whole number (WAN_LAB_LATER_SEED or the option seed), not {given!r}")
    seed = int(given) if given is not None else random.randrange(10**6)
    when = moments(seed, names, [(t.a, t.b) for t in changed], HEALTH_TIMEOUT)
    print(f"later: seed {seed} (WAN_LAB_LATER_SEED={seed} or options seed reproduces it): "
          + ", ".join(f"{n} at {s} s" for n, s in when), file=sys.stderr, flush=True)
    signing = signify.generate()
    dist = ctx.results / "releases"
    build(wan, signing, FIRST, dist, "lab")
    build(later, signing, SECOND, dist, "lab")
    view = ctx.view(wan, ctx.out, None)
    probes = tuple(Probe(tunnel=t.name, a=t.a, b=t.b, from_ns=view.site(t.a).lans[0].host_ns, to=view.site(t.b).lans[0].host)
                   for t in changed)
    t = unchanged[0]
    stream = Stream(tunnel=t.name, from_ns=view.site(t.a).lans[0].host_ns, to=view.site(t.b).lans[0].host)
    data = LaterData(dist=str(dist), seed=seed, health_timeout=HEALTH_TIMEOUT, moments=tuple(when),
                     changed_sites=tuple(sorted(sites)), changed=probes, unchanged=tuple(t.name for t in unchanged),
                     stream=stream)
    return Prepared(data=data.to_dict(), install=enrolment(ctx, signing, HEALTH_TIMEOUT, FETCH_TIMEOUT), serve_release=True,
                    no_firewall="the release lab installs no firewall: the firewall was NOT exercised")


# ---- in the lab --------------------------------------------------------------------------------
class Prober:
    """One ICMP echo across each changed tunnel every PROBE_PERIOD: (time, answered per tunnel)."""

    def __init__(self, probes: tuple[Probe, ...]):
        self.targets = [(ns_path(p.from_ns), p.to) for p in probes]
        self.rows: list[tuple[float, list[bool]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            r = ping_many(self.targets, count=1, interval=0, wait=PROBE_PERIOD)
            self.rows.append((t, [x["received"] > 0 for x in r]))
            time.sleep(max(0.0, PROBE_PERIOD - (time.monotonic() - t)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


def outage(rows: list[tuple[float, bool]], first: float, second: float) -> dict:
    """One changed tunnel's probes (time, answered): `first` and `second` the moments its two ends
    began to apply (fetch's "applying"). `seconds`: from the last echo answered before it went down to
    the first one answered after its second end began to apply; `one_end`: the probes from its going
    down until then (only one end had applied: none may be answered)."""
    down = next((t for t, ok in rows if t >= first and not ok), None)
    if down is None:
        return {"seconds": None, "broke": False, "probes_while_one_end": 0, "answered_while_one_end": 0}
    last_ok = max((t for t, ok in rows if t < down and ok), default=first)
    back = next((t for t, ok in rows if t >= max(second, down) and ok), None)
    window = [ok for t, ok in rows if down <= t < second]
    return {"seconds": round(back - last_ok, 1) if back is not None else None, "broke": True,
            "probes_while_one_end": len(window), "answered_while_one_end": sum(window)}


def _marker(router) -> dict:
    r = router.exec(["sh", "-c", "sed -n 's/^WAN_TAG=//p' /etc/wan/release.env; echo --; "
                     "test -e /etc/wan/releases/pending && echo pending; echo --; cat /etc/wan/releases/failed 2>/dev/null"])
    tag, pending, failed = (r.stdout.split("--\n") + ["", ""])[:3]
    return {"tag": tag.strip(), "pending": pending.strip() == "pending", "failed": failed.split()}


def _conn_spis(lab, tunnels: list[str]) -> dict[tuple[str, str], set[str]]:
    out = {}
    for t in (x for x in lab.view.tunnels if x.name in tunnels):
        for end in (t.a, t.b):
            spis = lab.routers[end].spis()
            for c in lab.view.site(end).conns[t.name]:
                out[(end, c)] = spis.get(c, set())
    return out


def play(lab, data: dict) -> None:
    d = LaterData.from_dict(data)
    server = Server(lab, d.dist)
    server.start()
    report: dict = {"seed": d.seed, "health_timeout": d.health_timeout, "moments": dict(d.moments),
                    "changed_sites": list(d.changed_sites), "unchanged": list(d.unchanged), "enrol": {}}
    try:
        set_latest(d.dist, FIRST)
        enrol(lab, ReleaseData(dist=d.dist, steps=(ReleaseStep(name="enrol", tag=FIRST),), victim=""), report)
        for r in lab.routers.values():
            wait_tunnels_of(r)
        _apply_later(lab, d, report)
    finally:
        server.stop()
        lab.report("later", report)


def _apply_later(lab, d: LaterData, report: dict) -> None:
    spis_before = _conn_spis(lab, list(d.unchanged))
    runs: dict[str, dict] = {}

    def one(name: str, at: float, into: dict) -> None:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        into[name] = fetch(lab, name, watch=(APPLYING,))

    def all_up(deadline: float) -> dict[str, bool]:
        return {n: wait_tunnels_of(r, timeout=max(0.0, deadline - time.monotonic())) for n, r in lab.routers.items()}

    def at_once(moments, into: dict) -> None:
        threads = [threading.Thread(target=one, args=(n, at, into), daemon=True) for n, at in moments]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)

    with Prober(d.changed) as prober, PingStream(d.stream.from_ns, d.stream.to) as stream:
        set_latest(d.dist, SECOND)
        t0 = time.monotonic()
        at_once(d.moments, runs)
        progress("routers fetched release 2 at their moments", len(runs), len(d.moments))
        # their timers' next run: after the peers applied, it finds the tunnels up and clears `pending`
        # (or repairs a Child SA pluto gave up); first give pluto's own retries their time
        settled = all_up(time.monotonic() + SETTLE)
        final: dict[str, dict] = {}
        at_once([(n, 0.0) for n in lab.routers], final)
        t0_final = time.monotonic()
        up = all_up(time.monotonic() + 60)
        report["final_until_all_up"] = round(time.monotonic() - t0_final, 2)
        time.sleep(2 * PROBE_PERIOD)  # the prober sees the last tunnel back
    spis_after = _conn_spis(lab, list(d.unchanged))
    rel = lambda t: round(t - t0, 2)  # noqa: E731
    report["fetches"] = {n: {"at": rel(r["t0"]), "applying_at": rel(r["marks"][APPLYING]) if APPLYING in r["marks"] else None,
                             "rc": r["rc"], "seconds": r["seconds"],
                             "pending": "wait for their peers" in r["output"]} for n, r in sorted(runs.items())}
    report["settled_without_a_fetch"] = settled
    report["final"] = {n: {"rc": r["rc"], "seconds": r["seconds"]} for n, r in sorted(final.items())}
    for name in sorted(lab.routers):
        r, m = runs.get(name), _marker(lab.routers[name])
        f = final.get(name) or {"rc": None, "seconds": None, "output": "(the run did not end)"}
        ok = (r is not None and r["rc"] == 0 and f"{SECOND} applied" in r["output"] and "rolling back" not in r["output"]
              and f["rc"] == 0 and "rolling back" not in f["output"] and m["tag"] == SECOND and not m["pending"]
              and SECOND not in m["failed"] and up[name])
        why = [] if ok else [w for w, bad in (
            ("its fetch at its moment did not apply release 2 (or rolled back)",
             r is None or r["rc"] != 0 or f"{SECOND} applied" not in r["output"] or "rolling back" in r["output"]),
            ("its next scheduled fetch failed or rolled back", f["rc"] != 0 or "rolling back" in f["output"]),
            (f"it ends on {m['tag'] or 'no release'}, not {SECOND}", m["tag"] != SECOND),
            ("WAN_STATE/pending is still there", m["pending"]), (f"{SECOND} is marked failed", SECOND in m["failed"]),
            ("not every tunnel of it is up", not up[name])) if bad]
        lab.add(Check("later", name, "release 2", ok, {
            "at": dict(d.moments)[name], "rc": r["rc"] if r else None, "final_rc": f["rc"], "marker": m,
            "output": (r["output"] if r else "") + "\n--- next scheduled run ---\n" + f["output"], "why": "; ".join(why)}))
    outages = {}
    for i, p in enumerate(d.changed):
        ra, rb = runs.get(p.a), runs.get(p.b)
        if not ra or not rb:
            continue
        if APPLYING not in ra["marks"] or APPLYING not in rb["marks"]:
            continue
        first, second = sorted((ra, rb), key=lambda r: r["marks"][APPLYING])
        o = outage([(t, oks[i]) for t, oks in prober.rows], first["marks"][APPLYING], second["marks"][APPLYING])
        o.update(first_end=p.a if first is ra else p.b,
                 applying_at=[rel(first["marks"][APPLYING]), rel(second["marks"][APPLYING])])
        outages[p.tunnel] = o
        ok = o["broke"] and o["seconds"] is not None and o["answered_while_one_end"] == 0
        why = ("" if ok else "it never went down: the change did not break it" if not o["broke"]
               else "it did not come back" if o["seconds"] is None else "pings crossed it while only one end had applied")
        lab.add(Check("later_outage", p.a, p.b, ok, {"tunnel": p.tunnel, **o, "why": why}))
    report["outages"] = outages
    # at least one changed tunnel was seen down while only one end had applied (the moments make sure
    # one pair fetches more than two health timeouts apart): the change really needs both ends
    seen = sum(o["probes_while_one_end"] > 0 for o in outages.values())
    lab.add(Check("later_outage", "changed", "tunnels", seen > 0 and len(outages) == len(d.changed),
                  {"tunnels_seen_down_while_one_end_applied": seen,
                   "why": "" if seen else "no changed tunnel was probed while only one of its ends had applied"}))
    kept = all(b and b <= spis_after.get(k, set()) for k, b in spis_before.items())
    report["stream"] = {"tunnel": d.stream.tunnel, "sent": stream.sent, "lost": stream.sent - stream.received}
    lab.add(Check("stream", "stream", d.stream.tunnel, stream.sent > 0 and stream.received == stream.sent,
                  {**report["stream"], "why": "" if stream.received == stream.sent else "the unchanged tunnel lost echoes"}))
    lab.add(Check("sa_kept", "unchanged", "tunnels", kept,
                  {"tunnels": list(d.unchanged), "why": "" if kept else "an unchanged tunnel's SAs were torn down"}))
    report["seconds"] = rel(time.monotonic())
