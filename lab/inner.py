"""The lab inside a kernel with ESP: build the routers, start them, prove every cell, report.

Run as root inside the lab kernel (or on a host whose kernel has ESP):
    python3 -m lab.inner PLAN.json RESULTS_DIR
It prints progress lines (`@@ phase k/N`) for the host side and writes RESULTS_DIR/result.json.
Everything it starts it ends again, by PID; every namespace it made it deletes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from render.openwrt import dnsmasq_options, fw4_ruleset

from lab.probes import ping_many

HERE = Path(__file__).resolve().parent


def tunnel_timeout(n_tunnels: int) -> float:
    """The bound on the wait for every tunnel: WAN_LAB_TUNNEL_TIMEOUT if set, else 90 s or 1.5 s
    per tunnel, whichever is more. The lab kernel brings Child SAs up at about 1-2 s each (both
    ends' _updown); a fixed 90 s was too short for a 24-site mesh whose routers had overlapped
    (123 of 276 tunnels still to come at the end of setup, up 140 s later)."""
    if os.environ.get("WAN_LAB_TUNNEL_TIMEOUT"):
        return float(os.environ["WAN_LAB_TUNNEL_TIMEOUT"])
    return max(90.0, 1.5 * n_tunnels)

KEY_RE = re.compile(r"0x[0-9a-fA-F]{16,}")


def progress(phase: str, done: int, total: int, note: str = "") -> None:
    print(f"@@ {phase} {done}/{total} {note}".rstrip(), flush=True)


def log(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def run(argv: list[str], check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:2000]}")
    return r


def scrub(text: str) -> str:
    """Keys never leave the lab: XFRM key material is replaced."""
    return KEY_RE.sub("0x<scrubbed>", text)


class Lab:
    ROUTER_NS_MADE_HERE = True

    def __init__(self, plan: dict, results: Path):
        self.plan = plan
        self.results = results
        self.state = Path(tempfile.mkdtemp(prefix=f"wanlab-{plan['prefix']}-"))
        self.change: dict = {}
        self.release: dict = {}
        self.sites = {s["name"]: s for s in plan["sites"]}
        self.namespaces: list[str] = []
        self.holders: dict[str, subprocess.Popen] = {}
        self.pidfiles: list[Path] = []
        self.checks: list[dict] = []
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    def router_dir(self, name: str) -> Path:
        """Where a router's setup writes its state (pluto.log, dnsmasq.log, setup.log, markers)."""
        return self.state / f"router-{name}"

    def setup_phases(self) -> list:
        return [("network", self.build_network), ("dns servers", lambda: (self.start_isp_resolver(), self.start_dns_servers())),
                ("routers", self.start_routers)]

    # ---- running things -------------------------------------------------------------------
    def in_router(self, site: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        pid = self.holders[site].pid
        return run(["nsenter", "-t", str(pid), "-m", "-n", "--"] + argv, **kw)

    def in_ns(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--net=/run/netns/{ns}", "--"] + argv, **kw)

    def popen_ns(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--"] + argv, **kw)

    # ---- building ---------------------------------------------------------------------------
    def build_network(self) -> None:
        p = self.plan
        inet = p["inet_ns"]
        batch = [f"netns add {inet}"]
        everyone = p.get("network_sites", p["sites"])
        for s in everyone:
            if self.ROUTER_NS_MADE_HERE:  # a Docker router's namespace is its container's, attached already
                batch.append(f"netns add {s['router_ns']}")
            batch.append(f"netns add {s['dns_ns']}")
            for lan in s["lans"]:
                batch.append(f"netns add {lan['host_ns']}")
        self.namespaces += [line.split()[-1] for line in batch]
        for s in everyone:
            batch.append(f"link add wan netns {s['router_ns']} type veth peer name {s['inet_if']} netns {inet}")
            for j, lan in enumerate(s["lans"]):
                batch.append(f"link add h{j} netns {s['router_ns']} type veth peer name eth0 netns {lan['host_ns']}")
            batch.append(f"link add d0 netns {s['router_ns']} type veth peer name eth0 netns {s['dns_ns']}")
        run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")

        # the internet: routes to every router's public address, forwarding on
        cmds = ["link set lo up", f"addr add {p['isp_resolver']}/32 dev lo"]
        if p.get("release"):
            cmds.append(f"addr add {p['release']['server']}/32 dev lo")
        for s in everyone:
            cmds += [f"link set {s['inet_if']} up", f"addr add {p['inet_gw']}/32 dev {s['inet_if']}",
                     f"route add {s['public']}/32 dev {s['inet_if']}"]
        run(["ip", "-n", inet, "-batch", "-"], input="\n".join(cmds) + "\n")
        for s in everyone:
            cmds = ["link set lo up", "link set wan up", f"addr add {s['public']}/32 dev wan",
                    f"route add {p['inet_gw']}/32 dev wan", f"route add default via {p['inet_gw']} dev wan"]
            dns_lan = None
            for j, lan in enumerate(s["lans"]):
                br = lan["bridge"]
                cmds += [f"link add {br} type bridge", f"link set {br} up",
                         f"addr add {lan['router_address']}/{lan['prefixlen']} dev {br}",
                         f"link set h{j} master {br}", f"link set h{j} up"]
                if lan["has_dns"] and dns_lan is None:
                    dns_lan = lan
                    cmds += [f"link set d0 master {br}", "link set d0 up"]
                hcmds = ["link set lo up", "link set eth0 up", f"addr add {lan['host']}/{lan['prefixlen']} dev eth0",
                         f"route add default via {lan['router_address']}"]
                run(["ip", "-n", lan["host_ns"], "-batch", "-"], input="\n".join(hcmds) + "\n")
            run(["ip", "-n", s["router_ns"], "-batch", "-"], input="\n".join(cmds) + "\n")
            dcmds = ["link set lo up", "link set eth0 up", f"addr add {s['dns_server']}/{dns_lan['prefixlen']} dev eth0",
                     f"route add default via {dns_lan['router_address']}"]
            run(["ip", "-n", s["dns_ns"], "-batch", "-"], input="\n".join(dcmds) + "\n")
        # forwarding in the internet and in every router; one shell per namespace
        for ns in [inet] + [s["router_ns"] for s in everyone]:
            self.in_ns(ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])

    def start_isp_resolver(self) -> None:
        p = self.plan
        d = self.state / "isp"
        d.mkdir()
        conf = d / "dnsmasq.conf"
        conf.write_text("\n".join([
            "no-resolv", "no-hosts", f"listen-address={p['isp_resolver']}", "bind-interfaces", "user=root",
            f"pid-file={d}/dnsmasq.pid", f"log-facility={d}/dnsmasq.log", "log-queries",
            f"address=/{p['rebind'][0]}/{p['rebind'][1]}", f"address=/#/{p['isp_answer']}", ""]))
        self.in_ns(p["inet_ns"], ["dnsmasq", f"--conf-file={conf}"])
        self.pidfiles.append(d / "dnsmasq.pid")

    def start_dns_servers(self) -> None:
        for s in self.plan.get("network_sites", self.plan["sites"]):
            d = self.state / f"dns-{s['name']}"
            d.mkdir()
            records = dict(s["records"])
            records[s["probe_record"][0]] = s["probe_record"][1]
            lines = ["no-resolv", "no-hosts", f"listen-address={s['dns_server']}", "bind-interfaces", "user=root",
                     f"pid-file={d}/dnsmasq.pid", f"log-facility={d}/dnsmasq.log", "log-queries",
                     f"local=/{s['domain']}/"]
            lines += [f"host-record={name},{addr}" for name, addr in sorted(records.items())]
            (d / "dnsmasq.conf").write_text("\n".join(lines) + "\n")
            self.in_ns(s["dns_ns"], ["dnsmasq", f"--conf-file={d / 'dnsmasq.conf'}"])
            self.pidfiles.append(d / "dnsmasq.pid")

    def _router_dnsmasq_conf(self, s: dict, d: Path, inside: Path | None = None) -> Path:
        """The options the platform's dnsmasq would run with: EL reads /etc/dnsmasq.d; OpenWrt's init
        script turns the UCI lists into options. The ISP resolver stands in for resolv.conf.
        `inside`: the state directory as the router itself sees it (default `d`)."""
        inside = inside or d
        base = [f"listen-address={','.join(l['router_address'] for l in s['lans'])}", "bind-interfaces",
                "no-resolv", "no-hosts", f"server={self.plan['isp_resolver']}", "user=root",
                f"pid-file={inside}/dnsmasq.pid", f"log-facility={inside}/dnsmasq.log", "log-queries"]
        if s["platform"] == "el":
            # the operator's choice (W9: the WAN no longer forces it): this lab's EL routers have it on
            base += ["conf-dir=/etc/dnsmasq.d", "stop-dns-rebind"]
        (d / "dnsmasq.base").write_text("\n".join(base) + "\n")  # lab/dns_reload.py starts from it
        if s["platform"] == "openwrt" and not self.plan.get("release"):  # enrolled routers have no UCI yet
            base += dnsmasq_options(Path(s["tree"]))
        conf = d / "dnsmasq.conf"
        conf.write_text("\n".join(base) + "\n")
        return conf

    def _router_firewall(self, s: dict, d: Path) -> str:
        text = self._router_firewall_text(s)
        if text is None:
            return "-"
        fw = d / "firewall.nft"
        fw.write_text(text)
        return str(fw)

    def _router_firewall_text(self, s: dict) -> str | None:
        if not self.plan["firewall"]:
            return None
        if s["platform"] == "el":
            # the router's own masquerade on the WAN side (as firewalld or the admin's table would),
            # then the rendered table, loaded from its real path
            text = ("table ip labnat\ndelete table ip labnat\ntable ip labnat {\n"
                    "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
                    '\t\toifname "wan" masquerade\n\t}\n}\ninclude "/etc/nftables/wan.nft"\n')
        else:
            text = fw4_ruleset(Path(s["tree"]), "wan", tuple(l["bridge"] for l in s["lans"]))
        return text

    def make_nss_template(self) -> Path:
        nss = self.state / "nss"
        nss.mkdir(mode=0o700)
        run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"])
        return nss

    def start_routers(self, order: list[str] | None = None) -> None:
        """Prepare every router at once (files, firewall, dnsmasq), then start the plutos one by
        one, responders first, each once the previous one has loaded its connections."""
        nss = self.state / "nss" if (self.state / "nss").exists() else self.make_nss_template()
        order = order or self.plan["start_order"]
        # a release lab's routers start with their enrolment only; fetch brings their tunnels
        enrolled = self.plan["release"]["enrol"] if self.plan.get("release") else {}
        for name in order:
            s = self.sites[name]
            d = self.state / f"router-{name}"
            d.mkdir()
            os.mkfifo(d / "go")
            dnsconf = self._router_dnsmasq_conf(s, d)
            fw = self._router_firewall(s, d)
            self.pidfiles += [d / "dnsmasq.pid"]
            logf = open(d / "setup.log", "w")
            self.holders[name] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{s['router_ns']}", "unshare", "--mount", "--propagation", "private",
                 "sh", str(HERE / "router-setup.sh"), name, enrolled.get(name, s["tree"]), str(d), s.get("nss") or str(nss),
                 str(dnsconf), fw],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for k, name in enumerate(order, 1):
            self._wait_file(name, "prepared")
            progress("routers prepared", k, len(order), name)
        for k, name in enumerate(order, 1):
            with open(self.state / f"router-{name}" / "go", "w") as fifo:
                fifo.write("go\n")
            if name in enrolled:
                self._wait_file(name, "ready")
                continue
            self._wait_loaded(name, self.state / f"router-{name}")
            self._wait_initiated(name)
            progress("routers", k, len(order), name)

    def _wait_initiated(self, name: str) -> None:
        """Until this router's own initiations (towards peers already running) are established,
        bounded by 15 s or 3 s per conn it initiates, whichever is more.

        One router negotiating at a time keeps the lab kernel's single CPU from answering IKE
        so late that peers retransmit; Libreswan 4.10 was seen to lose a Child SA
        (TS_UNACCEPTABLE) in such a retransmission storm when all routers started at once.
        A fixed 15 s bound let a 24-site mesh's later routers (11 to 23 initiations each) start
        on top of each other: IKE_AUTH replies then came after the kernel's 30 s for an allocated
        SPI (net.core.xfrm_acq_expires), the initiator's "Add SA" failed with ESRCH and it retried,
        and the responder kept an orphan Child SA until DPD reaped it 60 s later."""
        mine = {c for t in self.plan["tunnels"] if t["initiator"] == name for c in self.sites[name]["conns"][t["name"]]}
        end = time.monotonic() + max(15.0, 3.0 * len(mine))
        while mine and not mine <= self._established_in_log(name) and time.monotonic() < end:
            time.sleep(0.05)

    def wait_tunnels_of(self, name: str, timeout: float = 60) -> bool:
        """Until every conn of this router's tunnels is established on this router (whack)."""
        want = {c for cs in self.sites[name]["conns"].values() for c in cs}
        end = time.monotonic() + timeout
        while not want <= set(self.traffic(name)):
            if time.monotonic() > end:
                return False
            time.sleep(0.25)
        return True

    def busybox_bin(self) -> Path:
        """A directory whose `wget` is BusyBox's (OpenWrt's downloader, ahead of the host's)."""
        d = self.state / "busybox-bin"
        if not d.exists():
            d.mkdir()
            (d / "wget").symlink_to(shutil.which("busybox"))
        return d

    def _wait_file(self, name: str, fname: str, timeout: float = 60) -> None:
        d = self.router_dir(name)
        end = time.monotonic() + timeout
        while not (d / fname).exists():
            if self.holders[name].poll() is not None or (d / "failed").exists():
                raise RuntimeError(f"router {name} failed to start: {(d / 'setup.log').read_text()[-2000:]}")
            if time.monotonic() > end:
                raise RuntimeError(f"router {name}: not {fname} within {timeout:.0f} s")
            time.sleep(0.05)

    def _wait_loaded(self, name: str, d: Path, timeout: float = 60) -> None:
        """Until pluto has added every conn of this router (its log says so): then its initiators
        find their responders ready, and the next router may start."""
        want = sum(len(c) for c in self.sites[name]["conns"].values())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.holders[name].poll() is not None:
                raise RuntimeError(f"router {name} failed to start: {(d / 'setup.log').read_text()[-2000:]}")
            try:
                text = (d / "pluto.log").read_text()
            except FileNotFoundError:
                text = ""
            if len(re.findall(r"added IKEv2 connection", text)) >= want:
                return
            time.sleep(0.05)
        raise RuntimeError(f"router {name}: pluto did not load its {want} connections within {timeout:.0f} s")

    # ---- proving ----------------------------------------------------------------------------
    def traffic(self, name: str) -> dict[str, dict]:
        # pluto's control socket, seen through the holder's root: one process, no nsenter
        ctl = f"/proc/{self.holders[name].pid}/root/run/pluto/pluto.ctl"
        r = run(["/usr/libexec/ipsec/whack", "--ctlsocket", ctl, "--trafficstatus"], check=False)
        out = {}
        for line in r.stdout.splitlines():
            m = re.search(r'"([^"]+)".*inBytes=(\d+), outBytes=(\d+)', line)
            if m:
                out[m.group(1)] = {"in": int(m.group(2)), "out": int(m.group(3))}
        return out

    def _established_in_log(self, name: str) -> set[str]:
        """Conns whose Child SA pluto logged as established (reading a file costs no process;
        in a lab kernel every process start costs 0.1-0.2 s)."""
        try:
            text = (self.router_dir(name) / "pluto.log").read_text(errors="replace")
        except FileNotFoundError:
            return set()
        return set(re.findall(r'"([^"]+)"(?:\[\d+\])? #\d+: (?:initiator|responder) established Child SA', text))

    def wait_tunnels(self) -> dict[str, dict]:
        """Until every Child SA of every tunnel is established on both ends, or the timeout. The
        logs say when to look; `ipsec whack --trafficstatus` on each router is the proof."""
        tunnels = self.plan["tunnels"]
        end = time.monotonic() + tunnel_timeout(len(tunnels))
        want = {n: {c for cs in self.sites[n]["conns"].values() for c in cs} for n in self.sites}
        shown = -1
        while time.monotonic() < end:
            logged = {n: self._established_in_log(n) for n in self.sites}
            n_up = sum(all(set(self.sites[e]["conns"][t["name"]]) <= logged[e] for e in (t["a"], t["b"])) for t in tunnels)
            if n_up != shown:
                progress("tunnels (pluto logs)", n_up, len(tunnels))
                shown = n_up
            if all(want[n] <= logged[n] for n in self.sites):
                break
            time.sleep(0.1)
        while True:
            with ThreadPoolExecutor(max_workers=8) as ex:
                status = dict(zip(self.sites, ex.map(self.traffic, self.sites)))
            up = {t["name"]: all(set(self.sites[e]["conns"][t["name"]]) <= set(status[e]) for e in (t["a"], t["b"]))
                  for t in tunnels}
            progress("tunnels", sum(up.values()), len(tunnels))
            if all(up.values()) or time.monotonic() > end:
                break
            time.sleep(0.5)
        for t in tunnels:
            ends = {e: {c: status[e].get(c) for c in self.sites[e]["conns"][t["name"]]} for e in (t["a"], t["b"])}
            self.add("tunnel", t["a"], t["b"], up[t["name"]], {"tunnel": t["name"], "established": ends,
                     "why": "" if up[t["name"]] else "not every Child SA is established on both ends (ipsec whack --trafficstatus)"})
        return status

    def add(self, kind: str, src: str, dst: str, ok: bool, evidence: dict) -> None:
        self.checks.append({"kind": kind, "src": src, "dst": dst, "ok": bool(ok), "evidence": evidence})

    @staticmethod
    def _ping_line(r: dict) -> str:
        rtt = f", rtt {min(r['rtt_ms'])} ms" if r["rtt_ms"] else ""
        return f"{r['sent']} echo requests, {r['received']} replies{rtt}" + (f" ({', '.join(r['errors'])})" if r.get("errors") else "")

    def check_pings(self, before: dict[str, dict]) -> None:
        jobs = []
        for s in self.plan["sites"]:
            for lan in s["lans"]:
                for o in self.plan["sites"]:
                    if o["name"] == s["name"]:
                        continue
                    for olan in o["lans"]:
                        jobs.append((s, lan, o, olan))
        capture = self.start_capture()
        results = ping_many([(f"/run/netns/{lan['host_ns']}", olan["host"]) for s, lan, o, olan in jobs])
        progress("pings", len(jobs), len(jobs))
        esp, plain = self.stop_capture(capture)
        after = {name: self.traffic(name) for name in self.sites}
        for (s, lan, o, olan), r in zip(jobs, results):
            tname = "-".join(sorted((s["name"], o["name"])))
            conns = s["conns"][tname]
            rose = any((after[s["name"]].get(c, {}).get("out", 0) > before[s["name"]].get(c, {}).get("out", 0)) for c in conns)
            ok = r["received"] > 0
            self.add("ping", s["name"], o["name"], ok and rose, {
                "from": lan["host"], "to": olan["host"], "ping": self._ping_line(r), "sa_out_bytes_rose": rose,
                "why": "" if ok and rose else ("no reply" if not ok else "replies came, but not through the tunnel's SA")})
        self.add("capture", "wan", "wan", esp > 0 and plain == 0,
                 {"esp_packets": esp, "plain_icmp_between_lans": plain,
                  "why": "" if (esp > 0 and plain == 0) else "expected ESP only on the WAN during the pings"})

    def start_capture(self):
        pcap = self.state / "wan.pcap"
        errf = self.state / "tcpdump.err"
        proc = self.popen_ns(self.plan["inet_ns"], ["tcpdump", "-i", "any", "-n", "-U", "--immediate-mode", "-w", str(pcap)],
                             stdout=subprocess.DEVNULL, stderr=open(errf, "w"))
        # tcpdump says "listening on" once the capture is armed
        end = time.monotonic() + 10
        while time.monotonic() < end and "listening on" not in errf.read_text():
            time.sleep(0.05)
        return proc, pcap

    def stop_capture(self, capture) -> tuple[int, int]:
        proc, pcap = capture
        time.sleep(0.2)
        proc.terminate()
        proc.wait(timeout=10)
        lans = [l["subnet"] for s in self.plan["sites"] for l in s["lans"]]
        lan_filter = " or ".join(f"net {n}" for n in lans)
        r = run(["tcpdump", "-n", "-r", str(pcap), "esp"], check=False)
        esp = r.stdout.count("\n")
        plain = run(["tcpdump", "-n", "-r", str(pcap), f"icmp and ({lan_filter})"], check=False).stdout.count("\n")
        if not esp:
            log(f"capture: {(self.state / 'tcpdump.err').read_text().strip()} / {r.stderr.strip()} / {pcap.stat().st_size} bytes")
        return esp, plain

    def check_router_pings(self) -> None:
        """Each router pings every remote LAN without choosing a source: only leftsourceip makes
        the kernel pick the router's LAN address, which the tunnel's policy matches."""
        jobs = [(s, o) for s in self.plan["sites"] for o in self.plan["sites"] if o["name"] != s["name"]]
        results = ping_many([(f"/run/netns/{s['router_ns']}", o["lans"][0]["host"]) for s, o in jobs])
        progress("router pings", len(jobs), len(jobs))
        for (s, o), r in zip(jobs, results):
            ok = r["received"] > 0
            self.add("router_ping", s["name"], o["name"], ok, {"to": o["lans"][0]["host"], "ping": self._ping_line(r),
                     "why": "" if ok else "the router's own traffic missed the tunnel (leftsourceip?)"})

    def _dig(self, s: dict, names: list[str]) -> dict[str, list[str]]:
        """One dig for all the names a LAN host asks its router (one process, several queries)."""
        lan = s["lans"][0]
        argv = ["nsenter", f"--net=/run/netns/{lan['host_ns']}", "--", "dig", f"@{lan['router_address']}",
                "+noall", "+answer", "+time=3", "+tries=2"]
        for n in names:
            argv += [n, "A"]
        r = run(argv, check=False, timeout=60)
        got: dict[str, list[str]] = {n: [] for n in names}
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) >= 5 and f[3] == "A" and f[0].rstrip(".") in got:
                got[f[0].rstrip(".")].append(f[4])
        return got

    def check_dns(self) -> None:
        """A LAN host asks its own router for a name in every other site's domain (through the
        tunnel to that site's DNS server), for a name outside the WAN (to the ISP, never into a
        tunnel), and for a name whose answer would rebind to a private address (dropped)."""
        sites = self.plan["sites"]
        outside, (rebind, rebind_ip) = self.plan["outside_name"], self.plan["rebind"]

        def one(s):
            others = [o for o in sites if o["name"] != s["name"]]
            return s, others, self._dig(s, [o["check_name"][0] for o in others] + [outside, rebind])

        with ThreadPoolExecutor(max_workers=8) as ex:
            answers = list(ex.map(one, sites))
        for k, (s, others, got) in enumerate(answers, 1):
            progress("dns", k, len(sites), s["name"])
            for o in others:
                name, want = o["check_name"]
                if s["dns_mode"] == "hosts" and not o["records"]:
                    self.notes.append(f"dns {s['name']}->{o['name']}: hosts mode and {o['name']} has no records: nothing to resolve")
                    continue
                ok = got[name] == [want]
                self.add("dns", s["name"], o["name"], ok, {"name": name, "want": want, "got": got[name],
                         "why": "" if ok else "the router did not forward the domain through the tunnel to the right server"})
            leaked = [o["name"] for o in sites if outside in self.dns_log(o)]
            self.add("dns_outside", s["name"], s["name"], got[outside] == [self.plan["isp_answer"]] and not leaked,
                     {"name": outside, "got": got[outside], "asked_wan_dns_servers": leaked})
            self.add("dns_rebind", s["name"], s["name"], rebind_ip not in got[rebind],
                     {"name": rebind, "got": got[rebind], "why": "a private answer from outside the WAN must be dropped"})

    def dns_log(self, site: dict) -> str:
        try:
            return (self.state / f"dns-{site['name']}" / "dnsmasq.log").read_text()
        except FileNotFoundError:
            return ""

    def check_firewall(self) -> None:
        """The proof only counts if the firewall was active, with its drop policies, all along."""
        if not self.plan["firewall"]:
            return
        for s in self.plan["sites"]:
            r = self.in_router(s["name"], ["nft", "list", "ruleset"], check=False)
            table = "table inet wan" if s["platform"] == "el" else "table inet fw4"
            ok = table in r.stdout and "policy drop" in r.stdout
            self.add("firewall", s["name"], s["name"], ok, {"table": table, "drop_policies": r.stdout.count("policy drop")})

    # ---- diagnostics, teardown ----------------------------------------------------------------
    def diagnostics(self, names: set[str]) -> None:
        for name in sorted(names):
            if name not in self.holders:
                continue
            d = self.results / "diagnostics" / name
            d.mkdir(parents=True, exist_ok=True)
            cmds = {"ip-a": ["ip", "a"], "ip-r": ["ip", "r"], "ip-xfrm-policy": ["ip", "xfrm", "policy"],
                    "ip-xfrm-state": ["ip", "-s", "xfrm", "state"], "trafficstatus": ["ipsec", "whack", "--trafficstatus"],
                    "ipsec-status": ["ipsec", "status"], "nft-ruleset": ["nft", "list", "ruleset"]}
            for fname, argv in cmds.items():
                r = self.in_router(name, argv, check=False, timeout=30)
                (d / f"{fname}.txt").write_text(scrub(r.stdout + r.stderr))
            rdir = self.router_dir(name)
            for src, dst in (("pluto.log", "pluto.log"), ("dnsmasq.log", "dnsmasq.log"), ("setup.log", "setup.log")):
                if (rdir / src).exists():
                    (d / dst).write_text(scrub((rdir / src).read_text(errors="replace")))
            r = self.in_router(name, ["timeout", "3", "tcpdump", "-i", "wan", "-n", "-c", "40"], check=False, timeout=10)
            (d / "wan-capture.txt").write_text(scrub(r.stdout + r.stderr))

    def teardown(self) -> None:
        """End what the lab started, by PID, and delete its namespaces; cheap, and safe to repeat."""
        pids = []
        for name, holder in self.holders.items():
            # pluto's pid file is in the router's own /run/pluto, seen through its holder's root
            pf = Path(f"/proc/{holder.pid}/root/run/pluto/pluto.pid")
            try:
                pids.append(int(pf.read_text().strip()))
            except (OSError, ValueError):
                pass
        for pf in self.pidfiles:
            try:
                pids.append(int(pf.read_text().strip()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            try:
                os.kill(pid, 15)
            except OSError:
                pass
        for holder in self.holders.values():
            if holder.poll() is None:
                holder.kill()
            holder.wait()
        if self.namespaces:
            subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in reversed(self.namespaces)),
                           capture_output=True, text=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def run(self) -> dict:
        t0 = time.monotonic()
        for label, fn in self.setup_phases():
            t = time.monotonic()
            fn()
            self.timings[label] = round(time.monotonic() - t, 2)
            log(f"{label}: {self.timings[label]} s")
        if self.plan.get("release"):
            from lab import release_lab
            t = time.monotonic()
            release_lab.run(self)
            self.timings["release"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        status = self.wait_tunnels()
        self.timings["tunnels"] = round(time.monotonic() - t, 2)
        if self.plan.get("change"):
            from lab.change import apply_change
            t = time.monotonic()
            status = apply_change(self)
            self.timings["change"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        self.check_firewall()
        self.check_pings(status)
        self.check_router_pings()
        self.check_dns()
        self.check_firewall()
        self.timings["checks"] = round(time.monotonic() - t, 2)
        failed = {c["src"] for c in self.checks if not c["ok"]} | {c["dst"] for c in self.checks if not c["ok"]}
        if failed:
            t = time.monotonic()
            self.diagnostics(failed & set(self.sites))
            self.timings["diagnostics"] = round(time.monotonic() - t, 2)
        self.timings["inside_total"] = round(time.monotonic() - t0, 2)
        return {"checks": self.checks, "timings": self.timings, "firewall_exercised": self.plan["firewall"],
                "notes": self.notes, "ok": all(c["ok"] for c in self.checks), "change": self.change,
                "release": self.release}


    def hold(self, control: Path) -> None:
        """Keep the lab up for a person (lab.up): run the commands that lab.shell drops into
        `control` (one JSON file each) in the named router or host, until `control/down` appears."""
        where = {n: ["nsenter", "-t", str(h.pid), "-m", "-n", "--"] for n, h in self.holders.items()}
        for s in self.plan["sites"]:
            where[f"{s['name']}-dns"] = ["nsenter", f"--net=/run/netns/{s['dns_ns']}", "--"]
            for j, lan in enumerate(s["lans"]):
                where[f"{s['name']}-host{j}"] = ["nsenter", f"--net=/run/netns/{lan['host_ns']}", "--"]
        where["internet"] = ["nsenter", f"--net=/run/netns/{self.plan['inet_ns']}", "--"]
        control.mkdir(parents=True, exist_ok=True)
        (control / "up.json").write_text(json.dumps({"places": sorted(where)}) + "\n")
        log("up: waiting for lab.shell commands; lab.down ends it")
        while not (control / "down").exists():
            for req in sorted(control.glob("*.req")):
                try:
                    ask = json.loads(req.read_text())
                except json.JSONDecodeError:
                    continue  # still being written
                req.unlink()
                if ask.get("place") not in where:
                    reply = {"rc": 2, "output": f"no such place; choose one of: {', '.join(sorted(where))}\n"}
                else:
                    try:
                        r = run(where[ask["place"]] + ["sh", "-c", ask["cmd"]], check=False, timeout=120)
                        reply = {"rc": r.returncode, "output": scrub(r.stdout + r.stderr)}
                    except subprocess.TimeoutExpired:
                        reply = {"rc": 124, "output": "timed out after 120 s\n"}
                tmp = req.with_suffix(".tmp")
                tmp.write_text(json.dumps(reply))
                tmp.rename(req.with_suffix(".out"))
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    results = Path(argv[1])
    results.mkdir(parents=True, exist_ok=True)
    if plan.get("routers") == "docker":
        from lab.docker_routers import DockerLab
        lab: Lab = DockerLab(plan, results)
    else:
        lab = Lab(plan, results)
    result: dict = {"ok": False, "checks": [], "error": None}
    try:
        result = lab.run()
        if plan.get("hold"):
            (results / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
            lab.hold(Path(plan["hold"]))
    except Exception as e:  # the host side reports it; the kernel must still power off cleanly
        result["error"] = scrub(f"{type(e).__name__}: {e}")
        result["timings"] = lab.timings
        log(f"ERROR {result['error']}")
        try:
            lab.diagnostics(set(lab.holders))
        except Exception as d:
            log(f"diagnostics failed too: {d}")
    finally:
        lab.teardown()
    (results / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
