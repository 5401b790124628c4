"""Which tunnels exist, what they are called, which end initiates and which crypto they use."""
from __future__ import annotations

from itertools import combinations

from .errors import Problem
from .load import where
from .model import CryptoProfile, Site, Transit, Tunnel


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
    problems += _dynamic_peer_proposals(tunnels, by_name, docs)
    return tuple(sorted(tunnels, key=lambda t: t.name)), problems


def _dynamic_peer_proposals(tunnels: list[Tunnel], by_name: dict[str, Site], docs: dict) -> list[Problem]:
    """A router with several dynamic peers answers each from any address (right=%any), and pluto picks
    the conn for an IKE_SA_INIT by the addresses alone: the peer's id only comes in IKE_AUTH (Libreswan
    4.x programs/pluto/ikev2_host_pair.c find_v2_host_pair_connection; the exact lines at v4.10 are not
    checked here). So every such conn must accept the same IKE proposals, or a peer whose tunnel uses
    another profile gets NO_PROPOSAL_CHOSEN from the first conn (the lab: generated seed 48, a hub with two
    dynamic spokes on the profiles legacy and modern: pluto answered one spoke's IKE_SA_INIT on the other
    spoke's conn, and that tunnel never came up)."""
    problems = []
    for name, site in sorted(by_name.items()):
        if site.router.dynamic:
            continue  # it initiates to fixed peers only (two dynamic ends are refused before this)
        towards = sorted((t for t in tunnels if name in (t.a, t.b) and by_name[t.peer_of(name)].router.dynamic),
                         key=lambda t: t.name)
        for t in towards[1:]:
            first = towards[0]
            if t.crypto.ike == first.crypto.ike:
                continue
            peer = t.peer_of(name)
            doc = docs[peer]
            path = ("overrides", "crypto_profile") if by_name[peer].crypto_profile else ("router", "public_address")
            problems.append(Problem(doc.file, doc.line(path), where(path),
                                    f"{name} answers {first.peer_of(name)} and {peer} from any address (both are dynamic), "
                                    f"and Libreswan picks the conn for a new IKE SA before it knows which peer is calling: "
                                    f"tunnel {first.name} uses crypto profile {first.crypto.name!r} and {t.name} "
                                    f"{t.crypto.name!r}, whose IKE proposals differ; give the tunnels of {name}'s dynamic "
                                    f"peers one profile (overrides.crypto_profile, or the same IKE proposals)"))
    return problems


def plan_transits(topology: str, hubs: tuple[str, ...], tunnels: tuple[Tunnel, ...]) -> tuple[Transit, ...]:
    """Hub-and-spoke: every pair of spokes reaches each other through ONE hub, the first by name of
    the hubs both have a tunnel to (today every spoke has one to every hub, so that is the first hub
    by name for every pair). One hub only, because the two spokes' kernels may hold one XFRM policy
    per selector pair: the same pair on two hub tunnels would make the second policy shadow the
    first. Nothing fails over: when that hub is down the pair is cut until it returns (its other
    tunnels are not re-rendered at run time; docs/topologies.md)."""
    if topology != "hub-and-spoke":
        return ()
    hubset = set(hubs)
    joined: dict[str, set[str]] = {}
    for t in tunnels:
        for end in (t.a, t.b):
            peer = t.peer_of(end)
            if end not in hubset and peer in hubset:
                joined.setdefault(end, set()).add(peer)
    out = []
    for a, b in combinations(sorted(joined), 2):
        common = sorted(joined[a] & joined[b])
        if common:
            out.append(Transit(a, b, common[0]))
    return tuple(out)
