#!/bin/sh
# The bare mesh: the floor the lab is compared against (benchmarks/lab_vs_bare.py runs it).
# An N-site Libreswan mesh in namespaces built by hand, with no project code: one namespace per
# router and per LAN host, pluto with PSK IKEv2 and AES-GCM ESP, every conn loaded on every router
# first, then one initiator per tunnel (whack --initiate), then one ping per ordered pair.
# Ported from ../shared/bench/bare-lab-inner.sh; it runs under lab/kernels.py's launcher (the
# uml_xstate guard, GLIBC_TUNABLES on the kernel command line and in the modprobe wrapper), which
# the original's own PID-1 set-up lacked on this machine's CPU (the ESP crypto modules did not load).
#   sh bare_mesh.sh N
export PATH=/run/wan-lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
N=${1:-6}
t() { echo "T $(cut -d' ' -f1 /proc/uptime) $*"; }
t boot-done
# guest-init.sh (the project's launcher) has pointed modprobe, and the kernel's own module requests,
# at the lab kernel's modules, with GLIBC_TUNABLES carried into the wrapper (lab/uml_xstate.py)
for m in esp4 xfrm_user veth bridge authenc gcm ghash_generic aes_generic sha256_generic sha512_generic hmac ctr seqiv echainiv; do
  modprobe $m 2>/dev/null || echo "module $m: not loaded"
done
t modules
mkdir -p /run/netns
ip netns add inet; ip -n inet link set lo up; ip -n inet link add br0 type bridge; ip -n inet link set br0 up
i=1; while [ $i -le $N ]; do
  r=r$i; h=h$i
  ip netns add $r; ip netns add $h; ip -n $r link set lo up; ip -n $h link set lo up
  ip link add wan0 netns $r type veth peer name w$i netns inet
  ip -n inet link set w$i master br0; ip -n inet link set w$i up
  ip -n $r addr add 198.51.100.$i/24 dev wan0; ip -n $r link set wan0 up
  ip link add eth0 netns $h type veth peer name lan0 netns $r
  ip -n $r addr add 10.$i.0.1/24 dev lan0; ip -n $r link set lan0 up
  ip -n $h addr add 10.$i.0.10/24 dev eth0; ip -n $h link set eth0 up; ip -n $h route add default via 10.$i.0.1
  ip -n $r route add default via 198.51.100.254 2>/dev/null || ip -n $r route add 10.0.0.0/8 dev wan0
  ip netns exec $r sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
  i=$((i+1))
done
t netns
i=1; while [ $i -le $N ]; do
  # each router's files under /tmp/<router>/etc (the host root is read-only and may lack /etc/netns)
  r=r$i; d=/tmp/$r/etc; mkdir -p $d/ipsec.d /tmp/$r/nss /tmp/$r/run
  certutil -N -d sql:/tmp/$r/nss --empty-password
  printf 'config setup\n  logfile=/tmp/%s/pluto.log\ninclude %s/ipsec.d/*.conf\n' $r $d > $d/ipsec.conf
  printf 'include %s/ipsec.d/*.secrets\n' $d > $d/ipsec.secrets
  j=1; while [ $j -le $N ]; do
    if [ $j -ne $i ]; then
      a=$i; b=$j; [ $a -gt $b ] && { a=$j; b=$i; }
      c=s$a-s$b
      auto=add   # every conn loaded everywhere first; then one initiator per tunnel (below)
      printf 'conn %s\n  left=198.51.100.%s\n  leftid=@s%s\n  leftsubnet=10.%s.0.0/24\n  leftsourceip=10.%s.0.1\n  right=198.51.100.%s\n  rightid=@s%s\n  rightsubnet=10.%s.0.0/24\n  authby=secret\n  ikev2=insist\n  retransmit-interval=3000\n  auto=%s\n' $c $i $i $i $i $j $j $j $auto > $d/ipsec.d/$c.conf
      printf '@s%s @s%s : PSK "bare-lab-secret-%s-long-enough-0123456789"\n' $a $b $c > $d/ipsec.d/$c.secrets
    fi
    j=$((j+1))
  done
  ip netns exec $r /usr/libexec/ipsec/pluto --config $d/ipsec.conf --nssdir /tmp/$r/nss --rundir /tmp/$r/run --secretsfile $d/ipsec.secrets --ipsecdir $d/ipsec.d
  i=$((i+1))
done
t pluto-started
i=1; while [ $i -le $N ]; do
  r=r$i
  w=0; while [ ! -S /tmp/$r/run/pluto.ctl ] && [ $w -lt 300 ]; do sleep 0.1; w=$((w+1)); done
  [ -S /tmp/$r/run/pluto.ctl ] || echo "T 0 pluto $r did not start"
  ip netns exec $r /usr/libexec/ipsec/addconn --ctlsocket /tmp/$r/run/pluto.ctl --config /tmp/$r/etc/ipsec.conf --autoall >/dev/null 2>&1 &
  i=$((i+1))
done
wait
t conns-added
# one initiator per tunnel (the lower-numbered site), once every peer has its conns: an IKE_AUTH that
# reaches a peer whose conn is not loaded yet ends in TS_UNACCEPTABLE and Libreswan 4.10 does not retry
i=1; while [ $i -le $N ]; do j=$((i+1)); while [ $j -le $N ]; do
  ip netns exec r$i ipsec whack --ctlsocket /tmp/r$i/run/pluto.ctl --initiate --asynchronous --name s$i-s$j >/dev/null 2>&1
  j=$((j+1)); done; i=$((i+1)); done
t initiated
want=$((N * (N - 1)))
k=0; while [ $k -lt 600 ]; do
  have=0; i=1; while [ $i -le $N ]; do
    c=$(ip netns exec r$i ipsec whack --ctlsocket /tmp/r$i/run/pluto.ctl --trafficstatus 2>/dev/null | grep 'type=ESP' | sed 's/.*#[0-9]*: "\\([^"]*\\)".*/\\1/' | sort -u | wc -l); have=$((have + c)); i=$((i+1)); done
  [ $have -ge $want ] && break
  sleep 0.2; k=$((k+1))
done
t "tunnels-up $have/$want"
ok=0; all=0
i=1; while [ $i -le $N ]; do j=1; while [ $j -le $N ]; do
  if [ $j -ne $i ]; then all=$((all+1)); ip netns exec h$i ping -c1 -W2 10.$j.0.10 >/dev/null 2>&1 && ok=$((ok+1)); fi
  j=$((j+1)); done; i=$((i+1)); done
t "pings $ok/$all"
echo "RESULT n=$N tunnels=$have/$want pings=$ok/$all uptime=$(cut -d' ' -f1 /proc/uptime)"
