#!/bin/sh
# PID 1 of a Docker lab router (the image's entrypoint; lab/docker_routers.py copies this file to
# /run/wan-lab/router.sh before the container starts, with the router's rendered tree already at
# its real paths and the lab's dnsmasq options and firewall file next to this script).
# It starts what the router's platform starts, in the order the lab needs, then stays alive:
#   1. waits on the FIFO "wired" until the lab has put the WAN and LAN links into this container
#   2. prepares: NSS database (as `ipsec --checknss` does), firewall, dnsmasq, the XFRM stack
#   3. waits on the FIFO "go": the lab starts plutos responders first, one router at a time
#   4. starts pluto as ipsec.service does (`ipsec start` would ask systemctl, absent here)
# On failure it writes "failed" and stays alive, so the lab can still collect diagnostics.
set -u
d=/run/wan-lab
exec >"$d/setup.log" 2>&1
fail() { echo "router setup failed: $*"; echo "$*" > "$d/failed"; exec sleep 2147483647; }
mkfifo "$d/wired" "$d/go" || fail "mkfifo"
echo started > "$d/started"
read -r _ < "$d/wired"
# the router's own NSS database (its lab key pair) is copied in by the lab before the start; a
# router without one gets an empty database, as `ipsec --checknss` makes it
[ -f /var/lib/ipsec/nss/cert9.db ] || ipsec initnss || fail "ipsec initnss"
if [ -s "$d/firewall.nft" ]; then
    nft -f "$d/firewall.nft" || fail "nft -f firewall"
fi
dnsmasq --conf-file="$d/dnsmasq.conf" || fail "dnsmasq"
/usr/libexec/ipsec/_stackmanager start || echo "(_stackmanager: modules are the lab kernel's, loaded already)"
echo prepared > "$d/prepared"
read -r _ < "$d/go"
/usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile "$d/pluto.log" || fail "pluto"
echo ready > "$d/ready"
exec sleep 2147483647
