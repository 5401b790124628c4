"""Dynamic sites behind a carrier-grade NAT (lab/network.py wires each one behind a NAT namespace that
masquerades it, on a link narrower than its LANs): played on every dynamic site of the WAN, after
its tunnels are up.

1. TCP across the tunnel into the site: a remote LAN host sends a few hundred kB to a LAN host of the
   dynamic site. The NAT's link is 1400 bytes and the NAT sends no ICMP 'fragmentation needed' (a path
   MTU black hole): segments sized for a 1500-byte path never arrive, so the transfer completes only
   when the routers clamp the MSS (the rendered firewall). Where the firewall is not loaded (User-Mode
   Linux has no nftables ip/inet family) there is no clamp: the transfer is reported as measured, not
   counted as a check.
2. The NAT's outside address changes (a new lease): nothing is touched on any router or in the
   repository; the lab measures the time until every tunnel of the site carries traffic again.

The engine's proofs then run on the whole WAN, including the capture check that sees the site's
tunnels as ESP in UDP 4500 from its new outside address. Times are measurements, not bounds.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..contracts import Check, Record
from ..network import ns_path
from ..probes import in_netns, ping_many
from ..proc import progress
from ..proofs import wait_tunnels_of
from . import PrepareContext, Prepared

STAGE = "after_tunnels"
RECOVERY_BOUND = 300.0  # seconds to wait for the tunnels after the address change before calling it failed
TRANSFER_BYTES = 400_000
TRANSFER_TIMEOUT = 30.0  # a stalled transfer: no byte for this long
UNCHECKED_TRANSFER_TIMEOUT = 5.0  # the same where it is only measured (no firewall loaded)
PORT = 5201


@dataclass(frozen=True)
class NatData(Record):
    sites: tuple[str, ...]  # the dynamic sites, each behind its NAT


def prepare(ctx: PrepareContext) -> Prepared:
    return Prepared(data=NatData(sites=tuple(s.name for s in ctx.wan.sites if s.router.dynamic)).to_dict())


def tcp_transfer(src_ns: str, dst_ns: str, dst: str, nbytes: int = TRANSFER_BYTES,
                 timeout: float = TRANSFER_TIMEOUT) -> dict:
    """`nbytes` over one TCP connection from a host in `src_ns` to `dst` (a host in `dst_ns`); sockets made
    inside each namespace from this process (no process start). Returns bytes received, seconds, and
    the MSS the sender was told (TCP_MAXSEG on its connected socket)."""
    with in_netns(dst_ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((dst, PORT))
    server.listen(1)
    server.settimeout(timeout)
    got = {"received": 0, "error": ""}

    def serve() -> None:
        try:
            conn, _ = server.accept()
            conn.settimeout(timeout)
            with conn:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got["received"] += len(chunk)
        except OSError as e:
            got["error"] = f"receiver: {e}"

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with in_netns(src_ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(timeout)
    t0 = time.monotonic()
    mss = None
    try:
        client.connect((dst, PORT))
        mss = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        client.sendall(b"w" * nbytes)
        client.shutdown(socket.SHUT_WR)
    except OSError as e:
        got["error"] = got["error"] or f"sender: {e}"
    t.join(timeout + 5)
    client.close()
    server.close()
    return {"bytes": nbytes, "received": got["received"], "seconds": round(time.monotonic() - t0, 2),
            "sender_mss": mss, "ok": got["received"] == nbytes, "error": got["error"]}


def _reachable(lab, name: str) -> dict[str, bool]:
    """peer -> a ping from the site's LAN host to the peer's LAN host came back."""
    view = lab.view
    s = view.site(name)
    peers = [o for a, o in view.joined_pairs() if a.name == name]
    res = ping_many([(ns_path(s.lans[0].host_ns), o.lans[0].host) for o in peers], count=1, interval=0, wait=1.0)
    return {o.name: r["received"] > 0 for o, r in zip(peers, res, strict=True)}


def _mss(lab, name: str, report: dict) -> None:
    view = lab.view
    s = view.site(name)
    peer = next(o for a, o in view.joined_pairs() if a.name == name)
    # without the firewall (User-Mode Linux) the transfer is a measurement, not a check: a stall shows
    # in 5 s as well as in 30 (it cost every dynamic site of every UML lab 25 s more)
    r = tcp_transfer(ns_path(peer.lans[0].host_ns), ns_path(s.lans[0].host_ns), s.lans[0].host,
                     timeout=TRANSFER_TIMEOUT if lab.plan.firewall else UNCHECKED_TRANSFER_TIMEOUT)
    r.update({"from": peer.name, "to": name, "link_mtu": s.nat.mtu})
    report["tcp_transfer"] = r
    if lab.plan.firewall:
        lab.add(Check("mss", peer.name, name, r["ok"], {
            **r, "why": "" if r["ok"] else "TCP across the narrower NATed link stalled: the MSS was not clamped"}))
    else:
        r["clamped"] = False
        lab.note(f"MSS clamp on {name}'s tunnels: not proven here (no nftables ip/inet family: the rendered firewall "
                 f"with its clamp is not loaded); TCP {peer.name} -> {name} without the clamp "
                 + ("completed" if r["ok"] else
                    f"stalled ({r['received']}/{r['bytes']} bytes, no byte for {UNCHECKED_TRANSFER_TIMEOUT:g} s)"))


def _readdress(lab, name: str, report: dict) -> None:
    s = lab.view.site(name)
    router = lab.routers[name]
    before = _reachable(lab, name)
    old, new = lab.network.renat(s)
    t0 = time.monotonic()
    back: dict[str, float] = {}
    while len(back) < len(before) and time.monotonic() - t0 < RECOVERY_BOUND:
        for peer, ok in _reachable(lab, name).items():
            if ok and peer not in back:
                back[peer] = round(time.monotonic() - t0, 2)
        progress(f"nat {name}: tunnels back after the address change", len(back), len(before))
        if len(back) < len(before):
            time.sleep(0.5)
    seconds = max(back.values()) if len(back) == len(before) else None
    up = wait_tunnels_of(router, 30)
    ok = seconds is not None and all(before.values()) and up
    report["readdress"] = {"old_outside": old, "new_outside": new, "seconds_until_every_tunnel": seconds,
                           "per_peer_seconds": back, "reachable_before": before}
    lab.add(Check("nat_readdress", name, "wan", ok, {
        "old_outside": old, "new_outside": new, "seconds": seconds, "per_peer_seconds": back, "tunnels_up": up,
        "why": "" if ok else ("a peer was not reachable before the change" if not all(before.values())
                              else "not every tunnel carried traffic again")}))


def play(lab, data: dict) -> None:
    d = NatData.from_dict(data)
    out: dict = {}
    for k, name in enumerate(d.sites, 1):
        report: dict = {"link_mtu": lab.view.site(name).nat.mtu}
        _mss(lab, name, report)
        _readdress(lab, name, report)
        out[name] = report
        progress("nat", k, len(d.sites), name)
    lab.report("nat", out)
