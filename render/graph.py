"""The WAN as a Mermaid flowchart: sites with their LANs, tunnels as edges, transit pairs dotted."""
from __future__ import annotations

from .model import Wan


def mermaid(wan: Wan, highlight: frozenset[str] = frozenset()) -> str:
    """Mermaid source; tunnels named in `highlight` are drawn thick (the plan marks changes)."""
    lines = ["flowchart LR"]
    for s in wan.sites:
        role = " (hub)" if s.name in wan.hubs else ""
        lans = "<br/>".join(str(n) for n in s.lans)
        lines.append(f'  {s.name}["<b>{s.name}</b>{role}<br/>{s.router.platform}, Libreswan {s.router.libreswan}'
                     f'<br/>{s.router.address}<br/>{lans}<br/>{s.dns.domain}"]')
    for t in wan.tunnels:
        arrow = "==>" if t.name in highlight else "-->"
        lines.append(f"  {t.initiator} {arrow}|{t.name}| {t.peer_of(t.initiator)}")
    for x in wan.transits:  # spoke to spoke through a hub: no tunnel of its own, drawn dotted
        lines.append(f"  {x.a} -.-|via {x.hub}| {x.b}")
    return "\n".join(lines) + "\n"
