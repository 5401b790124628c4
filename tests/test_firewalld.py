"""Real firewalld on the EL routers of the QEMU lab (lab/firewalld.py), without a lab kernel: the
root's recipe and its cache key (shared builder, lab/roots.py), which routers get it and what the
plan and verdict say, a router's disk (the stock /etc/firewalld, the operator's zones, the enabled
unit), the systemctl stand-in (lab/el-systemctl, run by sh), and the parser of firewall-cmd's output.

One test boots one router's holder (lab/router-setup.sh) on this host's kernel in a network
namespace of its own, in the built root: a real dbus-daemon, firewalld 1.3.3, polkitd and radvd, the
rendered zones and policies, the WAN's table, `firewall-cmd --reload`, and the platform's own traffic
from a LAN host (ND, RS/RA, DHCP from 0.0.0.0) before and after the reload. It needs root and the
built root (`python3 -c 'from lab import firewalld; firewalld.ensure_root()'`, about a minute);
without them it is skipped, and says so. The last test shows the old EL table biting that traffic
and the rendered one not, with real nft and dnsmasq (root only)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab import console, firewalld, fwcheck, libreswan5, roots
from lab.contracts import LabResult
from lab.routers import ROOT_PATH
from lab.run import LabRequest, _prepare, firewalls_per_router
from render import paths

from support import REPO

TWO = REPO / "tests/lab/wans/two"
MIXED = REPO / "tests/lab/wans/mixed"
SYSTEMCTL = REPO / "lab/el-systemctl"


def _fake(root_obj: roots.Root, cache: Path, meta: dict, monkeypatch) -> Path:
    """A directory shaped like a built root (metadata, /etc/firewalld): enough for the host side,
    which only names it in the plan and copies its stock files (a stand-in: nothing boots here)."""
    monkeypatch.setenv("WAN_LAB_CACHE", str(cache))
    root = root_obj.root_dir()
    (root / "etc/firewalld/zones").mkdir(parents=True)
    (root / "etc/firewalld/firewalld.conf").write_text("DefaultZone=public\nFirewallBackend=nftables\n")
    (root / roots.META).write_text(json.dumps({**meta, "recipe": root_obj.recipe}))
    return root


def test_the_recipe_is_debian_12_with_firewalld_and_dbus_and_starts_no_daemon_on_the_host(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path))
    r = firewalld.RECIPE
    assert r["suite"] == "bookworm" and {"firewalld", "dbus", "libreswan", "nftables", "radvd"} <= set(r["packages"])
    # polkitd (firewalld's dependency) needs a logind debootstrap cannot pick by itself
    assert "libpam-systemd" in r["packages"]
    assert r["no_daemons"] is True  # docker_image.debootstrap: two stages, policy-rc.d, a network namespace
    d = firewalld.root_dir()
    assert d.parent == tmp_path and d.name == f"root-bookworm-fw-{firewalld.ROOT.recipe_hash()}"
    # the systemctl placeholder is part of the recipe: another one, another root
    monkeypatch.setitem(firewalld.ROOT.files, firewalld.SYSTEMCTL, ("#!/bin/sh\n", 0o755))
    assert firewalld.root_dir() != d and firewalld.built() is None


def test_the_libreswan_5_root_carries_firewalld_for_its_el_routers():
    """Debian 13's firewalld (2.x, EL 10's major) in the Libreswan 5 root, built like the firewalld root:
    no daemon started on the build host, the systemctl stand-in's place in it, its version probed."""
    assert set(libreswan5.FIREWALLD) <= set(libreswan5.RECIPE["packages"]) and libreswan5.RECIPE["no_daemons"]
    assert set(libreswan5.FIREWALLD) <= set(firewalld.PACKAGES)
    assert libreswan5.ROOT.files == firewalld.ROOT.files == {firewalld.SYSTEMCTL: (firewalld.SYSTEMCTL_PLACEHOLDER, 0o755)}


def test_nothing_is_built_without_a_firewall_or_an_el_firewalld_router(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path))
    el = SimpleNamespace(router=SimpleNamespace(platform="el", firewall="firewalld", libreswan=4))
    nft = SimpleNamespace(router=SimpleNamespace(platform="el", firewall="nftables", libreswan=4))
    owrt = SimpleNamespace(router=SimpleNamespace(platform="openwrt", firewall="fw4", libreswan=4))
    five = SimpleNamespace(router=SimpleNamespace(platform="el", firewall="firewalld", libreswan=5))
    assert firewalld.choose([el], 4, firewall=False) == (None, None)  # User-Mode Linux
    assert firewalld.choose([nft, owrt, five], 4, firewall=True) == (None, None)
    monkeypatch.setenv("WAN_LAB_FIREWALLD", "0")
    assert firewalld.choose([el, owrt], 4, firewall=True) == (None, "WAN_LAB_FIREWALLD=0")
    assert list(tmp_path.iterdir()) == []


def test_on_qemu_the_el_router_runs_firewalld_and_the_verdict_names_each_routers_firewall(monkeypatch, tmp_path):
    root = _fake(firewalld.ROOT, tmp_path / "cache", {"firewalld": "1.3.3", "libreswan": "4.10"}, monkeypatch)
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path / "cache"))
    p = _prepare(LabRequest(sites=TWO, kernel="qemu", results=tmp_path / "q"), "qemu", 4, lambda line: None)
    acme, home = p.plan.wan.site("acme"), p.plan.wan.site("home")
    assert (acme.firewalld, acme.root, acme.firewall) == ("1.3.3", str(root), "firewalld")
    assert (home.firewalld, home.root) == ("", "")
    assert p.plan.firewalls["acme"].startswith("firewalld 1.3.3 (real")
    assert p.plan.firewalls["home"] == "the lab's model of fw4 (lab/platform.py)"
    text = console.verdict(LabResult(firewalls=p.plan.firewalls), ["acme", "home"], tmp_path)
    assert "firewall: acme: firewalld 1.3.3 (real" in text
    # User-Mode Linux: no firewall at all, as before; the root is not used
    u = _prepare(LabRequest(sites=TWO, kernel="uml", results=tmp_path / "u"), "uml", 4, lambda line: None)
    assert u.plan.wan.site("acme").root == "" and u.plan.wan.site("acme").firewalld == ""
    assert u.plan.firewalls["acme"] == "not exercised (User-Mode Linux has no nftables ip/inet family)"
    # switched off: the lab's model, and why
    monkeypatch.setenv("WAN_LAB_FIREWALLD", "0")
    o = _prepare(LabRequest(sites=TWO, kernel="qemu", results=tmp_path / "o"), "qemu", 4, lambda line: None)
    assert o.plan.wan.site("acme").firewalld == ""
    assert o.plan.firewalls["acme"] == ("the lab's model of EL's firewall (lab/platform.py; firewalld NOT run: "
                                        "WAN_LAB_FIREWALLD=0)")


@pytest.mark.parametrize("root_firewalld", ["2.3.1", ""])
def test_a_5x_el_router_runs_its_roots_firewalld_or_says_it_was_not_run(monkeypatch, tmp_path, root_firewalld):
    """A Libreswan 5.x EL router keeps the Libreswan 5 root and runs that root's firewalld (Debian 13's);
    a 5.x root without one (an older build) leaves it on the model, and the verdict says so."""
    cache = tmp_path / "cache"
    _fake(firewalld.ROOT, cache, {"firewalld": "1.3.3", "libreswan": "4.10"}, monkeypatch)
    five = _fake(libreswan5.ROOT, cache, {"libreswan": "5.2", "firewalld": root_firewalld}, monkeypatch)
    monkeypatch.setenv("WAN_LAB_CACHE", str(cache))
    p = _prepare(LabRequest(sites=MIXED, kernel="qemu", results=tmp_path / "r"), "qemu", 4, lambda line: None)
    acme, berlin = p.plan.wan.site("acme"), p.plan.wan.site("berlin")  # acme: EL 5.x; berlin: EL 4.x
    assert (acme.root, acme.firewalld) == (str(five), root_firewalld)
    assert berlin.firewalld == "1.3.3"
    if root_firewalld:
        assert p.plan.firewalls["acme"].startswith("firewalld 2.3.1 (real, in the Libreswan 5 root")
    else:
        assert "firewalld NOT run: a Libreswan 5.x router: its root has no firewalld" in p.plan.firewalls["acme"]
    # the lab asks for the model: neither runs it
    m = _prepare(LabRequest(sites=MIXED, kernel="qemu", results=tmp_path / "m", firewalld=False), "qemu", 4,
                 lambda line: None)
    assert m.plan.wan.site("acme").firewalld == "" == m.plan.wan.site("berlin").firewalld


def test_an_el_nftables_router_is_named_as_the_model():
    s = SimpleNamespace(name="x", firewalld="", platform="el", firewall="nftables", root="")
    assert "`firewall: nftables`" in firewalls_per_router((s,), True, [], None, "netns")["x"]


def test_a_firewalld_routers_disk_has_the_stock_files_the_operators_zones_and_the_enabled_unit(monkeypatch, tmp_path):
    from lab.routers import NetnsRouter
    _fake(firewalld.ROOT, tmp_path / "cache", {"firewalld": "1.3.3", "libreswan": "4.10"}, monkeypatch)
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path / "cache"))
    p = _prepare(LabRequest(sites=TWO, kernel="qemu", results=tmp_path / "r"), "qemu", 4, lambda line: None)
    (tmp_path / "nss").mkdir()
    r = NetnsRouter(p.plan.wan.site("acme"), None, tmp_path / "state", "", True, tmp_path / "nss")
    r.install(r.site.tree)
    fw = r.flash / "etc/firewalld"
    assert not fw.is_symlink() and (fw / "firewalld.conf").read_text().startswith("DefaultZone=public")
    external = (fw / "zones/external.xml").read_text()
    assert '<interface name="wan"/>' in external and "<masquerade/>" in external
    assert f'<forward-port port="8080" protocol="tcp" to-port="8080" to-addr="{r.site.lans[0].host}"/>' in external
    assert '<interface name="br-lan"/>' in (fw / "zones/internal.xml").read_text()
    # the operator's radvd on the first LAN, answering solicitations by unicast (what lab/fwcheck.py tells apart)
    radvd = (r.flash / "etc/radvd.conf").read_text()
    assert radvd.startswith("# the lab's EL operator") and "\ninterface br-lan\n" in radvd
    assert "AdvRASolicitedUnicast on;" in radvd and f"prefix {firewalld.RA_PREFIX}\n" in radvd
    rendered = Path(r.site.tree) / "etc/firewalld/zones/wan-tunnels.xml"
    assert (fw / "zones/wan-tunnels.xml").read_text() == rendered.read_text()
    link = r.flash / "etc/systemd/system/multi-user.target.wants/wan-firewall.service"
    assert os.readlink(link) == "/etc/systemd/system/wan-firewall.service"
    assert r.reload_env().get("WAN_RELOAD_FIREWALL") is None  # reconcile's own firewalld path


def _systemctl(units: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(SYSTEMCTL), *args], capture_output=True, text=True,
                          env={**os.environ, "WAN_LAB_UNIT_DIR": str(units)}, timeout=30)


def test_the_systemctl_stand_in_enables_and_starts_a_oneshot_unit_and_refuses_what_it_does_not_model(tmp_path):
    units = tmp_path / "system"
    units.mkdir()
    out = tmp_path / "ran"
    (units / "wan-firewall.service").write_text(
        f"[Unit]\nAfter=firewalld.service\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        f"ExecStart=/bin/sh -c 'echo one >> {out}'\nExecStart=-/bin/false\nExecStart=/bin/sh -c 'echo two >> {out}'\n"
        "[Install]\nWantedBy=multi-user.target\n")
    assert _systemctl(units, "is-enabled", "wan-firewall").returncode == 1
    assert _systemctl(units, "daemon-reload").returncode == 0
    assert _systemctl(units, "enable", "wan-firewall").returncode == 0
    assert os.readlink(units / "multi-user.target.wants/wan-firewall.service") == str(units / "wan-firewall.service")
    assert _systemctl(units, "is-enabled", "wan-firewall.service").returncode == 0
    assert _systemctl(units, "restart", "wan-firewall").returncode == 0
    assert out.read_text() == "one\ntwo\n"  # in order; the "-" line's failure ignored
    (units / "bad.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/sh -c 'exit 3'\n")
    assert _systemctl(units, "start", "bad").returncode == 3
    assert _systemctl(units, "try-restart", "bad").returncode == 0  # not enabled: nothing to do
    r = _systemctl(units, "restart", "firewalld")
    assert r.returncode == 5 and "not modelled" in r.stderr
    r = _systemctl(units, "mask", "wan-firewall")
    assert r.returncode == 1 and "'mask' is not modelled" in r.stderr
    assert _systemctl(units, "disable", "wan-firewall").returncode == 0
    assert not (units / "multi-user.target.wants/wan-firewall.service").exists()


def test_active_zones_are_read_from_firewall_cmd():
    # firewall-cmd 1.3.3's --get-active-zones, as the router in the test below printed it
    text = ("external\n  interfaces: wan\ninternal\n  interfaces: br-lan\n"
            "wan-peers\n  sources: 198.51.100.20/32\nwan-tunnels\n  sources: 192.168.2.0/24\n")
    z = fwcheck.active_zones(text)
    assert z["wan-tunnels"] == {"interfaces": [], "sources": ["192.168.2.0/24"]}
    assert z["external"]["interfaces"] == ["wan"] and set(z) == {"external", "internal", "wan-peers", "wan-tunnels"}


# ---- one router's holder on this host's kernel, with real firewalld --------------------------------

def _can_boot() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    if firewalld.built() is None:
        return f"the firewalld root is not built ({firewalld.root_dir()}): lab/firewalld.py ensure_root()"
    if subprocess.run(["nft", "list", "tables"], capture_output=True).returncode != 0:
        return "this kernel has no nftables"
    return None


@pytest.mark.skipif(_can_boot() is not None, reason=str(_can_boot()))
def test_a_router_boots_firewalld_with_the_wans_zones_and_table_and_a_reload_keeps_the_table(tmp_path):
    """The holder's firewalld path for real, on the host kernel in a network namespace of its own
    (no ESP needed here: pluto is never started). Checks what lab/firewalld.py checks in the lab, on
    berlin of the router-DNS WAN: also the platform's own traffic from a LAN host namespace through
    real firewalld and the WAN's table, at boot and after `firewall-cmd --reload`: neighbour discovery,
    the operator's radvd answering a Router Solicitation, the router's dnsmasq a DHCPDISCOVER from 0.0.0.0."""
    from lab.routers import NetnsRouter
    p = _prepare(LabRequest(sites=REPO / "tests/lab/wans/router-dns", kernel="qemu", results=tmp_path / "r"), "qemu", 4,
                 lambda line: None)
    site = p.plan.wan.site("berlin")
    assert site.firewalld and site.router_dns
    ns, hns = f"fwt{os.getpid()}", f"fwh{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "add", hns], check=True)
    try:
        ip = ["ip", "-n", ns]
        subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
        subprocess.run([*ip, "link", "add", "wan", "type", "veth", "peer", "name", "wanp"], check=True)
        subprocess.run([*ip, "link", "add", "br-lan", "type", "veth", "peer", "name", "eth0", "netns", hns], check=True)
        subprocess.run(["ip", "-n", hns, "link", "set", "eth0", "up"], check=True)
        for a in ("wan", "br-lan"):
            subprocess.run([*ip, "link", "set", a, "up"], check=True)
        subprocess.run([*ip, "addr", "add", f"{site.public}/24", "dev", "wan"], check=True)
        lan = site.lans[0]
        subprocess.run([*ip, "addr", "add", f"{lan.router_address}/{lan.prefixlen}", "dev", "br-lan"], check=True)
        site = dataclasses.replace(site, router_ns=ns)
        (tmp_path / "nss").mkdir()
        r = NetnsRouter(site, None, tmp_path / "state", "192.0.2.53", True, tmp_path / "nss")
        r.install(site.tree)
        r.boot()
        try:
            t0 = time.monotonic()
            r.wait_prepared(timeout=90)
            up = time.monotonic() - t0
            remote = [x.subnet for o in ("acme", "home") for x in p.plan.wan.site(o).lans]
            before = fwcheck.state(r, Path(site.tree), remote)
            assert before["state"] == "running" and before["why"] == "", before
            assert before["active_zones"]["external"]["interfaces"] == ["wan"]
            assert {"wan-from-tunnels", "wan-into-tunnels"} <= set(before["policies"])
            ll = _link_local(ns, "br-lan")
            _link_local(hns, "eth0")
            probes = _platform_probes(ns, hns, ll)
            assert all(v["ok"] for v in probes.values()), (probes, (r.bootdir / "radvd.log").read_text())
            assert r.exec(["firewall-cmd", "--reload"], timeout=120).returncode == 0
            after = fwcheck.state(r, Path(site.tree), remote)
            assert after["why"] == "" and after["wan_rules"] == before["wan_rules"] > 0, after
            probes = _platform_probes(ns, hns, ll)
            assert all(v["ok"] for v in probes.values()), probes
            # reconcile's firewalld path, with the stand-in systemctl: the table loaded again
            assert r.exec(["systemctl", "restart", "wan-firewall"], env={"PATH": ROOT_PATH}).returncode == 0
            assert r.exec(["firewall-cmd", "--version"]).stdout.strip() == "1.3.3"
            print(f"holder with firewalld prepared in {up:.1f} s")
        finally:
            r.teardown()
    finally:
        subprocess.run(["ip", "netns", "del", hns], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_a_router_dns_el_site_opens_dns_to_the_remote_lans_in_its_wan_tunnels_zone():
    """Found with real firewalld: the WAN's policies (egress ANY) cover forwarded traffic only, so the
    remote LANs' DNS queries to a router-DNS EL router met zone wan-tunnels' default target (reject)."""
    import xml.etree.ElementTree as ET

    from render.render import render_wan
    from render.validate import load_sites
    trees = render_wan(load_sites(REPO / "tests/lab/wans/router-dns"), "lab")

    def services(router: str) -> list[str]:
        xml = trees[router][paths.firewalld_zone("wan-tunnels")].content.decode()
        return [s.get("name") for s in ET.fromstring(xml).iter("service")]
    assert services("berlin") == ["dns"]  # EL, its LAN's DNS server
    assert services("acme") == []  # EL, a DNS host on its LAN: nothing to the router itself


def test_a_tree_altered_after_rendering_is_told_apart_as_reconcile_tells_it(tmp_path):
    """lab/fwcheck.py proves reconcile's firewalld path only on a tree reconcile accepts (a negative lab
    alters its trees on purpose)."""
    from render.render import render_wan, write_trees
    from render.validate import load_sites
    write_trees(render_wan(load_sites(TWO), "lab"), tmp_path)
    assert fwcheck.tree_intact(tmp_path / "acme")
    nft = tmp_path / "acme" / paths.NFT_EL
    nft.write_text(nft.read_text().replace("snat", "masquerade", 1))
    assert not fwcheck.tree_intact(tmp_path / "acme")


# ---- the platform's own traffic through the EL table: the old one bites, the rendered one does not ----
# issue 13 item 4. berlin's first LAN (tests/lab/wans/router-dns, an EL router-DNS site) on this host's
# kernel: a router namespace with the WAN's `table inet wan` and real dnsmasq as the operator's DHCP
# server and RA daemon (dnsmasq's enable-ra: the lab's EL routers run radvd in the firewalld root,
# which this host does not have; what is tested here is the table, and either daemon reads RS and
# DHCP from sockets behind the input hook), and a LAN host namespace without an IPv4 address. The
# probes are the lab's own (lab/fwcheck.py ra_answered, lab/proofs.py lease).

OLD_EL_TABLE = REPO / "tests/data/el-wan-old-berlin.nft"


def _no_netns_lab() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("nft", "dnsmasq", "busybox", "ping") if not shutil.which(t)]
    if missing:
        return f"not installed: {missing}"
    if subprocess.run(["nft", "list", "tables"], capture_output=True).returncode != 0:
        return "this kernel has no nftables"
    return None


def _link_local(ns: str, dev: str) -> str:
    """The link-local address of `dev` in `ns` once it has left DAD (a tentative address sends nothing)."""
    for _ in range(100):
        a = subprocess.run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev, "scope", "link"],
                           capture_output=True, text=True).stdout
        if "fe80::" in a and "tentative" not in a:
            return a.split("inet6 ", 1)[1].split("/", 1)[0]
        time.sleep(0.1)
    raise AssertionError(f"{ns} {dev}: no usable link-local address: {a!r}")


def _platform_probes(router_ns: str, host_ns: str, router_ll: str) -> dict[str, dict]:
    """ND (the host pings the router's link-local address), RS/RA and a DHCPDISCOVER from 0.0.0.0, at once."""
    from concurrent.futures import ThreadPoolExecutor

    from lab.proofs import lease
    host = ["ip", "netns", "exec", host_ns]

    def nd() -> dict:
        p = subprocess.run([*host, "ping", "-6", "-c", "1", "-W", "3", "-I", "eth0", router_ll],
                           capture_output=True, text=True, timeout=30)
        return {"ok": p.returncode == 0, "ping": p.stdout.strip()[-200:]}

    def dhcp() -> dict:
        addr, out = lease(host_ns)
        return {"ok": bool(addr), "leased": addr, "udhcpc": out[-300:]}

    with ThreadPoolExecutor(3) as ex:
        jobs = {"ipv6_nd": ex.submit(nd), "ipv6_ra": ex.submit(fwcheck.ra_answered, host, "eth0", router_ll,
                                                               firewalld.RA_PREFIX, 6.0),
                "dhcp_discover": ex.submit(dhcp)}
        return {k: f.result() for k, f in jobs.items()}


@pytest.mark.skipif(_no_netns_lab() is not None, reason=str(_no_netns_lab()))
def test_the_old_el_table_drops_nd_ra_and_dhcp_from_0_0_0_0_and_the_rendered_table_does_not(tmp_path):
    """W5: the old table's input chain (policy drop, IPv4 rules for the LANs' own addresses) drops the
    host's neighbour solicitations, its Router Solicitation and its DHCPDISCOVER from 0.0.0.0 (dnsmasq
    never logs the DISCOVER); the rendered table (policy accept, IPv4 matches only) lets all three through."""
    from render.render import render_wan
    from render.validate import load_sites
    rendered = render_wan(load_sites(REPO / "tests/lab/wans/router-dns"), "lab")["berlin"][paths.NFT_EL].content
    (tmp_path / "wan.nft").write_bytes(rendered)
    rns, hns = f"elr{os.getpid()}", f"elh{os.getpid()}"
    prefix = firewalld.RA_PREFIX.split("/")[0]
    dnsmasq = None
    subprocess.run(["ip", "netns", "add", rns], check=True)
    subprocess.run(["ip", "netns", "add", hns], check=True)
    try:
        for cmd in (["-n", rns, "link", "set", "lo", "up"], ["-n", hns, "link", "set", "lo", "up"],
                    ["-n", rns, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", hns],
                    ["-n", rns, "link", "set", "lan", "up"], ["-n", hns, "link", "set", "eth0", "up"],
                    ["-n", rns, "addr", "add", "10.3.0.1/24", "dev", "lan"],
                    ["-n", rns, "addr", "add", f"{prefix}1/64", "dev", "lan", "nodad"]):
            subprocess.run(["ip", *cmd], check=True)
        # the operator's dnsmasq: DHCP on the LAN and RAs with the LAN's prefix (dnsmasq(8) enable-ra,
        # dhcp-range constructor: ra-only); no DNS (port=0), only this interface
        log = tmp_path / "dnsmasq.log"
        (tmp_path / "dnsmasq.conf").write_text(
            "port=0\ninterface=lan\nbind-interfaces\nenable-ra\ndhcp-range=::,constructor:lan,ra-only\n"
            f"dhcp-range=10.3.0.100,10.3.0.150,1h\ndhcp-leasefile={tmp_path / 'leases'}\nlog-dhcp\n"
            f"log-facility={log}\n")
        dnsmasq = subprocess.Popen(["ip", "netns", "exec", rns, "dnsmasq", "--keep-in-foreground",
                                    f"--conf-file={tmp_path / 'dnsmasq.conf'}"], stderr=subprocess.PIPE, text=True)
        ll = _link_local(rns, "lan")
        _link_local(hns, "eth0")
        assert dnsmasq.poll() is None, dnsmasq.stderr.read()

        def load(path: Path) -> None:
            r = subprocess.run(["ip", "netns", "exec", rns, "nft", "-f", str(path)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr

        load(OLD_EL_TABLE)
        before = log.read_text() if log.exists() else ""
        old = _platform_probes(rns, hns, ll)
        assert {k: v["ok"] for k, v in old.items()} == {"ipv6_nd": False, "ipv6_ra": False, "dhcp_discover": False}, old
        assert old["ipv6_ra"]["rs_sent"] >= 2 and "DHCPDISCOVER" not in log.read_text()[len(before):]

        load(tmp_path / "wan.nft")  # replaces the table (its `delete table inet wan`)
        table = subprocess.run(["ip", "netns", "exec", rns, "nft", "list", "table", "inet", "wan"],
                               capture_output=True, text=True).stdout
        assert "policy drop" not in table and "ipsec missing drop" in table
        new = _platform_probes(rns, hns, ll)
        assert all(v["ok"] for v in new.values()), new
        assert new["ipv6_ra"]["answer"]["to"] == new["ipv6_ra"]["host"]  # unicast: the answer to the host's RS
        assert new["dhcp_discover"]["leased"].startswith("10.3.0.") and "DHCPDISCOVER(lan)" in log.read_text()
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", hns], check=False)
        subprocess.run(["ip", "netns", "del", rns], check=False)
