"""The lab's plan: from the WAN model and the rendered trees to plain data the lab kernel runs.

Addresses: every router's WAN veth holds its public address /32 and routes through an "internet"
namespace (100.64.0.1 on its side of every link); an ISP resolver sits at 100.64.0.53 there.
Each LAN is a bridge in the router's namespace with the router, one LAN host and (in the LAN that
holds it) the site's DNS server host.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from render import paths
from render.manifest import Manifest
from render.model import Wan

INET_GW = "100.64.0.1"
ISP_RESOLVER = "100.64.0.53"
ISP_ANSWER = "198.18.0.1"  # what the ISP resolver answers for any name outside the WAN
REBIND_NAME = "rebind-test.example"  # the ISP answers it with a private address: must be blocked
REBIND_ANSWER = "10.66.66.66"
OUTSIDE_NAME = "outside-the-wan.example"


def _free_host(net: IPv4Network, taken: set[IPv4Address]) -> IPv4Address:
    hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
    for candidate in reversed(hosts[len(hosts) // 2:] or hosts):
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free address for a lab host in {net}")


def lab_plan(wan: Wan, out: Path, prefix: str, firewall: bool, libreswan_major: int,
             index: dict[str, int] | None = None) -> dict:
    """Everything the in-kernel lab needs, as JSON-able data. `index` numbers the sites (namespace
    and interface names) when two revisions of a WAN share one lab."""
    sites = []
    manifests = {s.name: Manifest.read(out / s.name / paths.MANIFEST) for s in wan.sites}
    for s in wan.sites:
        i = index[s.name] if index else wan.sites.index(s)
        lans = []
        for j, net in enumerate(s.lans):
            taken = {s.router.lan_address, s.dns.server} | {a for _, a in s.dns.records}
            router_addr = s.router.lan_address if s.router.lan_address in net else next(h for h in net.hosts() if h not in taken)
            taken.add(router_addr)
            host = _free_host(net, taken)
            lans.append({"subnet": str(net), "prefixlen": net.prefixlen, "bridge": "br-lan" if j == 0 else f"br-lan{j}",
                         "router_address": str(router_addr), "host": str(host), "host_ns": f"{prefix}h{i}x{j}",
                         "has_dns": s.dns.server in net})
        records = {f"{name}.{s.dns.domain}": str(addr) for name, addr in s.dns.records}
        probe = f"lab-probe.{s.dns.domain}"
        sites.append({
            "name": s.name, "index": i, "platform": s.router.platform, "libreswan": s.router.libreswan,
            "public": str(s.router.public_address), "lan_address": str(s.router.lan_address),
            "router_ns": f"{prefix}r{i}", "dns_ns": f"{prefix}d{i}", "inet_if": f"r{i}",
            "lans": lans, "domain": s.dns.domain, "dns_server": str(s.dns.server), "dns_mode": s.dns_mode,
            "records": records, "probe_record": [probe, lans[0]["host"]],
            # the name a remote LAN host asks for: a real record where the router can know it
            "check_name": (sorted(records.items())[0] if records else (probe, lans[0]["host"])),
            "tree": str((out / s.name).resolve()),
            "conns": {t.name: list(manifests[s.name].tunnels[t.name].conns) for t in wan.tunnels_of(s.name)},
        })
    # responders start before their initiators, so no first IKE_SA_INIT meets an unloaded peer
    order, started = [], set()
    pending = [s.name for s in wan.sites]
    while pending:
        for name in list(pending):
            if all(t.peer_of(name) in started for t in wan.tunnels_of(name) if t.initiator == name):
                order.append(name)
                started.add(name)
                pending.remove(name)
                break
        else:  # a cycle cannot happen with the topology's initiator rule; start the rest anyway
            order.extend(pending)
            break
    return {
        "prefix": prefix, "firewall": firewall, "wan": wan.name, "libreswan_major": libreswan_major,
        "inet_ns": f"{prefix}inet", "inet_gw": INET_GW, "isp_resolver": ISP_RESOLVER, "isp_answer": ISP_ANSWER,
        "rebind": [REBIND_NAME, REBIND_ANSWER], "outside_name": OUTSIDE_NAME,
        "sites": sites, "start_order": order,
        "tunnels": [{"name": t.name, "a": t.a, "b": t.b, "initiator": t.initiator} for t in wan.tunnels],
    }


def change_plan(before: Wan, out_before: Path, after: Wan, out_after: Path, prefix: str, firewall: bool,
                libreswan_major: int, mode: str) -> dict:
    """A lab that starts as `before`, then changes to `after` by `mode` ("reconcile" on every
    router, or "restart": new files and a pluto restart everywhere, for contrast)."""
    names = sorted({s.name for s in before.sites} | {s.name for s in after.sites})
    index = {n: i for i, n in enumerate(names)}
    pb = lab_plan(before, out_before, prefix, firewall, libreswan_major, index)
    pa = lab_plan(after, out_after, prefix, firewall, libreswan_major, index)
    by_name = {s["name"]: s for s in pb["sites"]} | {s["name"]: s for s in pa["sites"]}
    old = {t["name"]: t for t in pb["tunnels"]}
    digests = {}
    for out, wan in ((out_before, before), (out_after, after)):
        for s in wan.sites:
            for t, v in Manifest.read(out / s.name / paths.MANIFEST).tunnels.items():
                digests.setdefault(t, []).append((s.name, v.conf_sha256))
    unchanged = [t["name"] for t in pa["tunnels"] if t["name"] in old
                 and sorted(digests[t["name"]][:2]) == sorted(digests[t["name"]][2:])]
    # a ping stream across a tunnel the change does not touch: it must lose nothing
    stream = None
    for t in unchanged:
        a, b = old[t]["a"], old[t]["b"]
        stream = {"tunnel": t, "from_ns": by_name[a]["lans"][0]["host_ns"], "to": by_name[b]["lans"][0]["host"]}
        break
    pb["network_sites"] = [by_name[n] for n in names]
    pb["change"] = {
        "mode": mode, "sites": pa["sites"], "tunnels": pa["tunnels"], "start_order": pa["start_order"],
        "new": sorted(set(s.name for s in after.sites) - set(s.name for s in before.sites)),
        "gone": sorted(set(s.name for s in before.sites) - set(s.name for s in after.sites)),
        "unchanged_tunnels": unchanged, "stream": stream,
    }
    return pb
