"""Repairs between releases (issue 15 item 1), played on one router of a running WAN with real pluto
and dnsmasq: a conn deleted with whack, a conf edited by hand (and loaded so by the person who edited
it), where the router initiates a third tunnel its Child SAs deleted with their IKE SA kept (as when
the peer refused one: pluto does not bring it back), dnsmasq's WAN settings dropped (its conf-dir file
deleted and dnsmasq restarted without it) and, where the lab kernel has the firewall, the WAN's rules
flushed. Then the router's installed reconcile runs as fetch runs it when the installed release is
the latest (`reconcile --repair INSTALLED_TREE`, WAN_PHASE=repair). Proven: each damage took effect
before the repair, all of it is repaired after (the conn loaded and up, the conf as released, the
Child SAs up again, the domain of a peer resolved through the router, each repair one line in
/var/run/wan/repairs.log), no Child SA of any tunnel the damage did not touch changed its SPI, and a
second repair finds nothing to do.

The engine's proofs (pings, DNS, the firewall where exercised) run on the whole WAN afterwards.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..contracts import Check, Record
from ..proc import progress
from ..proofs import resolve, sas_kept, scheduled_repair, spis, wait_tunnels_of
from . import PrepareContext, Prepared

STAGE = "after_tunnels"


@dataclass(frozen=True)
class HealData(Record):
    router: str  # where the damage is done
    deleted: str  # the tunnel deleted from pluto (whack --delete)
    edited: str  # the tunnel whose conf is edited by hand
    peer: str  # a site whose domain the router forwards (its DNS answer proves dnsmasq's WAN settings)
    child: str = ""  # a third tunnel whose Child SAs are deleted on the router (whack --deletestate), IKE SA kept


def prepare(ctx: PrepareContext) -> Prepared:
    # a router that initiates at least two tunnels and has a third left alone, when the WAN has one
    counts: dict[str, list[str]] = {}
    for t in ctx.wan.tunnels:
        counts.setdefault(t.initiator, []).append(t.name)
    victim = ctx.options.get("router") or max(sorted(counts), key=lambda n: len(counts[n]))
    mine = sorted(counts.get(victim, []))
    if len(mine) < 2:
        raise ValueError(f"the heal scenario needs a router that initiates two tunnels; {victim} initiates {mine}")
    deleted, edited = mine[0], mine[1]
    child = mine[2] if len(mine) > 2 else ""
    peer = next(t for t in ctx.wan.tunnels if t.name == deleted).peer_of(victim)
    return Prepared(data=HealData(router=victim, deleted=deleted, edited=edited, peer=peer, child=child).to_dict())


_repair = scheduled_repair


def _child_serials(router, tunnel: str) -> dict[str, str]:
    """conn -> serial of its established Child SA on the router (`ipsec whack --trafficstatus`)."""
    out = router.whack("--trafficstatus").stdout
    return {m.group(2): m.group(1) for m in re.finditer(r'#(\d+): "([^"]+)"', out)
            if m.group(2) == tunnel or m.group(2).startswith(tunnel + "/")}


def play(lab, data: dict) -> None:
    d = HealData.from_dict(data)
    router = lab.routers[d.router]
    site = lab.view.site(d.router)
    peer = lab.view.site(d.peer)
    dns_name, dns_want = peer.check_name
    before = spis(lab)
    firewall = lab.plan.firewall

    # ---- the damage --------------------------------------------------------------------------
    router.whack("--delete", "--name", d.deleted)
    conf = f"/etc/ipsec.d/{d.edited}.conf"
    router.exec(["sed", "-i", "s/^\\tdpddelay=.*/\\tdpddelay=33/", conf], check=True)
    # the person who edited it loads it (`ipsec auto --replace`) and brings it up again
    replaced = router.exec(["ipsec", "auto", "--replace", d.edited], timeout=120)
    router.whack("--initiate", "--asynchronous", "--name", d.edited)
    dns_file = "/etc/dnsmasq.d/wan.conf" if site.platform == "el" else "/etc/wan/dnsmasq.conf"
    router.exec(["rm", "-f", dns_file], check=True)
    reload_dns = router.reload_env()["WAN_RELOAD_DNS"]
    router.exec(["sh", "-c", reload_dns], timeout=60)  # dnsmasq restarted: without the WAN's settings now
    if firewall:
        flush = ["nft", "flush", "table", "inet", "wan"] if site.platform == "el" else \
            ["sh", "-c", "for c in input forward srcnat; do nft flush chain inet fw4 $c; done"]
        router.exec(flush, check=True)
    # a Child SA gone while its IKE SA stands (as when the peer refused it): pluto does not bring it back
    child_conns = sorted(site.conns.get(d.child, [])) if d.child else []
    if d.child:
        for serial in _child_serials(router, d.child).values():
            router.whack("--deletestate", serial)
        time.sleep(5)
    child_down = not _child_serials(router, d.child) if d.child else True
    progress("heal", 1, 3, "damage done")
    loaded = router.whack("--status").stdout
    gone = not re.search(rf'"{re.escape(d.deleted)}[/"]', loaded)
    dns_dropped = resolve(site, [dns_name])[dns_name] != [dns_want]
    done = gone and dns_dropped and replaced.returncode == 0 and child_down
    lab.add(Check("heal", d.router, "damage", done, {
        "conn_deleted": gone, "conf_replaced_by_hand": replaced.returncode == 0, "dns_dropped": dns_dropped,
        "firewall_flushed": bool(firewall), "child_sas_deleted": d.child and child_down,
        "why": "" if done else "the damage did not take effect"}))

    # ---- the next scheduled run: fetch finds its tag current and runs the repair ----------------
    first = _repair(router)
    up = wait_tunnels_of(router, 120)
    progress("heal", 2, 3, f"repaired in {first['seconds']} s")
    conf_now = router.exec(["cat", conf]).stdout
    with open(f"{site.tree}{conf}") as f:
        conf_ok = conf_now == f.read()
    loaded = router.whack("--status").stdout
    back = bool(re.search(rf'"{re.escape(d.deleted)}[/"]', loaded))
    dns_back = resolve(site, [dns_name])[dns_name] == [dns_want]
    log = router.exec(["cat", "/var/run/wan/repairs.log"]).stdout.split("\n")
    logged = sorted(" ".join(line.split()[1:]) for line in log if line.strip())
    want_log = sorted([f"conn {d.deleted}", f"conf {d.edited}"] + [f"child {c}" for c in child_conns] + [
                       f"dns {dns_file}"] + (["firewall " + ("table-inet-wan" if site.platform == "el" else "fw4-chains")]
                                             if firewall else []))
    ok = first["rc"] == 0 and up and conf_ok and back and dns_back and logged == want_log
    why = [w for w, bad in (("reconcile --repair failed", first["rc"] != 0), ("its tunnels did not come back", not up),
                            ("the conf was not restored", not conf_ok), ("the deleted conn is not loaded", not back),
                            ("the peer's domain does not resolve", not dns_back),
                            (f"repairs.log says {logged}, not {want_log}", logged != want_log)) if bad]
    lab.add(Check("heal", d.router, "repaired", ok, {
        "rc": first["rc"], "seconds": first["seconds"], "tunnels_back": up, "conf_restored": conf_ok,
        "conn_loaded": back, "dns_answer": dns_back, "repairs_log": logged, "why": "; ".join(why),
        "output": first["output"] if not ok else ""}))

    # ---- no unrelated Child SA changed its SPI; a second run repairs nothing ---------------------
    lab.wait_tunnels()
    for check in sas_kept(lab, before, {d.deleted, d.edited, d.child}, "heal",
                          "its SAs were torn down or rekeyed by the repair"):
        lab.add(check)
    second = _repair(router)
    quiet = second["rc"] == 0 and "nothing to repair" in second["output"]
    lab.add(Check("heal", d.router, "second run", quiet, {
        "rc": second["rc"], "why": "" if quiet else "a second repair found something to do", "output": second["output"]}))
    progress("heal", 3, 3, "second run")
    if not firewall:
        lab.note("heal: the firewall's repair is not exercised on this kernel (User-Mode Linux has no inet/ip nftables "
                 "family); tests/test_repair.py proves it with the real nft in a network namespace")
    lab.report("heal", {"router": d.router, "deleted": d.deleted, "edited": d.edited, "child": d.child,
                        "repair_seconds": first["seconds"], "repairs": logged, "second_run_seconds": second["seconds"]})
