"""A router that is its LAN's DNS server (router-DNS, the how-to's OpenWrt router): validation, rendering,
and the rendered dnsmasq configuration run by the real dnsmasq in network namespaces.

The namespace tests stand in for the tunnel: this host kernel has no ESP (docs: lab-substrate), so a
remote LAN's query reaches the router on its WAN interface in clear, addressed to its LAN address, as a
decrypted ESP packet does (its input interface is the WAN device). The lab proves the same through real
tunnels (lab/proofs.py router_dns)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from render import paths
from render.errors import WanError
from render.openwrt import dnsmasq_options, uci_dnsmasq_options
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO


def _sites(tmp_path: Path, **replace: str) -> Path:
    d = tmp_path / "sites"
    shutil.copytree(REPO / "sites", d)
    for site, pairs in replace.items():
        p = d / f"{site}.yaml"
        text = p.read_text()
        for old, new in pairs:
            assert old in text
            text = text.replace(old, new, 1)
        p.write_text(text)
    return d


def test_the_example_home_is_a_router_dns_site_and_its_peers_forward_to_the_router():
    wan = load_sites(REPO / "sites")
    home = wan.site("home")
    assert home.router_dns and not any(s.router_dns for s in wan.sites if s.name != "home")
    trees = render_wan(wan)
    conf = trees["home"][paths.DNSMASQ_OPENWRT].content.decode().splitlines()
    assert "local=/home.lan/" in conf and "domain=home.lan,192.168.2.0/24" in conf
    assert "host-record=nas.home.lan,192.168.2.10" in conf
    assert trees["home"][paths.DHCP_UCI_OPENWRT].content.decode().splitlines()[-1] == "set dhcp.@dnsmasq[0].localservice='0'"
    # home is dynamic too (behind NAT): no public address to drop DNS by; the NAT and fw4's wan zone keep it out
    assert "th dport 53 drop" not in trees["home"][paths.fw4_snippet("input")].content.decode()
    for other in ("acme", "berlin", "oslo", "paris", "rome"):
        assert paths.DHCP_UCI_OPENWRT not in trees[other]
        dns = trees[other][paths.DNSMASQ_EL].content.decode()
        lan = wan.site(other).router.lan_address
        assert f"server=/home.lan/192.168.2.82@{lan}\n" in dns and "local=/" not in dns


def test_a_router_dns_site_without_records_is_refused_where_any_site_uses_hosts_mode(tmp_path):
    no_records = ("  records:\n    nas: 192.168.2.10\n", "")
    load_sites(_sites(tmp_path / "a", home=[no_records]))  # forward mode everywhere: DHCP names are forwarded
    with pytest.raises(WanError) as info:
        load_sites(_sites(tmp_path / "b", home=[no_records], rome=[("dns:\n", "overrides:\n  dns_mode: hosts\ndns:\n")]))
    (p,) = info.value.problems
    lines = (tmp_path / "b/sites/home.yaml").read_text().splitlines()
    want = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("server:"))
    assert p.file.endswith("home.yaml") and p.line == want and p.where == "dns.server"
    assert "while rome uses dns_mode: hosts" in p.message and "add the names" in p.message


# ---- the real dnsmasq --------------------------------------------------------------------------------

def _ns(name: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, timeout=60)


@pytest.fixture
def site_net():
    """A router namespace (a LAN `lan0` 192.168.2.82/24 with a client host, a WAN `wan` 198.51.100.20)
    and an internet namespace that holds 10.1.2.5 (a remote LAN host; see the module docstring) and
    100.64.0.1 (anyone on the internet)."""
    if os.geteuid() != 0 or not shutil.which("dnsmasq"):
        pytest.fail("needs root and dnsmasq (./run installs it)")
    p = f"rdns{os.getpid()}"
    r, i, h = f"{p}r", f"{p}i", f"{p}h"
    cmds = [f"netns add {n}" for n in (r, i, h)] + [
        f"link add wan netns {r} type veth peer name r0 netns {i}",
        f"link add lan0 netns {r} type veth peer name eth0 netns {h}",
        f"-n {r} link set lo up", f"-n {r} link set wan up", f"-n {r} link set lan0 up",
        f"-n {r} addr add 198.51.100.20/32 dev wan", f"-n {r} route add 100.64.0.1/32 dev wan",
        f"-n {r} route add default via 100.64.0.1 dev wan", f"-n {r} addr add 192.168.2.82/24 dev lan0",
        f"-n {i} link set lo up", f"-n {i} link set r0 up", f"-n {i} addr add 100.64.0.1/32 dev r0",
        f"-n {i} addr add 10.1.2.5/32 dev lo", f"-n {i} route add 198.51.100.20/32 dev r0",
        f"-n {i} route add 192.168.2.0/24 via 198.51.100.20 dev r0 onlink",
        f"-n {h} link set lo up", f"-n {h} link set eth0 up"]
    try:
        for c in cmds:
            subprocess.run(["ip", *c.split()], check=True, capture_output=True, text=True)
        yield r, i, h
    finally:
        for n in (r, i, h):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _start_dnsmasq(ns: str, lines: list[str], d: Path) -> int:
    conf = d / "dnsmasq.conf"
    conf.write_text("\n".join(["no-resolv", "no-hosts", "user=root", f"pid-file={d}/pid", f"log-facility={d}/log",
                               f"dhcp-leasefile={d}/leases", "dhcp-range=192.168.2.100,192.168.2.249,255.255.255.0,12h",
                               *lines]) + "\n")
    r = _ns(ns, "dnsmasq", f"--conf-file={conf}")
    assert r.returncode == 0, r.stderr
    for _ in range(50):
        if (d / "pid").exists() and (d / "pid").read_text().strip():
            return int((d / "pid").read_text())
        time.sleep(0.05)
    raise AssertionError("dnsmasq wrote no pid file")


def _dig(ns: str, server: str, name: str, source: str | None = None) -> list[str]:
    r = _ns(ns, "dig", f"@{server}", *(["-b", source] if source else []), "+short", "+time=1", "+tries=1", name)
    return [x for x in r.stdout.splitlines() if re.fullmatch(r"[0-9]+(\.[0-9]+){3}", x)]


def _tree(tmp_path: Path, sites: Path, router: str) -> Path:
    write_trees(render_wan(load_sites(sites)), tmp_path / "out")
    return tmp_path / "out" / router


def test_openwrt_router_dns_answers_remote_lans_and_its_dhcp_names_where_local_service_refused_them(tmp_path, site_net):
    """OpenWrt's dnsmasq as its init script runs it from the stock /etc/config/dhcp (--bind-dynamic,
    domain lan, --local-service) plus the WAN's files: before (home with a separate DNS host) a query
    from a remote LAN is ignored; after (home router-DNS: localservice off by etc/wan/dhcp.uci, the
    domain served locally) it is answered, and so is the DHCP name a real udhcpc lease registered."""
    r, i, h = site_net
    separate_dns_host = [("  server: 192.168.2.82", "  server: 192.168.2.53")]
    before = _tree(tmp_path / "before", _sites(tmp_path / "b", home=separate_dns_host), "home")
    after = _tree(tmp_path / "after", REPO / "sites", "home")
    for tree, router_dns in ((before, False), (after, True)):
        d = tmp_path / f"run-{router_dns}"
        d.mkdir()
        lines = ["bind-dynamic", *uci_dnsmasq_options(tree), *dnsmasq_options(tree)]
        assert ("local-service" in lines) is not router_dns
        pid = _start_dnsmasq(r, lines, d)
        try:
            lease = _ns(h, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "10", "-T", "1",
                        "-x", "hostname:laptop", "-s", "/bin/true")
            leased = lease.stdout + lease.stderr
            assert "lease of 192.168.2." in leased, leased
            addr = leased.split("lease of ", 1)[1].split()[0]
            remote = _dig(i, "192.168.2.82", "nas.home.lan", source="10.1.2.5")
            if router_dns:
                assert remote == ["192.168.2.10"]
                assert _dig(i, "192.168.2.82", "laptop.home.lan", source="10.1.2.5") == [addr]
                assert _dig(h, "192.168.2.82", "laptop.lan") == []  # the LAN's domain is home.lan now, not lan
            else:
                assert remote == [] and "non-local network 10.1.2.5" in (d / "log").read_text()
        finally:
            os.kill(pid, 15)


def test_el_router_dns_listens_on_its_lan_address_and_not_on_the_public_one(tmp_path, site_net):
    """EL: the rendered listen-address turns --local-service off (dnsmasq(8)) and keeps dnsmasq off the
    public address: a remote LAN is answered, a query from the internet to the public address is not."""
    r, i, h = site_net
    sites = _sites(tmp_path, home=[("  platform: openwrt\n", "  platform: el\n")])
    tree = _tree(tmp_path, sites, "home")
    d = tmp_path / "run"
    d.mkdir()
    lines = ["local-service", *[x for x in (tree / paths.DNSMASQ_EL).read_text().splitlines() if x and x[0] != "#"]]
    assert "listen-address=192.168.2.82" in lines
    pid = _start_dnsmasq(r, lines, d)
    try:
        assert _dig(i, "192.168.2.82", "nas.home.lan", source="10.1.2.5") == ["192.168.2.10"]
        assert _dig(i, "198.51.100.20", "nas.home.lan", source="100.64.0.1") == []
    finally:
        os.kill(pid, 15)
