"""The Libreswan 5 root of the lab (lab/libreswan5.py) and what the host side makes of it, without
a lab kernel: the recipe and its cache key, debootstrap's failure reported clearly with nothing
left behind (real debootstrap against a mirror that is not there), the per-router Libreswan in the
plan and the verdict (with the root, and the 4.x fallback said clearly), and the parsers of 5.2's
output against output recorded from a real 5.2 pluto in the mixed lab (tests/data/pluto-5.2/)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import console, libreswan5
from lab.contracts import LabPlan, LabResult
from lab.run import LabRequest, _prepare

from support import REPO

MIXED = REPO / "tests/lab/wans/mixed"


def test_the_recipe_is_debian_13_with_libreswan_and_its_hash_keys_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path))
    r = libreswan5.RECIPE
    assert r["suite"] == "trixie" and "libreswan" in r["packages"] and "libnss3-tools" in r["packages"]
    # libreswan depends on the virtual package `host`: debootstrap needs a real one named
    assert "bind9-host" in r["packages"]
    before = libreswan5.root_dir()
    assert before.parent == tmp_path and before.name == f"root-trixie-{libreswan5.recipe_hash()}"
    monkeypatch.setitem(libreswan5.RECIPE, "packages", [*r["packages"], "tcpdump"])
    assert libreswan5.root_dir() != before  # another recipe, another root
    assert libreswan5.built() is None


def test_a_run_without_a_5x_router_builds_nothing_and_the_switch_turns_the_root_off(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path))
    assert libreswan5.choose({"a": 4, "b": 4}) == (None, None)
    monkeypatch.setenv("WAN_LAB_LIBRESWAN5", "0")
    assert libreswan5.choose({"a": 5, "b": 4}) == (None, "WAN_LAB_LIBRESWAN5=0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("debootstrap"), reason="needs root and debootstrap")
def test_debootstrap_failing_is_reported_with_its_mirror_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("WAN_LAB_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    lines: list[str] = []
    with pytest.raises(RuntimeError) as e:
        libreswan5.ensure_root(lines.append)
    assert "debootstrap trixie" in str(e.value) and "http://127.0.0.1:9/debian" in str(e.value)
    assert lines and lines[0].startswith("lab: building the Libreswan 5 root (trixie) with debootstrap")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    # the lab goes on with the lab kernel's Libreswan and says why
    root, why = libreswan5.choose({"acme": 5}, lines.append)
    assert root is None and why.startswith("building the Libreswan 5 root failed: debootstrap trixie")


def _fake_root(cache: Path) -> Path:
    """A directory shaped like a built root (its metadata and /etc): enough for the host side,
    which only names it in the plan (a stand-in: nothing boots here)."""
    os.environ["WAN_LAB_CACHE"] = str(cache)
    root = libreswan5.root_dir()
    (root / "etc").mkdir(parents=True)
    (root / libreswan5.META).write_text(json.dumps({"libreswan": "5.2", "recipe": libreswan5.RECIPE}))
    return root


def test_the_plan_names_the_root_and_the_libreswan_of_each_router(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path / "cache"))
    root = _fake_root(tmp_path / "cache")
    p = _prepare(LabRequest(sites=MIXED, kernel="uml", results=tmp_path / "r"), "uml", 4, lambda line: None)
    plan = LabPlan.read(tmp_path / "r/plan.json")
    acme, berlin = plan.wan.site("acme"), plan.wan.site("berlin")
    assert (acme.libreswan, acme.target_libreswan, acme.root) == (5, 5, str(root))
    assert (berlin.libreswan, berlin.root) == (4, "")
    assert plan.libreswan["acme"] == {"target": 5, "ran": "5.2", "root": str(root), "why": ""}
    assert plan.libreswan["home"]["ran"].startswith("4.") and plan.libreswan["home"]["root"] == ""
    assert p.other_major == {}
    # acme gets the 5.x rendering: its router.env and 5.x commands
    env = next((tmp_path / "r/out/acme").rglob("router.env")).read_text()
    assert "WAN_LIBRESWAN=5" in env
    result = LabResult(libreswan=plan.libreswan)
    lines = console.libreswan_lines(result)
    assert lines[0].startswith("libreswan: acme 5.2 (own root), berlin 4.") and not any("NOT PROVEN" in x for x in lines)


def test_without_a_root_a_5x_router_runs_4x_and_the_verdict_says_it_was_not_proven_on_5x(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path / "cache"))
    _fake_root(tmp_path / "cache")
    monkeypatch.setenv("WAN_LAB_LIBRESWAN5", "0")  # the root is there, but switched off
    p = _prepare(LabRequest(sites=MIXED, kernel="uml", results=tmp_path / "r"), "uml", 4, lambda line: None)
    acme = p.plan.wan.site("acme")
    assert (acme.libreswan, acme.target_libreswan, acme.root) == (4, 5, "")
    assert p.plan.libreswan["acme"]["why"] == "WAN_LAB_LIBRESWAN5=0" and p.plan.libreswan["acme"]["ran"].startswith("4.")
    assert "WAN_LIBRESWAN=4" in next((tmp_path / "r/out/acme").rglob("router.env")).read_text()
    assert any("NOT proven on 5.x (WAN_LAB_LIBRESWAN5=0)" in n for n in p.notes)
    text = console.verdict(LabResult(libreswan=p.plan.libreswan), ["acme", "berlin", "home"], tmp_path)
    assert ("NOT PROVEN on Libreswan 5.x: acme targets 5 but ran Libreswan 4." in text
            and "with a 4.x rendering (WAN_LAB_LIBRESWAN5=0)" in text)


# ---- the parsers, against output recorded from a real 5.2 pluto -----------------------------------
# tests/data/pluto-5.2/: acme (Libreswan 5.2 in the Debian 13 root) and berlin (4.10) of the mixed
# lab (tests/lab/wans/mixed) on User-Mode Linux, WAN_LAB_DIAGNOSTICS=all (keys scrubbed).
RECORDED = REPO / "tests/data/pluto-5.2"
ACME_CONNS = {"acme-berlin/1x1", "acme-berlin/1x2", "acme-berlin/2x1", "acme-berlin/2x2", "acme-home/1x0", "acme-home/2x0"}


def _rec(name: str) -> str:
    return (RECORDED / name).read_text()


def test_trafficstatus_and_status_of_5_2_are_read():
    from lab.routers import parse_spis, parse_traffic
    traffic = parse_traffic(_rec("acme-trafficstatus.txt"))
    assert set(traffic) == ACME_CONNS
    assert all(v["in"] > 0 and v["out"] > 0 for v in traffic.values())  # the pings went through every Child SA
    spis = parse_spis(_rec("acme-status.txt"))
    assert set(spis) == ACME_CONNS and all(len(v) == 2 for v in spis.values())  # one ESP SA each way
    # 5.2 prints an SPI without its leading zeros (esp.f738a4e where ip xfrm says 0x0f738a4e): compare numbers
    kernel = {int(x, 16) for x in re.findall(r"spi 0x([0-9a-f]+)", _rec("acme-xfrm-state.txt"))}
    assert {int(x, 16) for x in set().union(*spis.values())} <= kernel


def test_pluto_5_2_log_lines_are_read():
    from lab.routers import ESTABLISHED_RE, loaded_conns
    log = _rec("acme-pluto.log")
    assert loaded_conns(log) == ACME_CONNS
    # 5.2 logs every added conn twice (pluto's line and addconn's echo): names are counted, not lines
    assert len(re.findall(r"added IKEv2 connection", log)) == 2 * len(ACME_CONNS)
    assert set(ESTABLISHED_RE.findall(log)) == ACME_CONNS


def _xfrm(router: str) -> tuple[list[dict], list[dict]]:
    from lab.childsas import parse_xfrm
    return parse_xfrm(_rec(f"{router}-xfrm-policy.txt"), _rec(f"{router}-xfrm-state.txt"))


def test_both_ends_of_the_mixed_tunnel_hold_one_child_sa_per_lan_pair():
    from lab.childsas import children, compare
    from lab.contracts import LabPlan
    plan = LabPlan.read(RECORDED / "plan.json")
    acme, berlin = plan.wan.site("acme"), plan.wan.site("berlin")
    mine, theirs = children(*_xfrm("acme"), berlin.public), children(*_xfrm("berlin"), acme.public)
    assert len(mine) == len(theirs) == 4 and all(len(c["pairs"]) == 1 for c in mine.values())
    expected = {(a.subnet, b.subnet) for a in acme.lans for b in berlin.lans}
    assert compare(acme, berlin, mine, theirs, expected) == (True, "")
    # the layout W7 warns of: acme's four pairs under one reqid (5.x `leftsubnet=a,b`: one Child SA)
    pols, sts = _xfrm("acme")
    first = next(iter(mine))
    one = [{**p, "reqid": first} if p["tmpl_dst"] == berlin.public else p for p in pols]
    ok, why = compare(acme, berlin, children(one, sts, berlin.public), theirs, expected)
    assert not ok and why.startswith("the two ends hold different Child SAs")
    # one end lost a Child SA: its LAN pair is missing on that end
    drop = sorted(mine)[0]
    ok, why = compare(acme, berlin, {k: v for k, v in mine.items() if k != drop}, theirs, expected)
    assert not ok and "different Child SAs" in why
    # both ends lost it: the pair is named
    gone = mine[drop]["pairs"][0]
    back = {k: v for k, v in theirs.items() if v["pairs"] != [[gone[1], gone[0]]]}
    ok, why = compare(acme, berlin, {k: v for k, v in mine.items() if k != drop}, back, expected)
    assert not ok and why == f"no Child SA for the LAN pairs [{gone}]"


def test_a_keyword_pluto_dropped_is_found_in_its_log_and_fails_that_routers_check():
    from lab.plutoconf import ignored
    lines = ignored(_rec("acme-pluto.log"))
    # recorded: 5.2 took `esp=aes_gcm256` (line 19) for `encapsulation` and proposed its default ESP list
    # (a UML artefact: the addconn pluto runs had no GLIBC_TUNABLES, lab/plutoconf.py)
    assert lines == ["addconn: ipsec %s: /etc/ipsec.d/acme-berlin.conf:19: warning: invalid, keyword ignored: "
                     "encapsulation=aes_gcm256"]
    assert "2:ESP=AES_GCM_16_128" in _rec("acme-pluto.log")
    assert ignored("Nov 28 03:14:51.877433: \"a/1x1\":   1:ESP=AES_GCM_16_256-NONE-NONE-ESN:YES+NO\n") == []
    assert ignored("Nov 28 03:14:51.1: Warning: ignored obsolete keyword 'dpdaction'\n") == [
        "Warning: ignored obsolete keyword 'dpdaction'"]
    from types import SimpleNamespace

    from lab.plutoconf import checks

    def router(log: str, major: int) -> SimpleNamespace:
        return SimpleNamespace(site=SimpleNamespace(libreswan=major), logs=lambda: {"pluto.log": log})
    lab = SimpleNamespace(view=SimpleNamespace(names=["acme", "berlin"]),
                          routers={"acme": router(_rec("acme-pluto.log"), 5), "berlin": router("", 4)})
    got = {c.src: c for c in checks(lab)}
    assert [(c.kind, c.dst, c.ok) for c in got.values()] == [("pluto_config", "acme", False),
                                                            ("pluto_config", "berlin", True)]
    assert got["acme"].evidence == {"libreswan": 5, "ignored": lines}
    assert got["berlin"].evidence == {"libreswan": 4, "ignored": []}


def test_a_5x_router_sees_its_roots_etc_not_the_lab_kernels(monkeypatch, tmp_path):
    from lab.routers import NetnsRouter
    monkeypatch.setenv("WAN_LAB_CACHE", str(tmp_path / "cache"))
    root = _fake_root(tmp_path / "cache")
    (root / "etc/ipsec.conf").write_text("config setup\ninclude /etc/ipsec.d/*.conf\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    p = _prepare(LabRequest(sites=MIXED, kernel="uml", results=tmp_path / "r"), "uml", 4, lambda line: None)
    template = tmp_path / "nss"
    template.mkdir()
    etc = {}
    for name in ("acme", "berlin"):
        r = NetnsRouter(p.plan.wan.site(name), None, tmp_path / "state", "", False, template)
        r.install(r.site.tree)
        etc[name] = r.flash / "etc"
    acme, berlin = etc["acme"], etc["berlin"]
    # acme (5.x): the root's /etc entries through hostetc (bound to the root's /etc by its holder), but
    # EL's own ipsec.conf: RHEL's stock file, as on every EL router of the lab (lab/platform.py el_stock_files)
    assert os.readlink(acme / "hosts").endswith("router-acme/hostetc/hosts")
    for e in (acme, berlin):
        assert not (e / "ipsec.conf").is_symlink()
        assert (e / "ipsec.conf").read_bytes() == (REPO / "lab/stock-el/ipsec.conf").read_bytes()
    assert not (acme / "passwd").exists() and not (acme / "passwd").is_symlink()  # not the lab kernel's /etc
    rendered = Path(p.plan.wan.site("acme").tree) / "etc/ipsec.d/acme-berlin.conf"
    assert (acme / "ipsec.d/acme-berlin.conf").read_text() == rendered.read_text()
    # berlin (4.x): the lab kernel's own /etc, as before
    assert (berlin / "hosts").is_symlink() and (berlin / "passwd").is_symlink()


def test_a_5x_routers_dns_reload_restarts_dnsmasq_in_its_own_root(tmp_path):
    """The lab's DNS reload of a router in a root of its own (reload_env's WAN_RELOAD_DNS, run by
    reconcile as `sh -c` inside that root, the model reached through `chroot /wanhost`) starts the
    dnsmasq of the router's root, which sees the router's /etc. Seen in the rotation lab with berlin on
    5.2: it restarted the lab kernel's dnsmasq ("cannot access directory /etc/dnsmasq.d"). The root
    here is busybox with a stand-in `dnsmasq` that records what it saw (no lab kernel, no real router
    root): the commands, chroots and PIDs are the real ones, in a mount namespace of this test."""
    from types import SimpleNamespace

    from lab.routers import NetnsRouter
    if os.geteuid() != 0 or not shutil.which("unshare") or not Path("/bin/busybox").exists():
        pytest.skip("needs root, unshare and busybox (as the lab does)")
    root, boot = tmp_path / "root", tmp_path / "boot"
    for d in ("bin", "usr/sbin", "etc/dnsmasq.d", "wanhost", "out", "proc"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for tool in ("sh", "ls", "sleep"):
        (root / "bin" / tool).symlink_to("busybox")
    (root / "etc/dnsmasq.d/wan.conf").write_text("server=/acme.inc/10.1.2.250\n")
    fake = root / "usr/sbin/dnsmasq"
    fake.write_text('#!/bin/sh\necho "$@" > /out/args\nls /etc/dnsmasq.d > /out/saw\n')
    fake.chmod(0o755)
    boot.mkdir()
    (boot / "dnsmasq.base").write_text("conf-dir=/etc/dnsmasq.d\n")
    # the holder's PID is the shell's $HOLDER: a process started in the root below, as the lab's holder is
    router = SimpleNamespace(bootdir=boot, site=SimpleNamespace(root=str(root), platform="el"), firewall=False,
                             holder=SimpleNamespace(pid="$HOLDER"))
    cmd = NetnsRouter.reload_env(router)["WAN_RELOAD_DNS"]
    assert cmd.startswith("chroot /wanhost env ") and "WAN_LAB_ROUTER_PID=$HOLDER " in cmd
    script = (f"mount --rbind / {root}/wanhost && mount -t proc proc {root}/proc || exit 1\n"
              f"chroot {root} /bin/sleep 60 & HOLDER=$!; export HOLDER\n"
              f"chroot {root} /bin/sh -c 'PATH=/usr/sbin:/bin; sh -c \"$0\"' {shlex.quote(cmd)}; rc=$?\n"
              "kill $HOLDER; exit $rc\n")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (root / "out/saw").read_text().split() == ["wan.conf"]  # the router's own /etc
    assert (root / "out/args").read_text().strip() == f"--conf-file={boot / 'dnsmasq.conf'}"
    assert (boot / "dnsmasq.conf").read_text() == "conf-dir=/etc/dnsmasq.d\n"
