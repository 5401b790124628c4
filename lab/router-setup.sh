#!/bin/sh
# Boots a lab router: runs as its holder process, already inside the router's network namespace
# and a mount namespace of its own (nsenter --net=... unshare -m). The router's disk is $root/flash
# (what is installed on it: etc/ with the router's files at their real paths and symlinks to the
# host's other /etc entries, nss/ the NSS database); it outlives a reboot. Everything else the
# router writes at run time (/run/pluto) is a tmpfs of this boot: a reboot drops it.
# It starts what the router's platform starts at boot, then stays alive so the lab can enter this
# namespace pair with nsenter -t <its pid>.
#   $1 router name   $2 router dir (flash/, hostetc/, boot/)
#   $3 dnsmasq config (written by the lab from the installed files: the platform's options)
#   $4 firewall file to load, or "-" when the lab kernel cannot (User-Mode Linux), or "firewalld":
#      the router runs real firewalld (lab/firewalld.py; its root is $5): a D-Bus system bus of its
#      own, firewalld, then the units enabled in /etc/systemd/system/multi-user.target.wants, as
#      systemd starts them after firewalld.service (the WAN's wan-firewall.service: After=firewalld)
#   $5 a root file system to run the router in (lab/libreswan5.py: Debian 13 with Libreswan 5.2), or
#      "-"/absent for the lab kernel's own. The holder then builds the router's root from it (its
#      directories bound read-only, /etc the router's flash, /run and /tmp tmpfs, the NSS database
#      bound in /var/lib/ipsec/nss, the router dir at its own path, the lab kernel's / in /wanhost for
#      the lab's own models) and chroots into it: `nsenter -t <pid> -r` enters that root.
#   $6 with $5: directories of the lab kernel seen at their own paths in that root, ':'-separated
set -eu
name=$1 root=$2 dnsconf=$3 firewall=$4 newroot=${5:--} shared=${6:-}
boot=$root/boot

if [ "${WAN_LAB_IN_ROOT:-}" != 1 ]; then
mount --make-rprivate /
if [ "$newroot" = "-" ]; then
    # /etc: the router's flash; its symlinks reach the lab kernel's own /etc through hostetc.
    mkdir -p "$root/hostetc"
    mount --bind /etc "$root/hostetc"
    mount --bind "$root/flash/etc" /etc
    # /run (and /var/run, its symlink on Debian): the router's own tmpfs, as on a router (EL: systemd's
    # tmpfs; OpenWrt: /var -> /tmp), so its run-time state (the programs' lock /var/run/wan-NAME.lock,
    # status.json and repairs.log under /var/run/wan, pluto's socket and pid) is its own and gone after a
    # reboot. Two labs in one kernel (lab/inner.py --jobs) both have a router called acme: a shared /run
    # gave one lab's reconcile the other's lock ("another fetch or reconcile holds ..."). The lab kernel's
    # own /run/wan-lab (its modprobe wrapper, on PATH) stays visible.
    mkdir -p "$root/hostrun"
    mount --bind /run "$root/hostrun"
    mount -t tmpfs -o mode=0755 tmpfs /run
    mkdir -p /run/wan-lab /run/lock /run/pluto /run/wan /var/lib/ipsec/nss
    mount --bind "$root/hostrun/wan-lab" /run/wan-lab 2>/dev/null || true  # the host run has none: nothing to keep
    chmod 0700 /run/pluto
    mount --bind "$root/flash/nss" /var/lib/ipsec/nss
    # OpenWrt's textfile in /var/prometheus is this router's own too. The lab kernel's /var may be
    # read-only (User-Mode Linux): then there is no /var/prometheus to write to.
    if [ -d /var/prometheus ] || mkdir /var/prometheus 2>/dev/null; then
        mount -t tmpfs -o mode=0755 tmpfs /var/prometheus
    fi
else
    r=$root/sysroot
    mkdir -p "$r"
    mount -t tmpfs -o mode=0755 tmpfs "$r"
    mkdir "$r/wanhost"
    mount --rbind / "$r/wanhost"
    for e in "$newroot"/*; do
        b=${e##*/}
        case $b in
            proc|sys|dev|run|tmp|etc|wanhost) mkdir -p "$r/$b" ;;
            *) if [ -L "$e" ]; then cp -P "$e" "$r/$b"  # usr-merge: bin -> usr/bin
               elif [ -d "$e" ]; then
                   mkdir "$r/$b"; mount --bind "$e" "$r/$b"; mount -o remount,bind,ro "$r/$b"
               else cp -p "$e" "$r/$b"; fi ;;
        esac
    done
    mount -t proc proc "$r/proc"
    mount -t sysfs sysfs "$r/sys"
    mount --rbind /dev "$r/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$r/run"
    mkdir -p -m 0700 "$r/run/pluto"
    mkdir -p "$r/run/wan" "$r/run/wan-lab"
    mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
    mkdir -p "$r$root"
    mount --bind "$root" "$r$root"
    # the lab's own directories a router reads at their lab-kernel paths (the repository's programs, the
    # rendered trees the scenarios apply: `reconcile --repair <tree>`), read-only
    for d in $(printf '%s' "$shared" | tr ':' ' '); do
        mkdir -p "$r$d"
        mount --bind "$d" "$r$d"
        mount -o remount,bind,ro "$r$d"
    done
    mkdir -p "$root/hostetc"
    mount --bind "$newroot/etc" "$r$root/hostetc"
    mount --bind "$root/flash/etc" "$r/etc"
    mount --bind "$root/flash/nss" "$r/var/lib/ipsec/nss"
    mount -t tmpfs -o mode=0755 tmpfs "$r/var/prometheus"
    if [ "$firewall" = firewalld ]; then
        # what firewalld, polkitd and dbus write besides /run: logs (firewalld's own goes to boot/)
        mount -t tmpfs -o mode=0755 tmpfs "$r/var/log"
        # no systemd in the lab: its stand-in for what reconcile asks of systemctl (lab/el-systemctl)
        mount --bind "$(dirname "$0")/el-systemctl" "$r/usr/local/sbin/systemctl"
    fi
    cp "$0" "$boot/router-setup.sh"
    exec env WAN_LAB_IN_ROOT=1 chroot "$r" /bin/sh "$boot/router-setup.sh" "$@"
fi
fi

# User-Mode Linux on an AVX-512 host carries no vector state beyond the FXSAVE area (lab/uml_xstate.py):
# every guest program gets GLIBC_TUNABLES (glibc's SSE2 string functions) from the kernel's command line.
# pluto loads the conns by running addconn with an EMPTY environment (libreswan v5.2
# programs/pluto/server.c:1057-1066 `char *newenv[] = { NULL }`, v4.10 server.c:1058): without the
# tunables 5.2's addconn took `esp=` for `encapsulation=` (8 of 8 UML runs; lab/plutoconf.py). A wrapper
# bound over addconn in this router's own mount namespace gives it the tunables back; the binary it runs
# is the router's own, bound at $boot/real/addconn (same name: addconn's messages keep their prefix).
if [ -n "${GLIBC_TUNABLES:-}" ] && [ -x /usr/libexec/ipsec/addconn ]; then
    mkdir -p "$boot/real"
    [ -e "$boot/real/addconn" ] || : > "$boot/real/addconn"  # a mount point; never truncated
    mount --bind /usr/libexec/ipsec/addconn "$boot/real/addconn"
    printf '#!/bin/sh\nGLIBC_TUNABLES=%s\nexport GLIBC_TUNABLES\nexec %s "$@"\n' \
        "'$GLIBC_TUNABLES'" "'$boot/real/addconn'" > "$boot/addconn-tunables"
    chmod 0755 "$boot/addconn-tunables"
    mount --bind "$boot/addconn-tunables" /usr/libexec/ipsec/addconn
fi

# The SPI pluto allocates for a Child SA it initiates lives 30 s in the kernel until the SA is
# installed (net.core.xfrm_acq_expires, per network namespace). A lab kernel's one CPU shared by
# many routers can answer IKE_AUTH later than that (24-site mesh: up to 68 s); the install then
# fails with ESRCH and the responder keeps an orphan Child SA until DPD. Give it pluto's own
# patience (retransmits for 60 s) and more.
echo 120 > /proc/sys/net/core/xfrm_acq_expires

if [ "$firewall" = firewalld ]; then
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # the stand-in systemctl first
    # EL's boot order (systemd): dbus.service, then firewalld.service (Type=dbus, After=dbus.service:
    # firewalld's config/firewalld.service.in), then the units ordered After=firewalld. One system bus
    # per router: its socket /run/dbus/system_bus_socket is in this router's /run tmpfs.
    mkdir -p /run/dbus
    dbus-daemon --system --fork
    firewalld --nofork --nopid --log-target console >> "$boot/firewalld.log" 2>&1 &
    # firewall-cmd --state: "running" once firewalld has loaded its configuration (exit 0; firewall-cmd(1))
    n=0
    # "failed" (exit RUNNING_BUT_FAILED): firewalld refused the user configuration and runs the stock one
    # (firewall-cmd.in --state, v1.3.3:2463-2470): a failed boot here
    until firewall-cmd --state >/dev/null 2>&1; do
        n=$((n + 1))
        if [ $n -gt 600 ] || ! kill -0 $! 2>/dev/null || [ "$(firewall-cmd --state 2>&1)" = failed ]; then
            echo "firewalld did not come up: $(tail -5 "$boot/firewalld.log")" >&2
            echo failed > "$boot/failed"; exit 1
        fi
        sleep 0.1
    done
    for u in /etc/systemd/system/multi-user.target.wants/*.service; do
        [ -e "$u" ] || continue
        systemctl start "${u##*/}" || { echo "starting ${u##*/} failed" >&2; echo failed > "$boot/failed"; exit 1; }
    done
    # The operator's router advertisement daemon (lab/firewalld.py operator_files), as radvd.service starts
    # it when /etc/radvd.conf exists (Debian 12's unit: ConditionPathExists=/etc/radvd.conf, After=
    # network.target, `radvd --configtest` then radvd, which forks). A radvd that does not start fails
    # no boot (nor would it under systemd): the ipv6_ra check (lab/fwcheck.py) fails with its log.
    if [ -f /etc/radvd.conf ]; then
        radvd --logmethod logfile --logfile "$boot/radvd.log" --pidfile /run/radvd.pid \
            || echo "radvd did not start: $(tail -3 "$boot/radvd.log" 2>/dev/null)" >&2
    fi
elif [ "$firewall" != "-" ]; then
    nft -f "$firewall"
fi
dnsmasq --conf-file="$dnsconf"
# Everything but pluto is ready. The lab says when pluto starts (all at once behind the gate, or
# one router at a time), by writing to this FIFO.
echo prepared > "$boot/prepared"
read go < "$boot/go"
# as ipsec.service / OpenWrt's init script start it; pluto loads every conn itself (auto=add|start)
/usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile "$boot/pluto.log"
echo ready > "$boot/ready"
exec sleep 2147483647
