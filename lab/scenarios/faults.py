"""The RouterHost primitives the fault scenarios build on, each played on one router of a running
WAN and each proven: kill -9 of pluto (by its PID) and pluto started again as the platform's
service manager does (RouterHost.respawn_ipsec: systemd on EL, procd on OpenWrt); IPsec stopped and
started; the WAN link cut and restored; a reboot (every process killed, the namespace with its
XFRM state, routes and firewall gone, tmpfs dropped; back from the files on the router's disk).
After them the engine's proofs run on the whole WAN: everything must have come back, and every
tunnel the router is not part of kept its SAs through all four faults (rows `sa_kept`).

Recovery times are reported (result.json scenarios/faults), for the router and for each of its
tunnels (the first ping across it that comes back, polled about once a second); they are
measurements, not bounds. The WAN cut lasts 60 s unless the options say otherwise (issue 15 item 4):
longer than the rendered DPD delay, so the liveness probes run into the cut.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..contracts import Check, Record
from ..network import ns_path
from ..probes import ping_many
from ..proc import progress
from ..proofs import sas_kept, spis
from . import PrepareContext, Prepared

STAGE = "after_tunnels"
RECOVERY_BOUND = 120.0  # seconds a primitive's recovery may take before it counts as failed
WATCH_AFTER_CUT = 30.0  # seconds of pings after the WAN link is back (a late liveness timeout shows)


@dataclass(frozen=True)
class FaultsData(Record):
    router: str  # the router the faults are played on
    cut_seconds: float


def prepare(ctx: PrepareContext) -> Prepared:
    # the initiator of the first tunnel: it brings its own tunnels back itself after each fault
    victim = ctx.options.get("router") or ctx.wan.tunnels[0].initiator
    return Prepared(data=FaultsData(router=victim, cut_seconds=float(ctx.options.get("cut_seconds", 60))).to_dict())


def _ping_peers(lab, name: str) -> tuple[int, int]:
    view = lab.view
    s = view.site(name)
    probes = [(ns_path(s.lans[0].host_ns), o.lans[0].host) for a, o in view.joined_pairs() if a.name == name]
    res = ping_many(probes, count=1, interval=0, wait=1.0)
    return sum(r["received"] > 0 for r in res), len(probes)


def _probes(lab, name: str) -> dict[str, tuple[str, str]]:
    """tunnel -> (a LAN host of `name`, a host in the peer's LAN)."""
    view = lab.view
    s = view.site(name)
    return {view.tunnel_between(a.name, o.name).name: (ns_path(s.lans[0].host_ns), o.lans[0].host)
            for a, o in view.joined_pairs() if a.name == name}


def _back(lab, router, t0: float) -> tuple[bool, float, dict[str, float]]:
    """Until each tunnel of the router has its conns established on it and a ping across it comes
    back; the seconds since t0 for the router and, per tunnel, until its first ping came back."""
    probes = _probes(lab, router.name)
    conns = router.site.conns
    per: dict[str, float] = {}
    while len(per) < len(probes):
        if time.monotonic() - t0 > RECOVERY_BOUND:
            return False, round(time.monotonic() - t0, 2), per
        est = set(router.traffic())
        todo = sorted(t for t in probes if t not in per and set(conns[t]) <= est)
        res = ping_many([probes[t] for t in todo], count=1, interval=0, wait=1.0) if todo else []
        now = round(time.monotonic() - t0, 2)
        per.update({t: now for t, r in zip(todo, res, strict=True) if r["received"] > 0})
        if len(per) < len(probes):
            time.sleep(0.2)
    return True, round(time.monotonic() - t0, 2), per


def _watch(lab, name: str, seconds: float) -> dict[str, int]:
    """Pings across each tunnel of `name`, one a second per tunnel for `seconds`: how many were lost
    (a liveness timeout that tears the IKE SA down after the link came back shows here)."""
    probes = _probes(lab, name)
    lost = dict.fromkeys(probes, 0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        for tun, r in zip(sorted(probes), ping_many([probes[x] for x in sorted(probes)], count=1, interval=0, wait=1.0),
                          strict=True):
            lost[tun] += r["received"] == 0
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
    return lost


def play(lab, data: dict) -> None:
    d = FaultsData.from_dict(data)
    router = lab.routers[d.router]
    report: dict = {"router": d.router}
    sas_before = spis(lab)  # the tunnels the router is not part of must keep their SAs through every fault

    # 1. kill -9 of pluto, by its PID; then what the platform's service manager does (systemd's
    # Restart=always after its ExecStopPost XFRM flush, or procd's respawn 5 s later: RouterHost.respawn_ipsec)
    before = router.pids("pluto")
    t0 = time.monotonic()
    killed = router.kill("pluto")
    gone = killed == before and bool(killed) and not router.pids("pluto")
    delay = router.respawn_ipsec()
    up, secs, per = _back(lab, router, t0)
    report["kill_pluto"] = {"killed_pids": killed, "service_manager_delay": delay, "seconds_until_traffic": secs,
                            "per_tunnel": per}
    lab.add(Check("fault", d.router, "kill -9 pluto", gone and up, {
        "killed": killed, "pluto_was": before, "respawned_after": delay, "tunnels_back": up, "seconds": secs,
        "why": "" if gone and up else ("pluto survived its kill" if not gone else "its tunnels did not come back")}))
    progress("faults", 1, 4, "kill -9 pluto")

    # 2. IPsec stopped (pluto shuts down, deleting its SAs) and started
    t0 = time.monotonic()
    router.stop()
    stopped = not router.pids("pluto") and not router.traffic()
    router.start_ipsec()
    up, secs, per = _back(lab, router, t0)
    report["stop_start"] = {"seconds_until_traffic": secs, "per_tunnel": per}
    lab.add(Check("fault", d.router, "stop and start", stopped and up, {
        "stopped": stopped, "tunnels_back": up, "seconds": secs,
        "why": "" if stopped and up else ("pluto still ran after stop" if not stopped else "its tunnels did not come back")}))
    progress("faults", 2, 4, "stop and start")

    # 3. the WAN link cut: nothing crosses; restored: traffic again without anyone's help
    router.cut_wan()
    time.sleep(0.2)
    during, total = _ping_peers(lab, d.router)
    time.sleep(max(0.0, d.cut_seconds - 1.2))
    t0 = time.monotonic()
    router.restore_wan()
    up, secs, per = _back(lab, router, t0)
    # after the link is back: do the liveness probes that ran into the cut still tear an IKE SA down?
    # (rendered: dpddelay, retransmit-timeout, dpdaction=restart; docs/performance.md)
    after = _watch(lab, d.router, WATCH_AFTER_CUT)
    ok = during == 0 and up
    report["wan_cut"] = {"cut_seconds": d.cut_seconds, "pings_during_cut": f"{during}/{total}", "seconds_until_traffic": secs,
                         "per_tunnel": per, "lost_in_30_s_after": after}
    lab.add(Check("fault", d.router, "wan cut and restored", ok, {
        "replies_during_cut": during, "probes": total, "tunnels_back": up, "seconds": secs,
        "why": "" if ok else ("traffic crossed a cut link" if during else "traffic did not come back")}))
    progress("faults", 3, 4, "wan cut")

    # 4. reboot: run time lost (a tmpfs marker), disk kept (a file on /etc), pluto/dnsmasq back
    router.exec(["sh", "-c", "echo lab > /run/pluto/lab-runtime-marker && echo lab > /etc/wan/lab-disk-marker"], check=True)
    pluto_before = router.pids("pluto")
    t0 = time.monotonic()
    router.reboot()
    up, secs, per = _back(lab, router, t0)
    r = router.exec(["sh", "-c", "test -e /run/pluto/lab-runtime-marker && echo runtime-kept; "
                     "test -e /etc/wan/lab-disk-marker && echo disk-kept; rm -f /etc/wan/lab-disk-marker"])
    runtime_dropped = "runtime-kept" not in r.stdout
    disk_kept = "disk-kept" in r.stdout
    new_pluto = bool(router.pids("pluto")) and router.pids("pluto") != pluto_before
    dnsmasq = bool(router.pids("dnsmasq"))
    ok = up and runtime_dropped and disk_kept and new_pluto and dnsmasq
    report["reboot"] = {"seconds_until_traffic": secs, "per_tunnel": per}
    why = [w for w, bad in (("its tunnels did not come back", not up), ("tmpfs survived the reboot", not runtime_dropped),
                            ("the disk lost a file", not disk_kept), ("pluto is not a new process", not new_pluto),
                            ("dnsmasq did not start", not dnsmasq)) if bad]
    lab.add(Check("fault", d.router, "reboot", ok, {
        "tunnels_back": up, "seconds": secs, "tmpfs_dropped": runtime_dropped, "disk_kept": disk_kept,
        "pluto_restarted": new_pluto, "dnsmasq_running": dnsmasq, "why": "; ".join(why)}))
    progress("faults", 4, 4, "reboot")
    mine = {t.name for t in lab.view.tunnels if d.router in (t.a, t.b)}
    kept = list(sas_kept(lab, sas_before, mine, "faults", f"its SAs were torn down or rekeyed by the faults on {d.router}"))
    for check in kept:
        lab.add(check)
    report["others_kept_their_sas"] = {c.evidence["tunnel"]: c.ok for c in kept}
    lab.report("faults", report)
