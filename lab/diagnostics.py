"""What a failed router shows a person: its addresses, routes, XFRM policies and states (keys
scrubbed), pluto's view, the firewall, its logs and a short capture of its WAN side."""
from __future__ import annotations

from pathlib import Path

from .proc import scrub
from .routers import RouterHost

COMMANDS = {"ip-a": ["ip", "a"], "ip-r": ["ip", "r"], "ip-xfrm-policy": ["ip", "xfrm", "policy"],
            "ip-xfrm-state": ["ip", "-s", "xfrm", "state"], "trafficstatus": ["ipsec", "whack", "--trafficstatus"],
            "ipsec-status": ["ipsec", "status"], "nft-ruleset": ["nft", "list", "ruleset"]}


def collect(router: RouterHost, dest: Path) -> None:
    """Write the router's diagnostics into dest/ (one file each)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not router.alive():
        (dest / "state.txt").write_text("the router was not running\n")
    else:
        for fname, argv in COMMANDS.items():
            r = router.exec(argv, timeout=30)
            (dest / f"{fname}.txt").write_text(scrub(r.stdout + r.stderr))
        r = router.exec(["timeout", "3", "tcpdump", "-i", "wan", "-n", "-c", "40"], timeout=10)
        (dest / "wan-capture.txt").write_text(scrub(r.stdout + r.stderr))
    for fname, text in router.logs().items():
        (dest / fname).write_text(scrub(text))
