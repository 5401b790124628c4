#!/bin/sh
# Runs as a lab router's holder process, already inside the router's network namespace and a
# mount namespace of its own (nsenter --net=... unshare -m). It lays the router's rendered tree at
# its real paths (/etc/ipsec.conf, /etc/ipsec.d, ...), starts what the router's platform starts,
# then stays alive so the lab can enter this namespace pair with nsenter -t <its pid>.
#   $1 router name   $2 rendered tree   $3 state dir (writable, outside the namespace too)
#   $4 the router's own NSS database (the lab's key pair for it: lab/keys.py)  $5 dnsmasq config (written by the lab: the platform's base options)
#   $6 firewall file to load, or "-" when the lab kernel cannot (User-Mode Linux)
set -eu
name=$1 tree=$2 state=$3 nss=$4 dnsconf=$5 firewall=$6
mount --make-rprivate /

# A writable /etc: the host's entries as symlinks, the router's own files as real files.
mkdir -p "$state/hostetc"
mount --bind /etc "$state/hostetc"
mount -t tmpfs -o mode=0755 tmpfs /etc
ln -s "$state"/hostetc/* /etc/
cd "$tree/etc"
rm -rf $(for e in *; do printf '/etc/%s ' "$e"; done)
cp -a "$tree/etc/." /etc/
cd /

mkdir -p /run/pluto /var/lib/ipsec/nss
mount -t tmpfs -o mode=0700 tmpfs /run/pluto
mount -t tmpfs -o mode=0700 tmpfs /var/lib/ipsec/nss
cp -a "$nss/." /var/lib/ipsec/nss/

# The SPI pluto allocates for a Child SA it initiates lives 30 s in the kernel until the SA is
# installed (net.core.xfrm_acq_expires, per network namespace). A lab kernel's one CPU shared by
# many routers can answer IKE_AUTH later than that (24-site mesh: up to 68 s); the install then
# fails with ESRCH and the responder keeps an orphan Child SA until DPD. Give it pluto's own
# patience (retransmits for 60 s) and more.
echo 120 > /proc/sys/net/core/xfrm_acq_expires

if [ "$firewall" != "-" ]; then
    nft -f "$firewall"
fi
dnsmasq --conf-file="$dnsconf"
# Everything but pluto is ready. The lab starts plutos in order (responders before their
# initiators) by writing to this FIFO, so no IKE_SA_INIT meets a peer that has not loaded it yet.
echo prepared > "$state/prepared"
read go < "$state/go"
# as ipsec.service / OpenWrt's init script start it; pluto loads every conn itself (auto=add|start)
/usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile "$state/pluto.log"
echo ready > "$state/ready"
exec sleep 2147483647
