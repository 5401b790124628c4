"""The one place that knows where each file lives on each platform's router."""
from __future__ import annotations

IPSEC_CONF = "etc/ipsec.conf"  # never shipped: the platform's own includes /etc/ipsec.d/*.conf (docs/platforms.md)
IPSEC_SECRETS = "etc/ipsec.secrets"  # never shipped either (raw RSA keys live in the NSS database)
PLATFORM_FILES = (IPSEC_CONF, IPSEC_SECRETS)  # the platform's files: edited in place at most, never replaced or removed
IPSEC_D = "etc/ipsec.d"
MANIFEST = "MANIFEST.json"  # at the root of out/<router>/, not installed as a router file


def tunnel_conf(name: str) -> str:
    return f"{IPSEC_D}/{name}.conf"


# dnsmasq: a conf-dir file on EL (dnsmasq's default conf-dir=/etc/dnsmasq.d); on OpenWrt the same
# lines kept on flash and copied into the first instance's conf-dir (tmpfs) by router/openwrt-dns
DNSMASQ_EL = "etc/dnsmasq.d/wan.conf"
DNSMASQ_OPENWRT = "etc/wan/dnsmasq.conf"
# OpenWrt router-DNS sites only: the UCI change their dnsmasq needs (localservice off), applied and read
# back by reconcile (step reload-dns) before dnsmasq reloads
DHCP_UCI_OPENWRT = "etc/wan/dhcp.uci"

# firewall: a table of our own on EL (the NAT exemption and fail-closed drops, on both paths), plus
# firewalld's zones and policies and a unit that loads the table at boot on the firewalld path;
# fw4 chain snippets registered through UCI includes on OpenWrt
NFT_EL = "etc/nftables/wan.nft"
FIREWALLD_ZONES = ("wan-tunnels", "wan-peers")
FIREWALLD_POLICIES = ("wan-from-tunnels", "wan-into-tunnels")
FIREWALLD_IKE_ANY = "wan-ike-from-any"  # only on a router with a dynamic peer: IKE and NAT-T from any address


def firewalld_policies(dynamic_peer: bool) -> tuple[str, ...]:
    """The firewalld policies a router gets; one with a dynamic peer also accepts UDP 500/4500 from any address."""
    return FIREWALLD_POLICIES + ((FIREWALLD_IKE_ANY,) if dynamic_peer else ())
FIREWALL_UNIT_EL = "etc/systemd/system/wan-firewall.service"


def firewalld_zone(name: str) -> str:
    return f"etc/firewalld/zones/{name}.xml"


def firewalld_policy(name: str) -> str:
    return f"etc/firewalld/policies/{name}.xml"


FW4_SNIPPETS = ("input", "forward", "srcnat")  # fw4 chain names, each gets a chain-prepend include


def fw4_snippet(chain: str) -> str:
    return f"etc/wan/fw4/{chain}.nft"


FIREWALL_UCI_OPENWRT = "etc/wan/firewall.uci"

# the router-side programs: installed by enrol and program releases only, never in a rendered tree
# or a bundle (router/reconcile refuses them in a files.list: docs/trust.md)
RECONCILE = "etc/wan/reconcile"
FETCH = "etc/wan/fetch"  # fetches, verifies and applies signed releases (router/fetch)
ENROL = "etc/wan/enrol"
# OpenWrt's own helpers: the DNS placement (openwrt-dns), its boot script (openwrt-init), the source
# route hook 24.10's updown needs (openwrt-sourceip) and the in-place edit of 23.05's stock
# ipsec.conf/secrets (openwrt-23.05-ipsec). Code run as root, so they come with the programs (signed by
# the offline program key), never with a release; every router gets all of them (one program release
# for every platform) and only OpenWrt routers use them.
OPENWRT_DNS = "etc/wan/openwrt-dns"
OPENWRT_INIT = "etc/wan/openwrt-init"
OPENWRT_SOURCEIP = "etc/wan/openwrt-sourceip"
OPENWRT_2305_IPSEC = "etc/wan/openwrt-23.05-ipsec"
PROGRAMS = {RECONCILE: "reconcile", FETCH: "fetch", ENROL: "enrol",  # path on the router -> the program's file in router/
            OPENWRT_DNS: "openwrt-dns", OPENWRT_INIT: "openwrt-init", OPENWRT_SOURCEIP: "openwrt-sourceip",
            OPENWRT_2305_IPSEC: "openwrt-23.05-ipsec"}
# where OpenWrt looks for the two hooks: reconcile (step platform-hooks) keeps a copy of the installed
# program there (rc.common's /etc/init.d, hotplug-call's /etc/hotplug.d/<subsystem>/)
OPENWRT_HOOKS = {"etc/init.d/wan": OPENWRT_INIT, "etc/hotplug.d/libreswan/50-wan-sourceip": OPENWRT_SOURCEIP}
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
