"""What OpenWrt's own scripts would make of our UCI batches, for checks and for the lab.

A real router runs its init scripts; where those do not exist (this machine, the lab), these
functions produce the same dnsmasq options and the same fw4 ruleset shape.
"""
from __future__ import annotations

from pathlib import Path

from . import paths

# OpenWrt's stock /etc/config/dhcp leaves rebind_protection unset and dnsmasq.init defaults it to 1
# (`config_get_bool rebind "$cfg" rebind_protection 1` -> --stop-dns-rebind), so a stock router refuses
# private answers from upstream unless the domain is whitelisted.
STOCK_DNSMASQ = ("stop-dns-rebind",)


def dnsmasq_options(tree: Path, stock: tuple[str, ...] = STOCK_DNSMASQ) -> list[str]:
    """The dnsmasq options an OpenWrt router runs with for the WAN: the stock defaults above plus the
    lines of etc/wan/dnsmasq.conf, which /etc/wan/openwrt-dns copies into the instance's conf-dir."""
    f = Path(tree) / paths.DNSMASQ_OPENWRT
    ours = [line for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")] if f.exists() else []
    return list(stock) + ours


def uci_dnsmasq_options(tree: Path) -> list[str]:
    """What OpenWrt's stock /etc/config/dhcp gives the first dnsmasq instance that the WAN may change, after
    etc/wan/dhcp.uci: `option localservice 1` (openwrt/openwrt package/network/services/dnsmasq/files/dhcp.conf)
    becomes --local-service (dnsmasq.init dnsmasq_start: `append_bool "$cfg" localservice "--local-service"`)
    unless the file sets it to 0 (a router-DNS site). Also the stock `option domain 'lan'` and
    `option local '/lan/'` (--domain, --local: `append_parm`), which the WAN leaves alone."""
    f = Path(tree) / paths.DHCP_UCI_OPENWRT
    sets = f.read_text() if f.exists() else ""
    local_service = "set dhcp.@dnsmasq[0].localservice='0'" not in sets.splitlines()
    return ["domain=lan", "local=/lan/"] + (["local-service"] if local_service else [])


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
