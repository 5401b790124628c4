"""Which tunnels exist, what they are called, which end initiates and which crypto they use."""
from __future__ import annotations

from itertools import combinations

from .errors import Problem
from .load import where
from .model import CryptoProfile, Site, Tunnel


def tunnel_name(a: str, b: str) -> str:
    """`<a>-<b>` with the two site names sorted, so both ends agree on it."""
    a, b = sorted((a, b))
    return f"{a}-{b}"


def plan_tunnels(topology: str, hubs: tuple[str, ...], sites: list[Site], profiles: dict[str, CryptoProfile],
                 default_profile: str, docs: dict) -> tuple[tuple[Tunnel, ...], list[Problem]]:
    """The tunnels of the WAN, sorted by name.

    Exactly one end initiates (both ends starting was measured to leave broken Child SAs): a site with
    a dynamic address towards its fixed peer; the spoke towards its hub; between equals, the end whose
    name sorts first.
    """
    names = [s.name for s in sites]
    by_name = {s.name: s for s in sites}
    if topology == "mesh":
        pairs = list(combinations(names, 2))
    else:
        hubset = set(hubs)
        pairs = [p for p in combinations(names, 2) if p[0] in hubset or p[1] in hubset]
    problems: list[Problem] = []
    tunnels = []
    for a, b in pairs:
        a, b = sorted((a, b))
        sa, sb = by_name[a], by_name[b]
        if sa.router.dynamic != sb.router.dynamic:
            # its peer cannot know where it is: the dynamic end (behind NAT, or on a changing address)
            # always starts the tunnel, and starts it again after its address changes (dpdaction=restart)
            initiator = a if sa.router.dynamic else b
        elif topology == "hub-and-spoke" and (a in hubs) != (b in hubs):
            initiator = b if a in hubs else a
        else:
            initiator = a
        wanted = {p for p in (sa.crypto_profile, sb.crypto_profile) if p}
        if len(wanted) > 1:
            doc = docs[b]
            problems.append(Problem(doc.file, doc.line(("overrides", "crypto_profile")), where(("overrides", "crypto_profile")),
                                    f"tunnel {tunnel_name(a, b)}: {a} asks for crypto profile {sa.crypto_profile!r} and {b} for "
                                    f"{sb.crypto_profile!r}; both ends of a tunnel must use the same profile"))
            continue
        profile = profiles[wanted.pop() if wanted else default_profile]
        tunnels.append(Tunnel(tunnel_name(a, b), a, b, initiator, profile))
    return tuple(sorted(tunnels, key=lambda t: t.name)), problems
