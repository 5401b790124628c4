"""The platforms as they are: OpenWrt 23.05/24.10 and EL releases in the model, what is (not) shipped
for each, the same Child SA layout on 4.x and 5.x ends, and the router-side pieces for OpenWrt run
for real (BusyBox ash and bash, the real `ip` in a network namespace of their own)."""
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
from render.render import render_wan
from render.validate import load_sites

from support import REPO, enrol_programs

SHELLS = [["busybox", "sh"], ["bash"]]


def _sites(tmp_path: Path, edit=None) -> Path:
    d = tmp_path / "sites"
    shutil.copytree(REPO / "sites", d)
    if edit:
        edit(d)
    return d


def _set(d: Path, site: str, old: str, new: str) -> None:
    p = d / f"{site}.yaml"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def _problems(d: Path) -> str:
    with pytest.raises(WanError) as info:
        load_sites(d)
    return str(info.value)


def test_openwrt_release_defaults_to_24_10_and_el_to_9(tmp_path):
    wan = load_sites(_sites(tmp_path))
    assert wan.site("home").router.release == "24.10" and wan.site("home").router.firewall == "fw4"
    assert wan.site("acme").router.release == "9" and wan.site("acme").router.firewall == "firewalld"


def test_unquoted_24_10_and_uncovered_releases_are_refused_with_a_fix(tmp_path):
    d = _sites(tmp_path / "a",
               lambda d: _set(d, "home", "  libreswan: 4\n", "  libreswan: 4\n  platform_release: 24.10\n"))
    text = _problems(d)
    assert re.search(r"home\.yaml:7: router\.platform_release: 24\.1 should be .*in quotes .*'24\.10'", text), text
    d = _sites(tmp_path / "b", lambda d: (
        _set(d, "home", "  libreswan: 4\n", "  libreswan: 4\n  platform_release: '22.03'\n"),
        _set(d, "acme", "  libreswan: 4\n", "  libreswan: 4\n  platform_release: 7\n")))
    text = _problems(d)
    assert re.search(r"acme\.yaml:\d+: router\.platform_release: 7 is not an EL release .* use 8 or 9 or 10", text), text
    assert re.search(r"home\.yaml:\d+: router\.platform_release: '22\.03' is not an OpenWrt release "
                     r".* use '23\.05' or '24\.10'", text), text


def test_a_firewall_setting_on_openwrt_is_refused(tmp_path):
    d = _sites(tmp_path, lambda d: _set(d, "home", "  libreswan: 4\n", "  libreswan: 4\n  firewall: nftables\n"))
    assert re.search(r"home\.yaml:\d+: router\.firewall: OpenWrt routers always use fw4", _problems(d))


def test_no_router_gets_ipsec_conf_or_ipsec_secrets(tmp_path):
    """W2/W6: OpenWrt 24.10's and EL's own ipsec.conf include /etc/ipsec.d/*.conf; ours replaced them."""
    d = _sites(tmp_path,
               lambda d: _set(d, "home", "  libreswan: 4\n", "  libreswan: 4\n  platform_release: '23.05'\n"))
    trees = render_wan(load_sites(d))
    for router, tree in trees.items():
        assert not set(paths.PLATFORM_FILES) & set(tree), router
    # no program either (they come with the programs): the platform release is in router.env for reconcile
    assert not set(paths.PROGRAMS) & set(trees["home"]) and not set(paths.OPENWRT_HOOKS) & set(trees["home"])
    assert b"WAN_PLATFORM_RELEASE=23.05\n" in trees["home"][paths.ROUTER_ENV].content
    assert all(b"WAN_PLATFORM_RELEASE=23.05\n" not in t[paths.ROUTER_ENV].content for r, t in trees.items() if r != "home")


def test_el_firewall_paths(tmp_path):
    d = _sites(tmp_path, lambda d: _set(d, "acme", "  libreswan: 4\n", "  libreswan: 4\n  firewall: nftables\n"))
    trees = render_wan(load_sites(d))
    acme, el_fwd = trees["acme"], [r for r, t in trees.items() if paths.FIREWALL_UNIT_EL in t]
    assert paths.NFT_EL in acme and paths.FIREWALL_UNIT_EL not in acme and not any("firewalld" in p for p in acme)
    assert el_fwd, "some EL router keeps the default firewalld path"
    for r in el_fwd:
        nft = "\n".join(line for line in trees[r][paths.NFT_EL].content.decode().splitlines()
                        if not line.lstrip().startswith("#"))
        assert "policy drop" not in nft and "notrack" not in nft
        assert "snat ip to ip saddr" in nft
        assert all(paths.firewalld_zone(z) in trees[r] for z in paths.FIREWALLD_ZONES)


def test_rebind_protection_is_left_to_the_operator(tmp_path):
    """W9: only the WAN's domains are whitelisted; the global switch is not forced."""
    for tree in render_wan(load_sites(_sites(tmp_path))).values():
        for p in (paths.DNSMASQ_EL, paths.DNSMASQ_OPENWRT):
            if p in tree:
                text = tree[p].content.decode()
                assert "stop-dns-rebind\n" not in text.replace("# ", "") or "(stop-dns-rebind)" in text
                assert not re.search(r"^stop-dns-rebind", text, re.M)


def _two_lans(d: Path) -> None:
    """acme (EL) on Libreswan 5 with two LANs, berlin on 4 with two LANs: a mixed multi-LAN tunnel."""
    for site, v in (("acme", "5"), ("berlin", "4")):
        text = (d / f"{site}.yaml").read_text()
        text = re.sub(r"  libreswan: \d", f"  libreswan: {v}", text)
        m = re.search(r"lans:\n  - (\d+)\.(\d+)\.(\d+)\.0/24\n", text)
        a, b, c = m.groups()
        extra = f"  - {a}.{int(b) + 100}.{c}.0/24\n"
        text = text[:m.end()] + extra + text[m.end():]
        (d / f"{site}.yaml").write_text(text)


def test_both_ends_of_a_mixed_4_5_tunnel_propose_the_same_child_sas(tmp_path):
    """W7: leftsubnets={a b} on 5.x too (one Child SA per pair), so the conn names and selectors agree."""
    d = _sites(tmp_path, _two_lans)
    wan = load_sites(d)
    assert wan.site("acme").router.libreswan == 5 and wan.site("berlin").router.libreswan == 4
    trees = render_wan(wan)
    a = trees["acme"][paths.tunnel_conf("acme-berlin")].content.decode()
    b = trees["berlin"][paths.tunnel_conf("acme-berlin")].content.decode()
    assert "keyexchange=ikev2" in a and "ikev2=insist" in b
    pairs = {}
    for side, text in (("acme", a), ("berlin", b)):
        left = re.search(r"^\tleftsubnets=\{(.+)\}$", text, re.M).group(1).split()
        right = re.search(r"^\trightsubnets=\{(.+)\}$", text, re.M).group(1).split()
        pairs[side] = {(x, y) for x in left for y in right} if side == "acme" else {(y, x) for x in left for y in right}
    assert pairs["acme"] == pairs["berlin"] and len(pairs["acme"]) == 4
    from render.manifest import Manifest
    ma = Manifest.from_json(trees["acme"][paths.MANIFEST].content).tunnels["acme-berlin"].conns
    mb = Manifest.from_json(trees["berlin"][paths.MANIFEST].content).tunnels["acme-berlin"].conns
    assert len(ma) == len(mb) == 4 and all("/" in c for c in ma + mb)


# ---- router/openwrt-23.05-ipsec on the files the 23.05 package really ships ----------------------

STOCK = REPO / "lab/stock-openwrt-23.05"  # laid on the lab's 23.05 routers too (lab/platform.py)


def _stock_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f in ("ipsec.conf", "ipsec.secrets"):
        shutil.copy(STOCK / f, root / "etc" / f)
    return root


def _edit(shell, root, *args):
    return subprocess.run(shell + [str(REPO / "router/openwrt-23.05-ipsec"), *args],
                          env={"WAN_ROOT": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_openwrt_23_05_stock_files_are_edited_in_place_once(tmp_path, shell):
    root = _stock_root(tmp_path)
    assert _edit(shell, root, "--check").returncode == 1
    r = _edit(shell, root)
    assert r.returncode == 0, r.stderr
    conf, secrets = (root / "etc/ipsec.conf").read_text(), (root / "etc/ipsec.secrets").read_text()
    assert re.search(r"^include /etc/ipsec\.d/\*\.conf$", conf, re.M)
    assert not re.search(r"^conn ikev1", conf, re.M) and "right=%any" not in conf
    assert "config setup" in conf and "uniqueids=no" in conf  # the rest stays
    assert not re.search(r"^[^#]*SsEeCcRrEeTt", secrets, re.M)
    assert re.search(r"^include /etc/ipsec\.d/\*\.secrets$", secrets, re.M)
    assert (root / "etc/wan/platform-original/ipsec.conf").read_bytes() == (STOCK / "ipsec.conf").read_bytes()
    before = {f: (root / "etc" / f).read_bytes() for f in ("ipsec.conf", "ipsec.secrets")}
    assert _edit(shell, root, "--check").returncode == 0
    assert _edit(shell, root).stdout == ""
    assert before == {f: (root / "etc" / f).read_bytes() for f in ("ipsec.conf", "ipsec.secrets")}
    # the edited file is one Libreswan reads (4.10's parser here; the package has 4.12)
    r = subprocess.run(["ipsec", "addconn", "--config", str(root / "etc/ipsec.conf"), "--checkconfig"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_openwrt_23_05_a_conn_the_operator_changed_is_left_alone(tmp_path):
    root = _stock_root(tmp_path)
    conf = root / "etc/ipsec.conf"
    conf.write_text(conf.read_text().replace("dpddelay=15", "dpddelay=20"))
    r = _edit(["busybox", "sh"], root)
    assert r.returncode == 0 and "left conn ikev1 " in r.stdout
    text = conf.read_text()
    assert re.search(r"^conn ikev1$", text, re.M) and "dpddelay=20" in text  # changed: kept
    assert re.search(r"^conn ikev1-nat$", text, re.M) is None  # as shipped: removed
    assert not re.search(r"^[^#]*SsEeCcRrEeTt", (root / "etc/ipsec.secrets").read_text(), re.M)


# ---- router/openwrt-sourceip: the hook 24.10's updown stub calls -----------------------------------

NETNS_SETUP = """set -e
ip link set lo up
ip link add wan0 type veth peer name wan0p; ip link set wan0p up; ip link set wan0 up; ip addr add 192.0.2.1/24 dev wan0
ip link add lan0 type veth peer name lan0p; ip link set lan0p up; ip link set lan0 up; ip addr add 10.1.0.1/24 dev lan0
ip route add default via 192.0.2.254
"""


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_the_sourceip_hook_routes_the_routers_own_traffic_from_its_lan_address(tmp_path, shell):
    """route-client/up-client install the route upstream's _updown.xfrm would (src = leftsourceip),
    unroute-client removes it; a conn that is not the WAN's is left alone. A network namespace of
    its own with veth pairs: no tunnel is needed to see the route."""
    wan = tmp_path / "etc/wan"
    wan.mkdir(parents=True)
    (wan / "tunnels.list").write_text("acme-home 0123 1\n")
    hook = REPO / "router/openwrt-sourceip"
    env = (f"export WAN_ROOT={tmp_path} PLUTO_MY_SOURCEIP=10.1.0.1 PLUTO_PEER_CLIENT=10.2.0.0/24 PLUTO_INTERFACE=wan0 "
           "PLUTO_NEXT_HOP=192.0.2.254 PLUTO_PEER=198.51.100.7")
    sh = " ".join(shell)
    script = NETNS_SETUP + f"""{env}
PLUTO_CONNECTION=other PLUTO_VERB=route-client {sh} {hook}
echo "other: $(ip -4 -o route get 10.2.0.9)"
PLUTO_CONNECTION=acme-home/1x1 PLUTO_VERB=route-client {sh} {hook}
PLUTO_CONNECTION=acme-home/1x1 PLUTO_VERB=up-client {sh} {hook}
echo "ours: $(ip -4 -o route get 10.2.0.9)"
echo "count: $(ip -4 route show 10.2.0.0/24 | wc -l)"
PLUTO_CONNECTION=acme-home/1x1 PLUTO_VERB=unroute-client {sh} {hook}
echo "after: $(ip -4 -o route get 10.2.0.9)"
"""
    r = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert "src 192.0.2.1" in out["other"]
    assert "src 10.1.0.1" in out["ours"] and "via 192.0.2.254 dev wan0" in out["ours"]
    assert out["count"] == "1"
    assert "src 192.0.2.1" in out["after"]


# ---- router/openwrt-dns: the conf-dir file --------------------------------------------------------

FUNCTIONS_STANDIN = """# A stand-in for OpenWrt's /lib/functions.sh (it needs the uci binary, which is not on this
# machine): config_load reads $WAN_ROOT/dhcp.sections ("section [confdir]" per line).
config_load() { :; }
config_foreach() { while read -r s c; do eval "cd_$s='$c'"; "$1" "$s"; done < "$WAN_ROOT/dhcp.sections"; }
config_get() { eval "v=\\${cd_$2:-}"; [ -n "$v" ] || v=$4; eval "$1='$v'"; }
"""


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_the_dns_file_goes_into_the_first_instance_conf_dir_and_check_sees_it(tmp_path, shell):
    (tmp_path / "etc/wan").mkdir(parents=True)
    (tmp_path / "etc/wan/dnsmasq.conf").write_text("server=/paris.example/10.2.0.53@10.1.0.1\n")
    (tmp_path / "functions.sh").write_text(FUNCTIONS_STANDIN)
    (tmp_path / "dhcp.sections").write_text("cfg01411c\nguest /tmp/guest.d\n")
    env = {"WAN_ROOT": str(tmp_path), "WAN_FUNCTIONS": str(tmp_path / "functions.sh"), "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run(shell + [str(REPO / "router/openwrt-dns"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    placed = tmp_path / "tmp/dnsmasq.cfg01411c.d/wan.conf"
    assert run("--check").returncode == 1
    assert run().returncode == 0 and placed.read_text() == "server=/paris.example/10.2.0.53@10.1.0.1\n"
    assert not (tmp_path / "tmp/guest.d").exists()
    assert run("--check").returncode == 0
    placed.write_text("server=/oslo.example/10.9.0.53@10.1.0.1\n")  # stale: a removed site
    assert run("--check").returncode == 1
    assert run().returncode == 0 and "oslo" not in placed.read_text()


# ---- router/reconcile's platform steps ----------------------------------------------------------
# Run with a recording `ipsec` (pluto cannot hold tunnels on this kernel) and recording `systemctl`,
# `firewall-cmd`, `nft`, `fw4` and `/etc/init.d/*` stand-ins: none of these services runs here.
# `uci` is a stand-in too (OpenWrt's uci is not packaged for Debian): it keeps `set` values in a file
# (a batch's `delete KEY` drops the key)
# and, with STUB_UCI_DROP=WORD, ignores every batch line containing WORD while still exiting 0, as
# the real `uci batch` does for a failed line (openwrt/uci cli.c uci_batch).

STUB_UCI = r"""#!/bin/sh
echo "uci $*" >> "$STUB_LOG"
db=$STUB_ROOT/uci.db
case $1 in
  batch) while IFS= read -r l; do
           case $l in "delete "*) k=${l#delete }; awk -v k="$k" '$1 != k' "$db" > "$db.n" 2>/dev/null; mv -f "$db.n" "$db"
                                  continue ;;
                       "set "*) ;; *) continue ;; esac
           [ -n "${STUB_UCI_DROP:-}" ] && case $l in *"$STUB_UCI_DROP"*) continue ;; esac
           kv=${l#set }; echo "${kv%%=*} $(echo "${kv#*=}" | sed "s/^'//; s/'$//")" >> "$db"
         done; exit 0 ;;
  -q) [ "$2" = get ] || exit 0
      awk -v k="$3" '$1 == k { v = substr($0, length(k) + 2) } END { if (v == "") exit 1; print v }' "$db" 2>/dev/null
      exit ;;  # uci -q get exits 1 for an unset option
esac
exit 0
"""


def _rec_router(tmp_path: Path, shell: list[str], sites: Path, router: str, env: dict | None = None):
    out = tmp_path / "out"
    from render.render import write_trees
    write_trees(render_wan(load_sites(sites)), out)
    root, bin_, log = tmp_path / "root", tmp_path / "bin", tmp_path / "calls.log"
    enrol_programs(root)
    bin_.mkdir(exist_ok=True)
    for tool in ("ipsec", "systemctl", "firewall-cmd", "nft", "fw4"):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "$STUB_LOG"\n')
        (bin_ / tool).chmod(0o755)
    (bin_ / "uci").write_text(STUB_UCI)
    (bin_ / "uci").chmod(0o755)
    e = {"PATH": f"{bin_}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "STUB_LOG": str(log), "STUB_ROOT": str(root),
         **(env or {})}

    def run(*args: str) -> subprocess.CompletedProcess:
        log.write_text("")
        return subprocess.run(shell + [str(REPO / "router/reconcile"), "--root", str(root), *args, str(out / router)],
                              capture_output=True, text=True, env=e, timeout=60)
    return root, out / router, log, run


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_reconcile_never_removes_ipsec_conf_or_secrets_listed_by_an_older_tree(tmp_path, shell):
    """An older installed files.list names etc/ipsec.conf and etc/ipsec.secrets (trees rendered
    before the WAN stopped shipping them): the new tree drops them, and they stay on disk."""
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "acme", {"WAN_RELOAD_DNS": "true"})
    assert run().returncode == 0
    for f, text in (("etc/ipsec.conf", "config setup\ninclude /etc/ipsec.d/*.conf\n"),
                    ("etc/ipsec.secrets", "include /etc/ipsec.d/*.secrets\n")):
        (root / f).write_text(text)
        digest = subprocess.run(["sha256sum", str(root / f)], capture_output=True, text=True).stdout.split()[0]
        with open(root / "etc/wan/files.list", "a") as fl:
            fl.write(f"{digest} 0644 {f}\n")
    dry = run("--dry-run")
    assert "ipsec.conf" not in dry.stdout and "ipsec.secrets" not in dry.stdout, dry.stdout
    r = run()
    assert r.returncode == 0, r.stderr
    assert (root / "etc/ipsec.conf").read_text().startswith("config setup")
    assert (root / "etc/ipsec.secrets").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_reconcile_edits_openwrt_23_05_stock_files_before_adding_conns_and_only_when_due(tmp_path, shell):
    d = _sites(tmp_path, lambda d: _set(d, "home", "  libreswan: 4\n", "  libreswan: 4\n  platform_release: '23.05'\n"))
    root, tree, log, run = _rec_router(tmp_path, shell, d, "home",
                                       {"WAN_RELOAD_DNS": "echo reload-dns >> $STUB_LOG", "WAN_RELOAD_FIREWALL": "true"})
    for f in ("ipsec.conf", "ipsec.secrets"):
        shutil.copy(STOCK / f, root / "etc" / f)
    assert "would run: " + str(root / "etc/wan/openwrt-23.05-ipsec") in run("--dry-run").stdout
    r = run()
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    first_add = next(i for i, c in enumerate(calls) if c.startswith("ipsec auto --add"))
    assert calls.index("ipsec auto --rereadsecrets") < first_add
    assert "ipsec whack --delete --name ikev1" in calls[:first_add]
    assert re.search(r"^include /etc/ipsec.d/\*\.conf", (root / "etc/ipsec.conf").read_text(), re.M)
    assert not re.search(r"^[^#]*SsEeCcRrEeTt", (root / "etc/ipsec.secrets").read_text(), re.M)
    assert (root / "etc/wan/platform-original/ipsec.conf").read_bytes() == (STOCK / "ipsec.conf").read_bytes()
    r = run()
    assert r.returncode == 0 and "nothing to do" in r.stderr and log.read_text() == ""
    # opkg or a person puts the stock file back: the next run edits it again
    shutil.copy(STOCK / "ipsec.secrets", root / "etc/ipsec.secrets")
    r = run()
    assert r.returncode == 0, r.stderr
    assert "ipsec auto --rereadsecrets" in log.read_text().splitlines()
    assert not re.search(r"^[^#]*SsEeCcRrEeTt", (root / "etc/ipsec.secrets").read_text(), re.M)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_reconcile_openwrt_dns_goes_through_openwrt_dns_and_a_failed_uci_line_fails_the_step(tmp_path, shell):
    functions = tmp_path / "functions.sh"  # /lib/functions.sh's config_* for one dnsmasq section
    functions.write_text("config_load() { :; }\nconfig_foreach() { \"$1\" cfg01411c; }\n"
                         "config_get() { eval \"$1=\\$4\"; }\n")
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "home", {"WAN_FUNCTIONS": str(functions)})
    (root / "etc/init.d/dnsmasq").write_text('#!/bin/sh\necho "dnsmasq $*" >> "$STUB_LOG"\n')
    (root / "etc/init.d/dnsmasq").chmod(0o755)
    r = subprocess.run(shell + [str(REPO / "router/reconcile"), "--dry-run", "--root", str(root), str(tree)],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    # home is a router-DNS site: localservice goes off (etc/wan/dhcp.uci) before dnsmasq reloads
    assert (f"would run: uci batch < /etc/wan/dhcp.uci (each line read back)\nwould run: {root}/etc/wan/openwrt-dns\n"
            f"would run: {root}/etc/init.d/dnsmasq reload\n") in r.stdout, r.stdout
    assert "uci batch < /etc/wan/firewall.uci" in r.stdout
    assert f"would run: {root}/etc/init.d/wan enable" in r.stdout  # the boot script, not enabled yet
    # /etc/init.d/wan enable needs /etc/rc.common (absent here): enabled already, as its link says
    (root / "etc/rc.d").mkdir()
    (root / "etc/rc.d/S18wan").symlink_to("../init.d/wan")
    # a uci batch that drops the srcnat include but exits 0: reconcile fails at reload-firewall, journal kept
    e = {"STUB_UCI_DROP": "srcnat"}
    r = subprocess.run(shell + [str(REPO / "router/reconcile"), "--root", str(root), str(tree)], capture_output=True, text=True,
                       env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "STUB_LOG": str(log),
                            "STUB_ROOT": str(root), "WAN_FUNCTIONS": str(functions), **e}, timeout=60)
    assert r.returncode == 1 and "FAILED at step reload-firewall" in r.stderr and "wan_srcnat" in r.stderr, r.stderr
    assert (root / "etc/wan/reconcile.journal").exists()
    assert (root / "tmp/dnsmasq.cfg01411c.d/wan.conf").read_bytes() == (tree / paths.DNSMASQ_OPENWRT).read_bytes()
    r = run()  # the journal's DNS and firewall work is redone, with a uci that sets every line
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert "dnsmasq reload" in calls and "fw4 reload" in calls and not any("enable" in c for c in calls)
    assert calls.index("uci commit dhcp") < calls.index("dnsmasq reload")
    assert "uci -q get dhcp.@dnsmasq[0].localservice" in calls  # read back
    assert not (root / "etc/wan/reconcile.journal").exists()


@pytest.mark.parametrize("before", ["1", None], ids=["stock localservice 1", "unset"])
@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_the_routers_own_dhcp_settings_come_back_when_its_site_stops_being_router_dns(tmp_path, shell, before):
    """home (OpenWrt) becomes its LAN's DNS server: reconcile keeps the router's own localservice
    (OpenWrt's stock 1, or unset) before etc/wan/dhcp.uci turns it off; a later release in which home's
    DNS server is a LAN host again (no dhcp.uci) puts the router's value back (or deletes the key),
    and a run killed just before that is finished by the next run (the kept values stay until then)."""
    functions = tmp_path / "functions.sh"
    functions.write_text("config_load() { :; }\nconfig_foreach() { \"$1\" cfg01411c; }\n"
                         "config_get() { eval \"$1=\\$4\"; }\n")
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "home", {"WAN_FUNCTIONS": str(functions)})
    (root / "etc/init.d/dnsmasq").write_text('#!/bin/sh\necho "dnsmasq $*" >> "$STUB_LOG"\n')
    (root / "etc/init.d/dnsmasq").chmod(0o755)
    (root / "etc/rc.d").mkdir()
    (root / "etc/rc.d/S18wan").symlink_to("../init.d/wan")
    key = "dhcp.@dnsmasq[0].localservice"
    if before:
        (root / "uci.db").write_text(f"{key} {before}\n")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "STUB_LOG": str(log),
           "STUB_ROOT": str(root), "WAN_FUNCTIONS": str(functions)}

    def uci_get() -> str | None:
        r = subprocess.run(["sh", str(tmp_path / "bin/uci"), "-q", "get", key], capture_output=True, text=True, env=env)
        return r.stdout.strip() if r.returncode == 0 else None

    r = run()
    assert r.returncode == 0, r.stderr
    assert uci_get() == "0"
    kept = root / "etc/wan/dhcp-before.list"
    assert kept.read_text() == f"{key} {before or '-'}\n" and kept.stat().st_mode & 0o777 == 0o600
    # home's DNS server becomes a LAN host again
    d2 = _sites(tmp_path / "v2", lambda d: _set(d, "home", "  server: 192.168.2.82", "  server: 192.168.2.53"))
    from render.render import write_trees
    write_trees(render_wan(load_sites(d2)), tmp_path / "out2")
    tree2 = tmp_path / "out2/home"
    assert not (tree2 / "etc/wan/dhcp.uci").exists()
    dry = subprocess.run(shell + [str(REPO / "router/reconcile"), "--dry-run", "--root", str(root), str(tree2)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert "would run: uci batch (the router's own dhcp settings back" in dry.stdout, dry.stdout
    assert uci_get() == "0" and kept.exists()
    # killed at the reload: the next run finishes it
    (root / "etc/wan/test-hooks").touch()
    killed = subprocess.run(shell + [str(REPO / "router/reconcile"), "--root", str(root), str(tree2)],
                            capture_output=True, text=True, env={**env, "WAN_TEST_STOP_AT": "reconcile:reload-dns"}, timeout=60)
    assert killed.returncode != 0 and kept.exists() and uci_get() == "0", killed.stderr
    r = subprocess.run(shell + [str(REPO / "router/reconcile"), "--root", str(root), str(tree2)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "putting back the router's own dhcp settings" in r.stderr
    assert uci_get() == before and not kept.exists()
    assert "dnsmasq reload" in log.read_text().splitlines()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_reconcile_el_nftables_path_adds_the_include_once_and_firewalld_path_reloads(tmp_path, shell):
    d = _sites(tmp_path, lambda d: _set(d, "acme", "  libreswan: 4\n", "  libreswan: 4\n  firewall: nftables\n"))
    root, tree, log, run = _rec_router(tmp_path, shell, d, "acme")
    (root / "etc/sysconfig").mkdir(parents=True)
    (root / "etc/sysconfig/nftables.conf").write_text('include "/etc/nftables/main.nft"\n')
    r = run()
    assert r.returncode == 0, r.stderr
    assert f"nft -f {root}/etc/nftables/wan.nft" in log.read_text().splitlines()
    conf = (root / "etc/sysconfig/nftables.conf").read_text()
    assert conf == 'include "/etc/nftables/main.nft"\ninclude "/etc/nftables/wan.nft"\n'
    (root / "etc/nftables/wan.nft").write_text("# changed by hand\n")
    r = run()
    assert r.returncode == 0, r.stderr
    assert (root / "etc/sysconfig/nftables.conf").read_text() == conf  # added once
    # the firewalld path (the default)
    tmp2 = tmp_path / "fwd"
    tmp2.mkdir()
    root, tree, log, run = _rec_router(tmp2, shell, _sites(tmp2), "acme")
    r = run()
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls[-4:] == ["firewall-cmd --reload", "systemctl daemon-reload", "systemctl enable wan-firewall",
                          "systemctl restart wan-firewall"]
    assert not (root / "etc/sysconfig/nftables.conf").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
@pytest.mark.parametrize("firewalld", ["stopped", "not installed"])
def test_a_firewalld_that_does_not_run_is_not_reloaded_and_fails_nothing(tmp_path, shell, firewalld):
    """An EL router on the firewalld path (the default) whose firewalld is stopped (`firewall-cmd --state`
    exits 252: firewall-cmd(1) EXIT CODES) or not installed: reconcile installs the zones and policies
    (firewalld reads them when it starts), loads the WAN's table, says what is wrong and how to fix it,
    and succeeds; it does not run `firewall-cmd --reload`. With firewalld running it reloads it."""
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "acme")
    fwcmd = tmp_path / "bin/firewall-cmd"
    if firewalld == "stopped":
        fwcmd.write_text('#!/bin/sh\necho "firewall-cmd $*" >> "$STUB_LOG"\n'
                         '[ "$1" = --state ] && { echo "not running" >&2; exit 252; }\nexit 0\n')
    else:
        fwcmd.unlink()
    r = run()
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert "firewall-cmd --reload" not in calls
    assert calls[-3:] == ["systemctl daemon-reload", "systemctl enable wan-firewall", "systemctl restart wan-firewall"]
    assert "firewalld is not running here" in r.stderr and "router.firewall: nftables" in r.stderr
    assert (root / "etc/firewalld/policies/wan-into-tunnels.xml").exists()
    # firewalld comes back: the next change reloads it
    fwcmd.write_text('#!/bin/sh\necho "firewall-cmd $*" >> "$STUB_LOG"\n')
    fwcmd.chmod(0o755)
    (root / "etc/firewalld/zones/wan-tunnels.xml").write_text("<zone/>\n")  # a hand edit: repaired on --repair
    r = run("--repair")
    assert r.returncode == 0, r.stderr
    assert "firewall-cmd --state" in log.read_text().splitlines() and "firewall-cmd --reload" in log.read_text().splitlines()


OPERATOR_ZONE = """<?xml version="1.0" encoding="utf-8"?>
<zone target="ACCEPT">
  <short>Trusted</short>
  <source address="{}"/>
  <source ipset="mgmt"/>
</zone>
"""


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_an_operator_zone_holding_a_source_of_the_wans_zones_is_refused_before_anything_changes(tmp_path, shell):
    """firewalld allows a source address in one zone only and refuses its whole configuration otherwise
    (real firewalld below): an operator's permanent zone that already binds a remote LAN (or a peer's
    address) makes reconcile refuse (exit 2) before it installs anything, naming the zone, the address
    and the fix. A zone with other sources is left alone."""
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "acme")
    zones = root / "etc/firewalld/zones"
    zones.mkdir(parents=True)
    remote = re.search(r'<source address="([^"]+)"/>', (tree / "etc/firewalld/zones/wan-tunnels.xml").read_text()).group(1)
    (zones / "trusted.xml").write_text(OPERATOR_ZONE.format(remote))
    r = run()
    assert r.returncode == 2, r.stderr
    assert f"firewalld zone trusted (/etc/firewalld/zones/trusted.xml) binds {remote} which the WAN's zones need" in r.stderr
    assert "firewall-cmd --permanent --zone=trusted --remove-source=ADDRESS" in r.stderr
    assert sorted(p.name for p in zones.iterdir()) == ["trusted.xml"] and not (root / "etc/ipsec.d").exists()
    assert log.read_text().splitlines() == ["ipsec whack --status"]  # a question (nothing installed yet), no change
    (zones / "trusted.xml").write_text(OPERATOR_ZONE.format("10.99.0.0/24"))
    r = run()
    assert r.returncode == 0, r.stderr
    assert (zones / "wan-tunnels.xml").exists() and "10.99.0.0/24" in (zones / "trusted.xml").read_text()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_a_firewalld_without_policy_objects_is_refused_before_anything_changes(tmp_path, shell):
    """firewalld before 0.9 (EL 8.0-8.3: 0.8) has no policy objects and ignores /etc/firewalld/policies:
    reconcile refuses (exit 2) naming the version and the fix; 0.9 and later are accepted."""
    root, tree, log, run = _rec_router(tmp_path, shell, _sites(tmp_path), "acme")
    fwcmd = tmp_path / "bin/firewall-cmd"
    for version, rc in (("0.8.2", 2), ("0.9.3", 0)):
        fwcmd.write_text(f'#!/bin/sh\necho "firewall-cmd $*" >> "$STUB_LOG"\n[ "$1" = --version ] && echo {version}\nexit 0\n')
        r = run()
        assert r.returncode == rc, r.stderr
        if rc:
            assert f"firewalld {version} here has no policy objects" in r.stderr and "router.firewall: nftables" in r.stderr
            assert not (root / "etc/firewalld").exists()


def _fw_root(which: str) -> Path | None:
    """A built lab root with firewalld: Debian 12's (1.3.3, lab/firewalld.py) or Debian 13's (2.x, the
    Libreswan 5 root)."""
    from lab import firewalld, libreswan5, roots
    root = (firewalld if which == "debian12" else libreswan5).built() if os.geteuid() == 0 else None
    return root if root and roots.meta(root).get("firewalld") else None


@pytest.mark.parametrize("which", ["debian12", "debian13"])
def test_real_firewalld_refuses_a_source_in_two_zones_and_a_policy_without_its_zone(tmp_path, which):
    """What reconcile guards against, on real firewalld 1.3.3 and 2.x (the lab's Debian 12 and 13 roots,
    chrooted with /etc/firewalld bound to a directory of this test's in a mount namespace of its own: the
    cached root is not changed): `firewall-offline-cmd --check-config` (the check firewalld makes at
    every start and reload, core/fw.py full_check_config) passes on acme's rendered zones and policies,
    and fails with an operator zone holding a remote LAN, and with a policy whose zone is missing."""
    fw_root = _fw_root(which)
    if fw_root is None:
        pytest.skip(f"needs root and the lab's {which} root with firewalld (lab/roots.py; the QEMU labs build it)")
    trees = render_wan(load_sites(REPO / "sites"))
    etc = tmp_path / "firewalld"
    (etc / "zones").mkdir(parents=True)
    (etc / "policies").mkdir()
    shutil.copy(fw_root / "etc/firewalld/firewalld.conf", etc)
    for path, f in trees["acme"].items():
        if path.startswith("etc/firewalld/"):
            (tmp_path / path.removeprefix("etc/")).write_bytes(f.content)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind "{etc}" "{fw_root}/etc/firewalld" && '
                               f'exec chroot "{fw_root}" firewall-offline-cmd --check-config'],
                              capture_output=True, text=True, timeout=120)
    ok = check()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    remote = re.search(r'<source address="([^"]+)"/>', (etc / "zones/wan-tunnels.xml").read_text()).group(1)
    (etc / "zones/trusted.xml").write_text(OPERATOR_ZONE.replace('  <source ipset="mgmt"/>\n', "").format(remote))
    two = check()
    assert two.returncode != 0 and f"source '{remote}' already bound to zone" in two.stdout + two.stderr, two
    (etc / "zones/trusted.xml").unlink()
    (etc / "zones/wan-tunnels.xml").unlink()
    gone = check()
    assert gone.returncode != 0 and "'wan-tunnels' not among existing zones" in gone.stdout + gone.stderr, gone


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/libexec/ipsec/pluto").exists(), reason="needs root and pluto")
def test_real_pluto_holds_23_05s_stock_ikev1_responder_until_the_edit_and_not_after(tmp_path):
    """What the lab's platform_files check looks for (lab/proofs.py), on a real pluto 4.10 (built with
    IKEv1, as OpenWrt's 4.12, given OpenWrt's ikev1-policy default: lab/platform.py openwrt_pluto_defaults)
    started from the 23.05 package's files: as shipped it holds `ikev1` and
    `ikev1-nat` (an IKEv1 responder for any peer with the catch-all PSK); after router/openwrt-23.05-ipsec,
    neither. (This kernel has no ESP: nothing is negotiated; pluto only loads the files.)"""
    import uuid

    from lab.platform import openwrt_pluto_defaults
    from lab.proofs import stock_conns_loaded
    root = _stock_root(tmp_path)
    # OpenWrt's pluto accepts IKEv1 conns (upstream default), Debian's is patched to refuse them: as the lab does
    conf = root / "etc/ipsec.conf"
    conf.write_text(openwrt_pluto_defaults(conf.read_text()))
    ns = f"wan23{uuid.uuid4().hex[:6]}"
    run = tmp_path / "run"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "wan", "type", "veth", "peer", "name", "wanp"], check=True)
        for cmd in (["link", "set", "lo", "up"], ["link", "set", "wan", "up"], ["addr", "add", "192.0.2.10/24", "dev", "wan"],
                    ["route", "add", "default", "via", "192.0.2.1"]):  # left=%defaultroute needs one
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        (tmp_path / "nss").mkdir()
        subprocess.run(["certutil", "-N", "-d", f"sql:{tmp_path}/nss", "--empty-password"], check=True)
        seen = []
        for edited in (False, True):
            if edited:
                assert _edit(["busybox", "sh"], root).returncode == 0
                # the include now enabled, pointed at a conn of this test's (the host's /etc/ipsec.d is not ours)
                assert "\ninclude /etc/ipsec.d/*.conf\n" in conf.read_text()
                conf.write_text(conf.read_text().replace("include /etc/ipsec.d/*.conf", f"include {tmp_path}/ipsec.d/*.conf"))
                (tmp_path / "ipsec.d").mkdir()
                (tmp_path / "ipsec.d/wan-marker.conf").write_text(
                    "conn wan-marker\n\tleft=192.0.2.10\n\tright=192.0.2.20\n\tauthby=secret\n\tauto=add\n")
            run.mkdir()
            subprocess.run(["ip", "netns", "exec", ns, "/usr/libexec/ipsec/pluto", "--config", str(root / "etc/ipsec.conf"),
                            "--rundir", str(run), "--nssdir", f"{tmp_path}/nss", "--secretsfile",
                            str(root / "etc/ipsec.secrets"), "--logfile", str(tmp_path / "pluto.log")], check=True)
            try:
                whack = ["ipsec", "whack", "--ctlsocket", str(run / "pluto.ctl")]
                end = time.monotonic() + 30
                while True:  # pluto's own addconn --autoall runs after it starts listening
                    status = subprocess.run([*whack, "--status"], capture_output=True, text=True).stdout
                    # conns load in file order: the stock ones come before the include
                    if stock_conns_loaded(status) or '"wan-marker":' in status:
                        break
                    assert time.monotonic() < end, (tmp_path / "pluto.log").read_text()[-2000:]
                    time.sleep(0.2)
                seen.append((stock_conns_loaded(status), '"wan-marker":' in status))
            finally:
                pid = int((run / "pluto.pid").read_text())
                os.kill(pid, 15)
                end = time.monotonic() + 20
                while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
                    time.sleep(0.05)
                shutil.rmtree(run)
        assert seen == [(["ikev1", "ikev1-nat"], False), ([], True)], seen
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def _readwriteconf(conf: Path) -> dict[str, dict[str, list[str]]]:
    """Libreswan's own reading of an ipsec.conf and its includes (`ipsec readwriteconf`: the parser
    pluto's addconn uses, %default merged in): conn -> keyword -> values as it prints them."""
    r = subprocess.run(["ipsec", "readwriteconf", "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    conns: dict[str, dict[str, list[str]]] = {}
    cur = None
    for line in r.stdout.splitlines():
        if line.startswith("conn "):
            cur = conns.setdefault(line.split()[1], {})
        elif cur is not None and line.startswith("\t") and "=" in line:
            k, _, v = line.strip().partition("=")
            cur.setdefault(k, []).append(v)
    return conns


def test_on_rhels_stock_ipsec_conf_the_crypto_policy_default_does_not_reach_the_wans_conns(tmp_path):
    """Item 4, EL's stock ipsec.conf: RHEL's file (lab/stock-el, the lab's EL routers start from it)
    includes the system-wide crypto policy's `conn %default` (ike, esp and authby lists) before
    /etc/ipsec.d/*.conf. Read by Debian's real Libreswan parser: every conn rendered for an EL router
    of the example keeps its own authby, ike and esp, while a conn that sets none (the marker) gets the
    policy's: the include is live and overridden where it must be."""
    from lab.platform import STOCK_EL
    trees = render_wan(load_sites(REPO / "sites"))
    el = [r for r, t in trees.items() if paths.ROUTER_ENV in t and b"WAN_PLATFORM=el" in t[paths.ROUTER_ENV].content]
    assert el, "the example has no EL router"
    (tmp_path / "ipsec.d").mkdir()
    policy = (STOCK_EL / "libreswan.config").read_text()
    stock = (STOCK_EL / "ipsec.conf").read_text()
    assert "\ninclude /etc/crypto-policies/back-ends/libreswan.config\n" in stock
    assert stock.endswith("include /etc/ipsec.d/*.conf\n")
    (tmp_path / "libreswan.config").write_text(policy)
    (tmp_path / "ipsec.conf").write_text(stock.replace("/etc/crypto-policies/back-ends/", f"{tmp_path}/")
                                         .replace("/etc/ipsec.d/", f"{tmp_path}/ipsec.d/"))
    (tmp_path / "ipsec.d/marker.conf").write_text("conn marker\n\tleft=192.0.2.1\n\tright=192.0.2.2\n\tauto=add\n")
    want = {}
    for r in el:
        for path, f in trees[r].items():
            if path.startswith("etc/ipsec.d/") and path.endswith(".conf"):
                text = f.content.decode()
                (tmp_path / "ipsec.d" / Path(path).name).write_text(text)
                want[Path(path).stem] = {k: re.search(rf"^\t{k}=(.*)$", text, re.M).group(1) for k in ("authby", "ike", "esp")}
    conns = _readwriteconf(tmp_path / "ipsec.conf")
    pol = {k: re.search(rf"^\t{k}=(.*)$", policy, re.M).group(1) for k in ("authby", "ike", "esp")}
    assert conns["marker"]["ike"][0] == pol["ike"] and conns["marker"]["esp"][0] == pol["esp"], conns["marker"]
    assert pol["authby"] in conns["marker"]["authby"]
    assert len(want) >= 5, want
    for name, kv in want.items():
        got = conns[name]
        for k, v in kv.items():
            assert v in got[k] and not any(p == pol[k] for p in got[k]), f"{name}: {k} {got[k]} (want {v})"
