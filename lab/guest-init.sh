#!/bin/sh
# PID 1 inside a lab kernel (User-Mode Linux or QEMU) whose root is the host's / mounted
# read-only. Written for lab/kernels.py, which passes, after "--" on the kernel command line:
#     guest-init.sh KIND SHARE CTL NONCE CWD
# KIND is uml or qemu; SHARE is the host directory to mount writable at the same path; CTL is a
# directory inside SHARE holding cmd.sh (the command to run) and receiving rc (its exit code);
# NONCE makes the console markers unique to this run, so a command's own output cannot fake them.
# POSIX sh (runs under dash and BusyBox ash). No "set -e": PID 1 must always reach the power-off.
set -u
kind=$1 share=$2 ctl=$3 nonce=$4 cwd=${5:-}

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

warn() { echo "guest-init: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || warn "no devtmpfs, /dev is the host's"
[ -d /dev/pts ] || mkdir -p /dev/pts 2>/dev/null
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null
[ -d /dev/shm ] || mkdir -p /dev/shm 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>/dev/null

# The root is read-only: give every directory that daemons write to a tmpfs of its own. A
# directory that does not exist on the host cannot be created (read-only root), so skip it, and
# skip symlinks (Debian's /var/run -> /run is covered by /run). /root is left alone on purpose:
# the host's pyenv interpreter lives there.
# The command's working directory (the checkout) may sit below one of the directories covered
# next (a clone in /tmp): keep a way back to the host's tree to bind it again afterwards.
if [ "$kind" = qemu ] && mkdir -p /dev/.hostroot 2>/dev/null; then
    mount --bind / /dev/.hostroot 2>/dev/null || warn "cannot keep the host root under /dev"
fi
for d in /tmp /run /var/run /var/tmp /var/log /var/lib/ipsec /etc/netns; do
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    case $d in
        /tmp|/var/tmp) mount -t tmpfs -o mode=1777 tmpfs "$d" ;;
        *) mount -t tmpfs -o mode=755 tmpfs "$d" ;;
    esac || warn "cannot mount tmpfs on $d"
done
# pluto's NSS database lives here on Debian; 'ipsec initnss' expects the directory.
[ -d /var/lib/ipsec ] && mkdir -p /var/lib/ipsec/nss
mkdir -p /run/netns /run/pluto /run/lock

# Kernel modules. The host has no /lib/modules/<this kernel>, and the read-only root cannot get
# one, so a private module root is made under /run and modprobe is pointed at it with -d. The
# wrapper goes into /proc/sys/kernel/modprobe (the kernel's own requests: crypto, nft_*, xfrm)
# and first into PATH (plain "modprobe" typed by the command). Where the host does have
# /lib/modules, a tmpfs over it makes even /usr/sbin/modprobe itself work.
rel=$(uname -r)
mr=/run/wan-lab/modroot
mkdir -p "$mr/lib/modules/$rel" /run/wan-lab/bin
case $kind in
    uml) mount --bind "${WAN_LAB_UML_MODULES:-/usr/lib/uml/modules}/$rel" "$mr/lib/modules/$rel" ;;
    qemu) mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose kmods "$mr/lib/modules/$rel" ;;
esac || warn "kernel modules for $rel are not available"
# The kernel starts it with an environment of its own: carry GLIBC_TUNABLES (set for User-Mode
# Linux on some CPUs: lab/uml_xstate.py) into it.
cat > /run/wan-lab/bin/modprobe <<EOF
#!/bin/sh
${GLIBC_TUNABLES:+GLIBC_TUNABLES=$GLIBC_TUNABLES; export GLIBC_TUNABLES}
exec /usr/sbin/modprobe -d $mr "\$@"
EOF
chmod 755 /run/wan-lab/bin/modprobe
echo /run/wan-lab/bin/modprobe > /proc/sys/kernel/modprobe
if [ -d /lib/modules ] && [ ! -L /lib/modules ]; then
    mount -t tmpfs -o mode=755 tmpfs /lib/modules && mkdir /lib/modules/"$rel" \
        && mount --bind "$mr/lib/modules/$rel" "/lib/modules/$rel"
fi

# ESP with AES-GCM and AES-CBC/SHA-2, the XFRM netlink API, veth for the lab's links. Some are
# built in, depending on the kernel; a missing one is reported, not fatal.
# One modprobe for all (each process start costs, above all under emulation); one by one only
# to name the culprit when that fails.
mods="esp4 esp6 xfrm_user authenc gcm ghash_generic aes_generic sha256_generic sha512_generic
      cbc echainiv seqiv veth"
if ! /run/wan-lab/bin/modprobe -qa $mods; then
    for m in $mods; do /run/wan-lab/bin/modprobe -q "$m" || warn "modprobe $m failed"; done
fi
ip link set lo up

# A working directory hidden by the tmpfs mounts above comes back from the host's tree
# (before the share, which may sit inside it).
if [ -n "$cwd" ] && [ ! -d "$cwd" ]; then
    mkdir -p "$cwd"
    case $kind in
        uml) mount -t hostfs none "$cwd" -o "$cwd" ;;
        qemu) mount --bind "/dev/.hostroot$cwd" "$cwd" ;;
    esac || warn "cannot show the working directory $cwd"
fi

# The share, writable, at the same absolute path as on the host. mkdir for the case where it is
# below a directory that was just covered by a tmpfs (a test's /tmp/...).
mkdir -p "$share" 2>/dev/null
case $kind in
    uml) mount -t hostfs none "$share" -o "$share" ;;
    qemu) mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share "$share" ;;
esac || warn "cannot mount the share $share"

echo "@@GUEST-READY $nonce@@"
sh "$ctl/cmd.sh" </dev/null
rc=$?
echo "$rc" > "$ctl/rc"
sync
echo "@@GUEST-DONE $nonce rc=$rc@@"
umount "$share" 2>/dev/null
sync
# sysrq 'o' powers both kernels off; BusyBox's forced poweroff (the reboot syscall) is the
# fallback. If PID 1 simply exited, the kernel would panic instead.
echo o > /proc/sysrq-trigger 2>/dev/null
sleep 5
busybox poweroff -f
