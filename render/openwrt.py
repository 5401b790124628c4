"""What OpenWrt's own scripts would make of our UCI batches, for checks and for the lab.

A real router runs `uci batch` and its init scripts; where those do not exist (this machine, the
lab), these functions produce the same dnsmasq options and the same fw4 ruleset shape.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import paths

_UCI = re.compile(r"^(add_list|set) dhcp\.@dnsmasq\[0\]\.(\w+)='([^']*)'$")
# dnsmasq's init script turns these UCI options into these command-line options
_DNSMASQ_OPTION = {"server": "server", "rebind_domain": "rebind-domain-ok", "addnhosts": "addn-hosts"}


def dnsmasq_options(dhcp_uci: str) -> list[str]:
    """The dnsmasq.conf lines OpenWrt's dnsmasq init script makes of our dhcp UCI batch."""
    out = []
    for line in dhcp_uci.splitlines():
        m = _UCI.match(line.strip())
        if not m:
            continue
        verb, option, value = m.groups()
        if option == "rebind_protection":
            if value == "1":
                out.append("stop-dns-rebind")
        elif verb == "add_list" and option in _DNSMASQ_OPTION:
            if option == "rebind_domain":
                value = f"/{value}/"
            out.append(f"{_DNSMASQ_OPTION[option]}={value}")
    return out


def fw4_ruleset(tree: Path, wan_ifname: str = "wan", lan_ifnames: tuple[str, ...] = ("br-lan",),
                masquerade: bool = True) -> str:
    """A minimal `table inet fw4` with fw4's chain names, default policies and include points,
    with this router's snippets prepended where its firewall.uci puts them."""
    snippet = {}
    for chain in paths.FW4_SNIPPETS:
        p = tree / paths.fw4_snippet(chain)
        snippet[chain] = _strip_comments(p.read_text()) if p.exists() else ""
    lans = ", ".join(f'"{n}"' for n in lan_ifnames)
    masq = f'\t\toifname "{wan_ifname}" jump srcnat_wan\n' if masquerade else ""
    return f"""table inet fw4
delete table inet fw4
table inet fw4 {{
	chain input {{
		type filter hook input priority filter; policy drop;
{snippet['input']}		iif "lo" accept
		ct state established,related accept
		iifname {{ {lans} }} accept
		iifname "{wan_ifname}" jump input_wan
	}}
	chain input_wan {{
		icmp type echo-request accept
		reject
	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
{snippet['forward']}		ct state established,related accept
		iifname {{ {lans} }} oifname "{wan_ifname}" accept
	}}
	chain output {{
		type filter hook output priority filter; policy accept;
	}}
	chain srcnat {{
		type nat hook postrouting priority srcnat; policy accept;
{snippet['srcnat']}{masq}	}}
	chain srcnat_wan {{
		meta nfproto ipv4 masquerade
	}}
}}
"""


def _strip_comments(text: str) -> str:
    return "".join(f"\t\t{line}\n" for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
