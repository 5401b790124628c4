"""The Child SA layout of every tunnel, read from the kernel on both ends (issue 13 item 3, field facts W7).

4.x `leftsubnets={a b}` makes one Child SA per LAN pair; 5.x `leftsubnet=a,b` one Child SA holding
every pair. A 4.x end facing a 5.x end of the second kind narrows the proposal to one pair and
the other LANs get no SA. Whatever the majors, both ends of a tunnel must hold the same Child SAs:
the same traffic selector pairs, one Child SA per LAN pair.

The proof reads XFRM, not pluto: its output is the same whatever Libreswan runs the router
(`ip -o xfrm policy`, `ip -o xfrm state`). A Child SA on a router is the set of its outbound
policies that share one reqid (pluto gives each Child SA's policies one reqid: the 5.x one-SA
form installs one outbound policy per selector pair under the same reqid), with ESP states of that
reqid; the tunnel's are those whose template goes to the peer's address.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .contracts import Check, SitePlan

if TYPE_CHECKING:
    from .engine import Lab

POLICY_RE = re.compile(r"^src (\S+) dst (\S+) .*?\bdir (out|in|fwd)\b.*?\btmpl src (\S+) dst (\S+)\s.*?\breqid (\d+)")
# `ip -s xfrm state` adds the numbers in decimal: "spi 0x616ff060(1634725984) reqid 16401(0x00004011)"
STATE_RE = re.compile(r"^src (\S+) dst (\S+)\s.*?\bproto esp spi (0x[0-9a-f]+)(?:\(\d+\))? reqid (\d+)")


def _records(text: str) -> list[str]:
    """One line per policy or state, from `ip -o xfrm ...` (fields split by a backslash) or from the
    plain form (a record's further lines indented)."""
    out: list[str] = []
    for line in text.replace("\\", " ").splitlines():
        if line[:1].isspace() and out:
            out[-1] += " " + line.strip()
        elif line.strip():
            out.append(line.strip())
    return out


def parse_xfrm(policies: str, states: str) -> tuple[list[dict], list[dict]]:
    """`ip -o xfrm policy` and `ip -o xfrm state` (or their plain forms)."""
    pols, sts = [], []
    for line in _records(policies):
        m = POLICY_RE.search(line)
        if m:
            pols.append({"src": m.group(1), "dst": m.group(2), "dir": m.group(3), "tmpl_src": m.group(4),
                         "tmpl_dst": m.group(5), "reqid": int(m.group(6))})
    for line in _records(states):
        m = STATE_RE.search(line)
        if m:
            sts.append({"src": m.group(1), "dst": m.group(2), "spi": m.group(3), "reqid": int(m.group(4))})
    return pols, sts


def children(pols: list[dict], sts: list[dict], peer: str) -> dict[int, dict]:
    """reqid -> {"pairs": sorted [local, remote] selector pairs, "spis_out", "spis_in"} of the Child
    SAs this router holds towards `peer` (the address its policies' templates go to)."""
    out: dict[int, dict] = {}
    for p in pols:
        if p["dir"] == "out" and p["tmpl_dst"] == peer:
            c = out.setdefault(p["reqid"], {"pairs": [], "spis_out": [], "spis_in": []})
            c["pairs"].append([p["src"], p["dst"]])
    for c in out.values():
        c["pairs"].sort()
    for s in sts:
        if s["reqid"] in out:
            out[s["reqid"]]["spis_out" if s["dst"] == peer else "spis_in"].append(s["spi"])
    return out


def compare(a: SitePlan, b: SitePlan, mine: dict[int, dict], theirs: dict[int, dict],
            expected: set[tuple[str, str]] | None) -> tuple[bool, str]:
    """Both ends' Child SAs (a's and b's, each as `children` gives them): the same selector pairs
    grouped the same way, one pair per Child SA, each with ESP states both ways, and (`expected`:
    a's LANs x b's LANs, when the tunnel carries only those) every LAN pair covered."""
    ours = sorted(tuple(map(tuple, c["pairs"])) for c in mine.values())
    mirrored = sorted(tuple(sorted((remote, local) for local, remote in c["pairs"])) for c in theirs.values())
    if ours != mirrored:
        return False, (f"the two ends hold different Child SAs: {a.name} {[list(map(list, x)) for x in ours]}, "
                       f"{b.name} (mirrored) {[list(map(list, x)) for x in mirrored]}")
    several = [list(map(list, x)) for x in ours if len(x) != 1]
    if several:
        return False, f"a Child SA carries several LAN pairs {several}: one Child SA per LAN pair is the layout (W7)"
    for who, cs in ((a.name, mine), (b.name, theirs)):
        bare = [c["pairs"] for c in cs.values() if not (c["spis_out"] and c["spis_in"])]
        if bare:
            return False, f"{who}: policies without ESP states both ways for {bare}"
    if expected is not None:
        have = {x[0] for x in ours}
        missing = sorted(expected - have)
        if missing:
            return False, f"no Child SA for the LAN pairs {[list(x) for x in missing]}"
    return True, ""


def wanted(lab: Lab) -> bool:
    """Where layouts can differ: a tunnel with a multi-LAN end, or ends on different Libreswan majors."""
    v = lab.view
    return any(len(v.site(t.a).lans) > 1 or len(v.site(t.b).lans) > 1
               or v.site(t.a).target_libreswan != v.site(t.b).target_libreswan for t in v.tunnels)


def read(lab: Lab, name: str) -> tuple[list[dict], list[dict]]:
    r = lab.routers[name].exec(["sh", "-c", "ip -o xfrm policy; echo '@@states'; ip -o xfrm state"], timeout=60)
    pols, _, sts = r.stdout.partition("@@states\n")
    return parse_xfrm(pols, sts)


def checks(lab: Lab) -> Iterator[Check]:
    """One `child_sas` check per tunnel (src, dst: its ends), in labs where layouts can differ."""
    if not wanted(lab):
        return
    v = lab.view
    xfrm = {n: read(lab, n) for n in v.names}
    for t in v.tunnels:
        a, b = v.site(t.a), v.site(t.b)
        mine = children(*xfrm[a.name], lab.network.reach(b))
        theirs = children(*xfrm[b.name], lab.network.reach(a))
        # a hub's tunnel to a spoke also carries the other spokes' LANs: then only both ends' agreement counts
        expected = None if v.transits else {(la.subnet, lb.subnet) for la in a.lans for lb in b.lans}
        ok, why = compare(a, b, mine, theirs, expected)
        yield Check("child_sas", a.name, b.name, ok, {
            "tunnel": t.name, a.name: [c["pairs"] for c in mine.values()], b.name: [c["pairs"] for c in theirs.values()],
            "libreswan": {a.name: a.libreswan, b.name: b.libreswan}, "why": why})
