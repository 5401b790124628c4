"""A change in the running lab: every router gets its new tree the way a real router would.

mode "reconcile": the router's own program (router/reconcile, as a program release installs it;
trees carry no program) runs in the router's namespaces, against real pluto; new routers start;
removed routers stop.
mode "restart": for contrast, the new files are copied in and pluto is restarted everywhere
(what the racoon-era WAN had to do).
Evidence: the SPIs of every tunnel the change does not touch (they must survive), a ping stream
across such a tunnel (it must lose nothing), and how long each router took.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

from lab.probes import ping_many

RECONCILE = Path(__file__).resolve().parent.parent / "router" / "reconcile"


def spis(lab, name: str) -> dict[str, set[str]]:
    """conn -> the ESP SPIs pluto holds for it (from whack --status)."""
    ctl = f"/proc/{lab.holders[name].pid}/root/run/pluto/pluto.ctl"
    r = subprocess.run(["/usr/libexec/ipsec/whack", "--ctlsocket", ctl, "--status"], capture_output=True, text=True, timeout=60)
    out: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        # 4.x: '000 #7: "acme-home" esp.c750ec95@192.0.2.10 esp.bd907973@198.51.100.20 tun.0@...'
        m = re.search(r'#\d+: "([^"]+)"(?:\[\d+\])?(?::\d+)? .*?(esp\.[0-9a-f]+@\S+)', line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r"esp\.([0-9a-f]+)@", line))
    return out


class Stream:
    """ICMP echoes every 20 ms across one tunnel while the change runs."""

    def __init__(self, ns: str, dst: str):
        self.ns, self.dst = ns, dst
        self.sent = self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = ping_many([(f"/run/netns/{self.ns}", self.dst)] * 10, count=1, interval=0, wait=1.0)
            self.sent += sum(x["sent"] for x in r)
            self.received += sum(x["received"] for x in r)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)  # the echoes sent last get their chance to come back
        self._stop.set()
        self._thread.join(timeout=30)


def _reconcile(lab, s: dict) -> dict:
    d = lab.state / f"router-{s['name']}"
    tree = s["tree"]
    new_dns = lab._router_dnsmasq_conf(s, d)  # regenerated from the new tree (OpenWrt: its UCI)
    env = [f"WAN_RELOAD_DNS=kill $(cat {d}/dnsmasq.pid); dnsmasq --conf-file={new_dns}"]
    fw = lab._router_firewall(s, d)
    if fw == "-":
        env.append("WAN_RELOAD_FIREWALL=true")  # the lab kernel has no nftables for it (UML)
    elif s["platform"] == "openwrt":
        env.append(f"WAN_RELOAD_FIREWALL=nft -f {fw}")  # fw4's composite, rebuilt from the new snippets
    argv = ["nsenter", "-t", str(lab.holders[s["name"]].pid), "-m", "-n", "--", "env", *env,
            "sh", str(RECONCILE), tree]
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-4000:]}


def _restart(lab, s: dict) -> dict:
    d = lab.state / f"router-{s['name']}"
    pid = str(lab.holders[s["name"]].pid)
    script = (f"ipsec whack --shutdown; cp -a {s['tree']}/etc/. /etc/ && "
              f"/usr/libexec/ipsec/pluto --config /etc/ipsec.conf --logfile {d}/pluto-restart.log")
    t = time.monotonic()
    r = subprocess.run(["nsenter", "-t", pid, "-m", "-n", "--", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    return {"rc": r.returncode, "seconds": round(time.monotonic() - t, 2), "output": (r.stdout + r.stderr)[-4000:]}


def apply_change(lab) -> dict:
    ch = lab.plan["change"]
    before = {n: spis(lab, n) for n in lab.holders}
    old_sites = dict(lab.sites)
    # from here on the lab's view is the new WAN
    lab.plan["sites"], lab.plan["tunnels"] = ch["sites"], ch["tunnels"]
    lab.sites = {s["name"]: s for s in ch["sites"]}
    per_router: dict[str, dict] = {}
    stream = ch.get("stream")
    s_obj = Stream(stream["from_ns"], stream["to"]) if stream else None
    t0 = time.monotonic()
    if s_obj:
        s_obj.__enter__()
    try:
        order = ch["start_order"]
        for k, name in enumerate(order, 1):
            s = lab.sites[name]
            if name in ch["new"]:
                t = time.monotonic()
                lab.start_routers([name])
                per_router[name] = {"rc": 0, "seconds": round(time.monotonic() - t, 2), "output": "new router started"}
            else:
                per_router[name] = (_reconcile if ch["mode"] == "reconcile" else _restart)(lab, s)
                lab._wait_initiated(name)
            per_router[name]["until_new_tunnels_up"] = round(time.monotonic() - t0, 2)
            print(f"@@ change {k}/{len(order)} {name}", flush=True)
        for name in ch["gone"]:
            pid = str(lab.holders[name].pid)
            subprocess.run(["nsenter", "-t", pid, "-m", "-n", "--", "ipsec", "whack", "--shutdown"], capture_output=True, timeout=60)
            per_router[name] = {"rc": 0, "seconds": 0, "output": "router removed: pluto shut down"}
    finally:
        if s_obj:
            s_obj.__exit__(None, None, None)
    status = lab.wait_tunnels()
    after = {n: spis(lab, n) for n in lab.sites if n in lab.holders}
    disturbed = []
    for t in ch["unchanged_tunnels"]:
        tun = next(x for x in ch["tunnels"] if x["name"] == t)
        kept = True
        for end in (tun["a"], tun["b"]):
            for c in old_sites[end]["conns"][t]:
                b, a = before[end].get(c, set()), after.get(end, {}).get(c, set())
                kept &= bool(b) and b <= a
        if not kept:
            disturbed.append(t)
        lab.add("sa_kept", tun["a"], tun["b"], kept, {"tunnel": t, "why": "" if kept else "its SAs were torn down or rekeyed by the change"})
    for name, r in per_router.items():
        lab.add("change", name, name, r["rc"] == 0, {"mode": ch["mode"], **r})
    if s_obj:
        lab.add("stream", "stream", "stream", s_obj.sent > 0 and s_obj.received == s_obj.sent,
                {"tunnel": stream["tunnel"], "sent": s_obj.sent, "lost": s_obj.sent - s_obj.received})
    lab.change = {"mode": ch["mode"], "routers": {n: {k: v for k, v in r.items() if k != "output"} for n, r in per_router.items()},
                  "unchanged_tunnels": len(ch["unchanged_tunnels"]), "disturbed": disturbed,
                  "stream": {"sent": s_obj.sent, "lost": s_obj.sent - s_obj.received} if s_obj else None,
                  "seconds": round(time.monotonic() - t0, 2)}
    return status
