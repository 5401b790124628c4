"""The lab's checks on the EL routers that run real firewalld (lab/firewalld.py): what is in effect,
what the platform keeps doing next to the WAN's files, firewall-cmd --reload, reconcile's repair and a
reboot. The engine runs `checks` before the traffic proofs."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from .contracts import Check
from .firewalld import DNAT_PORT, RA_PREFIX, SSH_PORT
from .network import ns_path
from .proofs import lease, wait_tunnels

# ---- the lab's checks on a router that runs firewalld ---------------------------------------------

def active_zones(text: str) -> dict[str, dict[str, list[str]]]:
    """`firewall-cmd --get-active-zones` -> zone -> {"interfaces": [...], "sources": [...]}: a zone
    name alone on a line, then indented `interfaces: a b` / `sources: x y` lines (firewall-cmd
    src/firewall-cmd.in, --get-active-zones)."""
    out: dict[str, dict[str, list[str]]] = {}
    zone = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            zone = line.split()[0]
            out[zone] = {"interfaces": [], "sources": []}
        elif zone and ":" in line:
            key, _, vals = line.strip().partition(":")
            if key in ("interfaces", "sources"):
                out[zone][key] = vals.split()
    return out


def rule_comments(text: str) -> list[str]:
    """The `comment "..."` of each rule (every rule the renderer writes has one; nft lists it as written)."""
    return sorted(re.findall(r'comment "([^"]*)"', text))


def state(router, tree: Path, remote_lans: list[str] | None = None) -> dict:
    """What is in effect on a router that runs firewalld: its state, the WAN's zones with their
    sources, the WAN's policies, and the WAN's own nftables table next to firewalld's."""
    fw = Path(tree) / "etc/firewalld"
    want_zones = sorted(p.stem for p in (fw / "zones").glob("*.xml"))
    want_policies = sorted(p.stem for p in (fw / "policies").glob("*.xml"))
    # two firewall-cmd calls (each a Python start: about a second in QEMU); without a running firewalld
    # both fail ("FirewallD is not running", exit 252: firewall-cmd(1) EXIT CODES)
    az = router.exec(["firewall-cmd", "--get-active-zones"])
    zones = active_zones(az.stdout) if az.returncode == 0 else {}
    pol = router.exec(["firewall-cmd", "--get-policies"])
    policies = pol.stdout.split() if pol.returncode == 0 else []
    st = SimpleNamespace(stdout="running" if az.returncode == 0 and pol.returncode == 0 else "",
                         stderr=(az.stdout + az.stderr).strip())
    tables = router.exec(["nft", "list", "tables"]).stdout
    wan_nft = (Path(tree) / "etc/nftables/wan.nft")
    want_rules = rule_comments(wan_nft.read_text()) if wan_nft.exists() else []
    got_rules = rule_comments(router.exec(["nft", "list", "table", "inet", "wan"]).stdout)
    why = []
    if st.stdout.strip() != "running":
        why.append(f"firewall-cmd --state: {(st.stdout + st.stderr).strip()[:200]!r}")
    if remote_lans is None:  # what the rendered zone names (on a spoke: the LANs reached through the hub too)
        text = (fw / "zones/wan-tunnels.xml").read_text() if (fw / "zones/wan-tunnels.xml").exists() else ""
        remote_lans = re.findall(r'<source address="([^"]+)"/>', text)
    if "wan-tunnels" in want_zones and sorted(zones.get("wan-tunnels", {}).get("sources", [])) != sorted(remote_lans):
        why.append(f"zone wan-tunnels is not active with the remote LANs {remote_lans} as sources: {zones.get('wan-tunnels')}")
    missing = [p for p in want_policies if p not in policies]
    if missing:
        why.append(f"policies not loaded by firewalld: {missing}")
    if "table inet firewalld" not in tables:
        why.append("firewalld's table inet firewalld is missing")
    lost = [c for c in want_rules if c not in got_rules]
    if lost or not want_rules:
        why.append(f"the WAN's table inet wan lacks {len(lost) or 'all its'} rules: {lost[:3]}")
    return {"state": st.stdout.strip(), "active_zones": zones, "policies": policies, "wan_rules": len(got_rules),
            "want_zones": want_zones, "why": "; ".join(why)}


# A TCP service that answers with a banner and prints the peer's address (the stand-in for sshd on the
# router, TCP 22, and for a LAN server behind the port forward): the lab has no sshd; what is proven is
# that the firewall lets the connection through, not ssh itself.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1]))); s.listen(1); s.settimeout(float(sys.argv[2])); print("listening", flush=True)
try:
    c, a = s.accept()
except OSError:
    print("no connection", flush=True); sys.exit(1)
c.sendall(b"SSH-2.0-wan-lab\\r\\n"); print(a[0], flush=True); c.close()
"""
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode(errors="replace").strip())
except OSError as e:
    print(f"error: {e}"); sys.exit(1)
"""


def tcp_answered(server: list[str], port: int, client: list[str], to: str, to_port: int) -> dict:
    """A connection from `client` (an argv prefix: where it runs) to to:to_port, answered by a one-shot
    server started with the `server` prefix on `port`. {"ok", "banner", "peer", "why"}."""
    srv = subprocess.Popen([*server, "python3", "-c", SERVER, str(port), "15"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        first = srv.stdout.readline().strip()
        if first != "listening":
            return {"ok": False, "why": f"the server did not start: {first[:200]}"}
        r = subprocess.run([*client, "python3", "-c", CLIENT, to, str(to_port), "5"], capture_output=True, text=True, timeout=30)
        banner = (r.stdout + r.stderr).strip()[:200]
    finally:
        try:
            out, _ = srv.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
            out, _ = srv.communicate()
    peer = (out or "").strip().splitlines()[-1:] or [""]
    ok = banner.startswith("SSH-2.0-wan-lab")
    return {"ok": ok, "banner": banner, "peer": peer[0], "why": "" if ok else f"not answered: {banner}"}


# A Router Solicitation from a LAN host, and the router advertisements that come back (RFC 4861 4.1,
# 4.2, 6.1.2: ICMPv6 133/134, hop limit 255; an RS from a host with an address carries its link-layer
# address, option 1). A raw ICMPv6 socket: the kernel fills in the checksum (RFC 3542 3.1). The RA's
# destination (IPV6_PKTINFO) tells the answer to this RS (unicast to the host: AdvRASolicitedUnicast,
# lab/firewalld.py) from a periodic multicast RA to ff02::1, which leaves the router even when its
# firewall drops every solicitation. Prints one JSON line: the host's address, RSs sent, RAs seen.
RS_PROBE = r"""
import fcntl, json, socket, struct, sys, time
ifname, wait = sys.argv[1], float(sys.argv[2])
idx = socket.if_nametoindex(ifname)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
s.settimeout(0.2)
mac = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", ifname.encode()))[18:24]  # SIOCGIFHWADDR
rs = struct.pack("!BBHI", 133, 0, 0, 0) + struct.pack("!BB6s", 1, 1, mac)
me, seen, sent, start = "", [], 0, time.monotonic()
while time.monotonic() < start + wait:
    if not me:  # the host's link-local source (none while it is tentative: DAD)
        try:
            u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            u.connect(("ff02::2", 9, 0, idx))
            me = u.getsockname()[0].split("%")[0]
        except OSError:
            time.sleep(0.2)
            continue
    if sent < 4 and time.monotonic() >= start + sent * 1.5:
        s.sendto(rs, ("ff02::2", 0, 0, idx))
        sent += 1
    try:
        data, anc, _flags, src = s.recvmsg(2048, 256)
    except socket.timeout:
        continue
    if len(data) < 16 or data[0] != 134:
        continue
    ra = {"from": src[0].split("%")[0], "to": "", "hop_limit": -1, "router_lifetime": struct.unpack("!H", data[6:8])[0],
          "prefixes": []}
    for _lvl, typ, val in anc:
        if typ == socket.IPV6_PKTINFO:
            ra["to"] = socket.inet_ntop(socket.AF_INET6, val[:16])
        elif typ == socket.IPV6_HOPLIMIT:
            ra["hop_limit"] = struct.unpack("i", val[:4])[0]
    opts = data[16:]
    while len(opts) >= 8 and opts[1]:
        if opts[0] == 3 and len(opts) >= 32:  # prefix information (RFC 4861 4.6.2)
            ra["prefixes"].append(f"{socket.inet_ntop(socket.AF_INET6, opts[16:32])}/{opts[2]}")
        opts = opts[opts[1] * 8:]
    seen.append(ra)
    if ra["to"] == me:
        break
print(json.dumps({"host": me, "rs_sent": sent, "ras": seen}))
"""


def ra_answered(host: list[str], ifname: str, router_ll: str, prefix: str, wait: float = 8.0) -> dict:
    """A LAN host (`host`: the argv prefix that runs in its network namespace) sends Router
    Solicitations to ff02::2 and must get an RA from the router's link-local address, hop limit 255,
    addressed to itself (the answer to its RS), advertising `prefix` (the operator's radvd.conf).
    {"ok", "router", "host", "rs_sent", "answer" (the RA or None), "ras_seen", "seconds", "why"}."""
    t = time.monotonic()
    r = subprocess.run([*host, "python3", "-c", RS_PROBE, ifname, str(wait)], capture_output=True, text=True,
                       timeout=wait + 30)
    seconds = round(time.monotonic() - t, 1)
    try:
        got = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "why": f"the RS probe failed: {(r.stdout + r.stderr).strip()[-300:]}"}
    answer = [ra for ra in got["ras"] if ra["from"] == router_ll and ra["to"] == got["host"] and ra["hop_limit"] == 255]
    ok = bool(answer) and prefix in answer[0]["prefixes"]
    if not answer:
        why = (f"no RA from {router_ll} answered the host's Router Solicitation ({got['rs_sent']} sent; "
               f"other RAs seen: {len(got['ras'])})")
    else:
        why = "" if ok else f"the answer did not advertise {prefix}: {answer[0]['prefixes']}"
    return {"ok": ok, "router": router_ll, "host": got["host"], "rs_sent": got["rs_sent"],
            "answer": answer[0] if answer else None, "ras_seen": len(got["ras"]), "seconds": seconds, "why": why}


def platform(lab, s) -> dict[str, dict]:
    """What the EL platform must keep doing next to the WAN's files (issue 13 item 2), each a real
    exchange through the router's firewall: IPv6 neighbour discovery on the LAN (the LAN host pings the
    router's link-local address: NS/NA both ways), router advertisements (the LAN host's Router
    Solicitation in, the operator's radvd's answer out: `ra_answered`), SSH from a management network
    outside the WAN (the lab's internet, to TCP 22 of the router's WAN address: the operator's external
    zone opens ssh), the operator's port forward (the internet to TCP 8080 of the WAN address, DNAT to a
    LAN host), and on a router-DNS site a DHCP DISCOVER from 0.0.0.0 answered by the router's dnsmasq
    (the DHCP client host of its first LAN, lab/proofs.py `lease`; the operator's internal zone opens
    dhcp)."""
    r = lab.routers[s.name]
    lan = s.lans[0]
    host = ["nsenter", f"--net={ns_path(lan.host_ns)}", "--"]
    inet = ["nsenter", f"--net={ns_path(lab.plan.infra.inet_ns)}", "--"]
    out = {}
    addrs = r.exec(["ip", "-6", "-o", "addr", "show", "dev", lan.bridge, "scope", "link"]).stdout
    ll = re.search(r"inet6 (fe80::[0-9a-f:]+)/", addrs)
    if not ll:
        out["ipv6_nd"] = {"ok": False, "why": f"no IPv6 link-local address on {lan.bridge}"}
        out["ipv6_ra"] = {"ok": False, "why": f"no IPv6 link-local address on {lan.bridge}"}
    else:
        for _ in range(5):  # a fresh link-local address is tentative for a moment (DAD)
            p = subprocess.run([*host, "ping", "-6", "-c", "1", "-W", "2", "-I", "eth0", ll.group(1)],
                               capture_output=True, text=True, timeout=30)
            if p.returncode == 0:
                break
            time.sleep(1)
        out["ipv6_nd"] = {"ok": p.returncode == 0, "to": ll.group(1), "ping": p.stdout.strip()[-200:],
                          "why": "" if p.returncode == 0 else "the LAN host got no answer from the router's link-local address"}
        out["ipv6_ra"] = ra_answered(host, "eth0", ll.group(1), RA_PREFIX)
        if not out["ipv6_ra"]["ok"]:  # what the operator's radvd said (lab/router-setup.sh)
            radvd_log = Path(r.bootdir) / "radvd.log"
            out["ipv6_ra"]["radvd_log"] = radvd_log.read_text(errors="replace")[-600:] if radvd_log.exists() else "(none)"
    if s.router_dns:
        t = time.monotonic()
        addr, udhcpc = lease(s.dns_ns)
        out["dhcp_discover"] = {"ok": bool(addr), "leased": addr, "seconds": round(time.monotonic() - t, 1),
                                "udhcpc": udhcpc[-300:],
                                "why": "" if addr else "no answer from the router's dnsmasq to a DHCPDISCOVER from 0.0.0.0"}
    out["ssh_management"] = tcp_answered(r.enter(), SSH_PORT, inet, s.public, SSH_PORT)
    out["dnat_port_forward"] = tcp_answered(host, DNAT_PORT, inet, s.public, DNAT_PORT)
    return out


def tree_intact(tree: Path) -> bool:
    """Whether every file of the tree matches its etc/wan/files.list digest (what reconcile checks before
    anything: router/reconcile refuses a tree that does not). A negative lab alters its trees on purpose."""
    try:
        for line in (Path(tree) / "etc/wan/files.list").read_text().splitlines():
            digest, _mode, path = line.split()
            if hashlib.sha256((Path(tree) / path).read_bytes()).hexdigest() != digest:
                return False
    except (OSError, ValueError):
        return False
    return True


def repair(router, s, remote: list[str]) -> dict:
    """reconcile's real firewalld path, as the router's scheduled fetch runs it (`reconcile --repair`,
    lab/proofs.py scheduled_repair): the WAN's policy wan-into-tunnels removed from the disk and from
    firewalld (`firewall-cmd --reload`) and its table deleted; reconcile puts the file back, runs
    `firewall-cmd --reload` (a file under /etc/firewalld changed) and `systemctl restart wan-firewall`
    (lab/el-systemctl: the unit's `nft -f`). The router sees the tree through /wanhost (its root)."""
    # a policy, not a zone: firewalld refuses a configuration whose policy names a missing zone (seen:
    # `firewall-cmd --reload` fails with INVALID_ZONE, and at its next start it logs "Failed to load user
    # configuration. Falling back to full stock configuration.", the operator's zones gone too)
    broke = router.exec(["sh", "-c", "rm -f /etc/firewalld/policies/wan-into-tunnels.xml && firewall-cmd --reload >/dev/null "
                         "&& nft delete table inet wan"], timeout=120)
    broken = state(router, Path(s.tree), remote)
    tree = f"/wanhost{s.tree}" if s.root else s.tree
    rec = router.exec(["sh", "/etc/wan/reconcile", "--repair", tree], env={**router.reload_env(), "WAN_PHASE": "repair"},
                      timeout=300)
    after = state(router, Path(s.tree), remote)
    log = (rec.stdout + rec.stderr)
    ran = [c for c in ("run: firewall-cmd --reload", "run: systemctl restart wan-firewall") if c in log]
    why = [w for w, bad in (
        (f"breaking it failed: {(broke.stdout + broke.stderr).strip()[:200]}", broke.returncode != 0),
        ("the zone and the table removed were not seen as missing", not broken["why"]),
        (f"reconcile --repair exited {rec.returncode}: {log.strip()[-300:]}", rec.returncode != 0),
        (f"reconcile did not run {2 - len(ran)} of firewall-cmd --reload, systemctl restart wan-firewall", len(ran) != 2),
        (after["why"], bool(after["why"]))) if bad]
    return {**after, "broken": broken["why"], "reconcile": log.strip()[-1500:], "why": "; ".join(why)}


def checks(lab) -> list:
    """On each router that runs real firewalld: what is in effect at boot (zones with their sources,
    every rendered policy, the WAN's table next to firewalld's). On the first of them (a router-DNS
    site's, else by name), also what the platform must keep doing (`platform`) at boot, then
    `firewall-cmd --reload` and all of it again (firewalld deletes and rebuilds only its own table:
    nftables.py build_flush_rules), then reconcile's repair of the WAN's zone and table (`repair`), then
    a reboot, the tunnels waited for, and all of it again. One router per lab: firewalld's reload and a
    reboot are the same code on every router and cost 15-60 s each in QEMU (CI time). The traffic
    proofs run after all this: tunnels, pings, DNS and DHCP then prove the WAN on a router that was
    reloaded and rebooted."""
    out = []
    if not lab.plan.firewall:
        return out
    # the first: a router-DNS site's if there is one (its DHCP and DNS proofs then run after its reload and reboot)
    mine = [s.name for s in sorted(lab.view.sites, key=lambda s: (not s.router_dns, s.name))
            if s.firewalld and s.name in lab.routers]
    for name in mine:
        s = lab.view.site(name)
        r = lab.routers[name]
        full = name == mine[0]
        remote = None  # the rendered zone's sources
        phases, seconds = {}, {}
        t = time.monotonic()
        phases["boot"] = {**state(r, Path(s.tree), remote), **({"platform": platform(lab, s)} if full else {})}
        seconds["boot"] = round(time.monotonic() - t, 1)
        if full:
            t = time.monotonic()
            reload = r.exec(["firewall-cmd", "--reload"], timeout=120)
            phases["reload"] = {**state(r, Path(s.tree), remote), "platform": platform(lab, s),
                                "rc": reload.returncode, "output": (reload.stdout + reload.stderr).strip()[:200]}
            seconds["reload"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            if tree_intact(Path(s.tree)):
                phases["repair"] = repair(r, s, remote)
            else:  # reconcile refuses such a tree (as it must): its firewalld path cannot be proven here
                phases["repair"] = {"why": "", "skipped": "the lab's tree differs from its files.list (a negative "
                                    "test altered it): reconcile refuses it, its firewalld path is not proven here"}
            seconds["repair"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            r.reboot()
            _, tunnels = wait_tunnels(lab.view, lab.routers, lab.plan.tunnel_timeout)
            seconds["reboot_until_tunnels"] = round(time.monotonic() - t, 1)
            phases["reboot"] = {**state(r, Path(s.tree), remote), "platform": platform(lab, s),
                                "tunnels_down": [c.evidence.get("tunnel") for c in tunnels if not c.ok]}
            seconds["reboot"] = round(time.monotonic() - t, 1)
        why = []
        for when, ph in phases.items():
            what = [ph["why"]] if ph["why"] else []
            what += [f"{k}: {v['why']}" for k, v in ph.get("platform", {}).items() if not v["ok"]]
            if ph.get("rc"):
                what.append(f"firewall-cmd --reload exited {ph['rc']}: {ph['output']}")
            if ph.get("tunnels_down"):
                what.append(f"tunnels not back: {ph['tunnels_down']}")
            if what:
                why.append(f"after {when}: " + "; ".join(what))
        out.append(Check("firewalld", name, name, not why, {
            "firewalld": s.firewalld, "full": full, "router_dns": s.router_dns, "seconds": seconds, **phases,
            "why": " | ".join(why)}))
    return out
