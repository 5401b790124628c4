"""The one place that knows where each file lives on each platform's router."""
from __future__ import annotations

IPSEC_CONF = "etc/ipsec.conf"
IPSEC_D = "etc/ipsec.d"
MANIFEST = "MANIFEST.json"  # at the root of out/<router>/, not installed as a router file


def tunnel_conf(name: str) -> str:
    return f"{IPSEC_D}/{name}.conf"


# dnsmasq: a conf-dir file on EL (dnsmasq's default conf-dir=/etc/dnsmasq.d), a UCI batch on OpenWrt
DNSMASQ_EL = "etc/dnsmasq.d/wan.conf"
DHCP_UCI_OPENWRT = "etc/wan/dhcp.uci"
HOSTS_OPENWRT = "etc/wan/hosts"

# firewall: a table of our own on EL; fw4 chain snippets registered through UCI includes on OpenWrt
NFT_EL = "etc/nftables/wan.nft"
FW4_SNIPPETS = ("input", "forward", "srcnat")  # fw4 chain names, each gets a chain-prepend include


def fw4_snippet(chain: str) -> str:
    return f"etc/wan/fw4/{chain}.nft"


FIREWALL_UCI_OPENWRT = "etc/wan/firewall.uci"

# the router-side programs: installed by enrol and program releases only, never in a rendered tree
# or a bundle (router/reconcile refuses them in a files.list: docs/trust.md)
RECONCILE = "etc/wan/reconcile"
FETCH = "etc/wan/fetch"  # fetches, verifies and applies signed releases (router/fetch)
ENROL = "etc/wan/enrol"
PROGRAMS = {RECONCILE: "reconcile", FETCH: "fetch", ENROL: "enrol"}  # path on the router -> the program's file in router/
KEYS = "etc/wan/keys"  # the trusted release and program keys (keys/release/<id>, keys/programs/<id>)
TOKEN = "etc/wan/token"  # fetch's API token (a private repository), mode 0600
PROGRAMS_ENV = "etc/wan/programs.env"
RELEASE_ENV = "etc/wan/release.env"  # only in release bundles: WAN_TAG, WAN_SERIAL, WAN_REVISION, WAN_DATE
ROUTER_ENV = "etc/wan/router.env"
TUNNELS_LIST = "etc/wan/tunnels.list"  # name conf_sha256 initiator(1|0)
PEER_KEYS_LIST = "etc/wan/peer-keys.list"  # ike_id ckaid rsasigkey: keys accepted beside the conns' during a rollover
FILES_LIST = "etc/wan/files.list"  # sha256 mode path, every installed file but itself

# fetch's enrolment and state (router/fetch: LIB=$ROOT/etc/wan, CONF=$LIB/fetch.conf,
# PUBKEY=$LIB/release.pub, STATE=$LIB/releases); reconcile keeps the files it replaced in PREVIOUS
RELEASE_PUB = "etc/wan/release.pub"
FETCH_CONF = "etc/wan/fetch.conf"
RELEASES = "etc/wan/releases"
PREVIOUS = "etc/wan/previous"
