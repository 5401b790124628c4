"""The status fetch leaves for monitoring (docs/monitoring.md): every run, whatever its end, writes
DIR/var/run/wan/status.json and a Prometheus textfile, and `fetch --status` prints a summary and
says (exit 1) when something is worth an alert. The real router/fetch under BusyBox ash and bash,
a release server on loopback and real signify; `ipsec` is the stand-in of tests/support.py (pluto
cannot hold tunnels on this machine's kernel), which answers `whack --trafficstatus` as pluto
4.10 prints it. The textfile is read by a strict parser of the exposition format written here."""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
from test_fetch import SHELLS, World

from lab.keys import with_wrong_peer_keys
from release.bundle import release_env
from render.render import render_wan

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prom(text: str) -> dict[str, dict]:
    """Prometheus' text exposition format 0.0.4, strictly: every family has one HELP and one TYPE
    before its samples, its samples are together, label values are escaped, no series twice,
    values are numbers, counters end in _total, the file ends with a newline. Returns
    {family: {"type", "help", "samples": {frozenset(labels): value}}}."""
    assert text.endswith("\n"), "a textfile ends with a newline"
    families: dict[str, dict] = {}
    current = None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {n}: {line!r}"
        if line.startswith("#"):
            m = re.fullmatch(r"# (HELP|TYPE) (\S+) (.+)", line)
            assert m and NAME.fullmatch(m[2]), where
            f = families.setdefault(m[2], {"samples": {}})
            key = m[1].lower()
            assert key not in f and not f["samples"], f"{where}: a second {m[1]} or one after the samples"
            f[key] = m[3]
            if key == "type":
                assert m[3] in ("counter", "gauge", "untyped"), where
                assert m[3] != "counter" or m[2].endswith("_total"), f"{where}: a counter's name ends in _total"
            current = m[2]
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, where
        name, labels, value = m[1], m[2], m[3]
        assert name == current and "type" in families[name] and "help" in families[name], \
            f"{where}: not under its own HELP and TYPE"
        pairs = LABEL.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), f"{where}: bad labels"
        key = frozenset(pairs)
        assert key not in families[name]["samples"], f"{where}: a series twice"
        v = float(value)
        assert not math.isnan(v), where
        families[name]["samples"][key] = v
    return families


def value(prom: dict, name: str, **labels) -> float:
    return prom[name]["samples"][frozenset(labels.items())]


class Status(World):
    """A World whose fetch settings name a textfile directory."""

    def __init__(self, tmp: Path, shell: list[str]):
        super().__init__(tmp, shell, "curl")
        self.prom = tmp / "textfile"
        self.setting(f"WAN_PROM_DIR={self.prom}")
        self.run_dir = self.root / "var/run/wan"

    def setting(self, line: str) -> None:
        with open(self.root / "etc/wan/fetch.conf", "a") as f:
            f.write(line + "\n")

    def status(self) -> dict:
        return json.loads((self.run_dir / "status.json").read_text())

    def textfile(self) -> dict:
        return parse_prom((self.prom / "wan.prom").read_text())

    def summary(self, *args: str):
        import subprocess

        from test_fetch import FETCH
        return subprocess.run(self.shell + [str(FETCH), "--root", str(self.root), "--status", *args],
                              capture_output=True, text=True, env=self.env, timeout=60)


@pytest.fixture(params=[" ".join(s) for s in SHELLS])
def world(request, tmp_path):
    w = Status(tmp_path, request.param.split())
    yield w
    w.server.stop()


def expiry_of(world, tag: str) -> int:
    return int(re.search(r"^WAN_EXPIRES=(\d+)$", (world.dist / tag / "RELEASE").read_text(), re.M)[1])


def test_applied_current_and_refused_runs_each_write_the_status_and_the_textfile(world):
    world.release("v1.0.0")
    t0 = int(time.time())
    assert world.fetch().returncode == 0
    s = world.status()
    assert s["router"] == "acme" and s["platform"] == "el"
    assert s["release"] == {"tag": "v1.0.0", "serial": 1000000, "date": s["release"]["date"],
                            "expires": expiry_of(world, "v1.0.0")}
    assert s["last_run"]["result"] == "applied" and s["last_run"]["exit_code"] == 0 and s["last_run"]["success"]
    assert s["last_run"]["time"] >= t0 and s["last_run"]["last_success"] == s["last_run"]["time"]
    assert [(t["name"], t["up"], t["pending"]) for t in s["tunnels"]] == [("acme-home", True, False)]
    assert s["alerts"] == [] and s["repairs"]["total"] == 0 and s["schedule"] == {"interval_minutes": 15}
    p = world.textfile()
    assert value(p, "wan_release_serial") == 1000000 and value(p, "wan_last_run_success") == 1
    assert value(p, "wan_release_expiry_timestamp_seconds") == expiry_of(world, "v1.0.0")
    assert value(p, "wan_tunnel_up", tunnel="acme-home") == 1 and value(p, "wan_tunnel_pending", tunnel="acme-home") == 0
    assert value(p, "wan_tunnel_bytes_total", tunnel="acme-home", direction="in") == 0
    assert value(p, "wan_info", router="acme", platform="el", tag="v1.0.0") == 1
    assert value(p, "wan_last_run_result", result="applied") == 1 and value(p, "wan_schedule_interval_seconds") == 900
    for f in (world.run_dir / "status.json", world.prom / "wan.prom"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644  # a monitoring agent need not be root
    assert sorted(os.listdir(world.prom)) == ["wan.prom"]  # no temporary file left for the collector to read
    assert not [p for p in os.listdir(world.run_dir) if p.startswith(".tmp")]
    first = s

    assert world.fetch().returncode == 0  # nothing to do
    s = world.status()
    assert s["last_run"]["result"] == "current" and s["last_run"]["time"] >= first["last_run"]["time"]
    assert s["tunnels"][0]["since"] == first["tunnels"][0]["since"]  # no change: the time of the change is kept
    assert value(world.textfile(), "wan_last_run_result", result="current") == 1
    current = s

    d = world.release("v1.1.0")  # tampered: refused, nothing changed, and the status says so
    b = bytearray((d / "acme.tar.gz").read_bytes())
    b[len(b) // 2] ^= 1
    (d / "acme.tar.gz").write_bytes(bytes(b))
    r = world.fetch()
    assert r.returncode == 2, r.stderr
    s = world.status()
    assert s["last_run"]["result"] == "refused" and s["last_run"]["exit_code"] == 2 and not s["last_run"]["success"]
    assert s["last_run"]["step"] == "stage" and s["last_run"]["last_success"] == current["last_run"]["time"]
    assert s["release"]["tag"] == "v1.0.0"
    assert any("the last run ended 'refused' (exit 2" in a for a in s["alerts"]), s["alerts"]
    p = world.textfile()
    assert value(p, "wan_last_run_success") == 0 and value(p, "wan_last_run_exit_code") == 2
    assert ("wan_last_run_result" in p) and list(p["wan_last_run_result"]["samples"]) == [frozenset({("result", "refused")})]


def test_a_rollback_is_counted_and_worth_an_alert(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    bad = render_wan(with_wrong_peer_keys(world.wan, "acme"), "test", release_env("v1.1.0", "test"))
    ok = render_wan(world.wan, "test", release_env("v1.1.0", "test"))
    world.release("v1.1.0", trees={"acme": bad["acme"], "home": ok["home"]})
    assert world.fetch().returncode == 1
    s = world.status()
    assert s["last_run"]["result"] == "rolled-back" and s["rollbacks"]["total"] == 1 and s["rollbacks"]["last"]
    assert s["release"]["tag"] == "v1.0.0" and s["tunnels"][0]["up"]
    assert any("rolled back" in a for a in s["alerts"])
    assert value(world.textfile(), "wan_rollbacks_total") == 1
    assert world.fetch().returncode == 1  # the same release again: held back, not counted twice
    s = world.status()
    assert s["last_run"]["result"] == "held-back" and s["rollbacks"]["total"] == 1
    r = world.summary()
    assert r.returncode == 1 and "rolled back" in r.stdout and "held-back" in r.stdout, r.stdout


def test_a_tunnel_down_is_kept_with_the_time_it_went_down_and_alerts_after_its_minutes(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    r = world.summary()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "release   v1.0.0 (serial 1000000)" in r.stdout and "1 of 1 up" in r.stdout and "alerts    none" in r.stdout
    (world.peer / "loaded/acme-home").unlink()  # the peer dropped the conn: the tunnel is down
    t_down = int(time.time())
    assert world.fetch().returncode == 0
    s = world.status()
    assert not s["tunnels"][0]["up"] and s["tunnels"][0]["since"] >= t_down
    since = s["tunnels"][0]["since"]
    assert s["alerts"] == []  # down for less than WAN_ALERT_DOWN_MINUTES (30)
    time.sleep(1.1)
    assert world.fetch().returncode == 0
    assert world.status()["tunnels"][0]["since"] == since  # still down: since when is kept across runs
    before = {p.name: p.read_bytes() for p in world.run_dir.iterdir()}
    world.setting("WAN_ALERT_DOWN_MINUTES=0")
    r = world.summary()
    assert r.returncode == 1 and "tunnel acme-home is down since" in r.stdout and "DOWN" in r.stdout, r.stdout
    assert {p.name: p.read_bytes() for p in world.run_dir.iterdir()} == before  # --status writes nothing
    assert world.fetch().returncode == 0
    assert any(a.startswith("tunnel acme-home is down since") for a in world.status()["alerts"])
    assert value(world.textfile(), "wan_tunnel_up", tunnel="acme-home") == 0
    assert value(world.textfile(), "wan_tunnel_last_change_timestamp_seconds", tunnel="acme-home") == since
    (world.peer / "loaded/acme-home").write_text((world.state / "loaded/acme-home").read_text())  # back
    assert world.fetch().returncode == 0
    s = world.status()
    assert s["tunnels"][0]["up"] and s["tunnels"][0]["since"] > since and s["alerts"] == []


def test_repairs_are_counted_escaped_and_repeated_ones_alert(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    now = int(time.time())
    hostile = 'conn "acme-home" \\ deleted\tby\x01 init — script'
    log = world.run_dir / "repairs.log"
    log.write_bytes("".join(f"{now - 100000 - i} file:etc/x old\n" for i in range(250)).encode()
                    + f"{now - 60} tunnel:acme-home {hostile}\n{now - 30} tunnel:acme-home re-added\n".encode())
    assert world.fetch().returncode == 0
    s = world.status()
    assert s["repairs"]["total"] == 252 and s["repairs"]["last"] == now - 30 and s["repairs"]["last_24h"] == 2
    assert len(s["repairs"]["recent"]) == 10
    assert s["repairs"]["recent"][-2] == {"time": now - 60, "what": "tunnel:acme-home",
                                          "text": 'conn "acme-home" \\ deleted by\x01 init \u00e2\u0080\u0094 script'}
    assert any("repaired more than once within 24 h: tunnel:acme-home" in a for a in s["alerts"])
    assert value(world.textfile(), "wan_repairs_total") == 252
    assert len(log.read_text().splitlines()) == 200  # trimmed, and the older ones still counted
    assert world.fetch().returncode == 0 and world.status()["repairs"]["total"] == 252
    r = world.summary()
    assert r.returncode == 1 and "repairs   252" in r.stdout and "\x01" not in r.stdout
    assert 'tunnel:acme-home  conn "acme-home" \\ deleted?by? init ??? script' in r.stdout, r.stdout
    assert "tunnel:acme-home  re-added" in r.stdout


def test_openwrt_writes_its_textfile_where_its_collector_reads_and_an_empty_setting_writes_none(world):
    world.release("v1.0.0")
    env = world.root / "etc/wan/router.env"
    assert world.fetch().returncode == 0
    # the router as if its release had been rendered for OpenWrt: the installed router.env and the staged
    # bundle's copy, with both files.list digests, so the repair between releases finds nothing to undo
    import hashlib
    old = hashlib.sha256(env.read_bytes()).hexdigest()
    text = env.read_text().replace("WAN_PLATFORM=el", "WAN_PLATFORM=openwrt")
    new = hashlib.sha256(text.encode()).hexdigest()
    for tree in (world.root, world.root / "etc/wan/releases/bundles/v1.0.0"):
        (tree / "etc/wan/router.env").write_text(text)
        lst = tree / "etc/wan/files.list"
        lst.write_text(lst.read_text().replace(old, new))
    conf = world.root / "etc/wan/fetch.conf"
    conf.write_text("".join(line + "\n" for line in conf.read_text().splitlines() if not line.startswith("WAN_PROM_DIR")))
    assert world.fetch().returncode == 0
    p = parse_prom((world.root / "var/prometheus/wan.prom").read_text())
    assert value(p, "wan_info", router="acme", platform="openwrt", tag="v1.0.0") == 1
    (world.root / "var/prometheus/wan.prom").unlink()
    world.setting("WAN_PROM_DIR=")
    assert world.fetch().returncode == 0
    assert not (world.root / "var/prometheus/wan.prom").exists() and world.status()["platform"] == "openwrt"


def test_no_secret_and_no_address_reach_the_status(world):
    token = "ghp_statusTEST0123456789abcdef"
    (world.root / "etc/wan/token").write_text(token + "\n")
    (world.root / "etc/wan/token").chmod(0o600)
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    for f in (world.run_dir / "status.json", world.prom / "wan.prom", *world.run_dir.iterdir()):
        text = f.read_text()
        assert token not in text and "127.0.0.1" not in text and "rsasigkey" not in text.lower(), f


def test_a_run_that_finds_another_running_leaves_the_status_alone(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    before = (world.run_dir / "status.json").read_bytes()
    with open(world.root / "var/run/wan-acme.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = world.fetch()
    assert r.returncode == 1 and "not starting a second" in r.stderr
    assert (world.run_dir / "status.json").read_bytes() == before


def test_an_expired_release_is_the_last_runs_result_and_an_alert(world):
    from release.bundle import build
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    build(world.wan, world.key, "v1.1.0", world.dist, "test", date=int(time.time()) - 91 * 86400)
    (world.dist / "latest").write_text("v1.1.0\n")
    assert world.fetch().returncode == 4
    s = world.status()
    assert s["last_run"]["result"] == "expired" and s["release"]["tag"] == "v1.0.0"
    r = world.summary()
    assert r.returncode == 1 and "the last run ended 'expired' (exit 4" in r.stdout


def test_the_documented_alert_rules_and_metrics_name_only_what_the_textfile_holds(world):
    """docs/monitoring.md's example rules parse as YAML and use only metrics a run writes; its table
    lists every metric family a run writes."""
    import yaml

    from support import REPO
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    written = set(world.textfile())
    doc = (REPO / "docs/monitoring.md").read_text()
    rules = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S)[1])
    used = {m for rule in rules["groups"][0]["rules"] for m in re.findall(r"\bwan_[a-z_]+", rule["expr"])}
    assert used and used <= written, used - written
    table = set(re.findall(r"^\| `(wan_[a-z_]+)` \|", doc, re.M))
    assert written <= table, written - table
    assert table - written <= {"wan_last_rollback_timestamp_seconds", "wan_last_repair_timestamp_seconds"}  # only after one


def test_a_refusal_of_the_settings_writes_the_status_and_a_usage_error_does_not(world):
    world.release("v1.0.0")
    assert world.fetch().returncode == 0
    world.setting("WAN_DOWNLOADER=ftp")  # refused before the lock is even taken
    r = world.fetch()
    assert r.returncode == 2 and "WAN_DOWNLOADER must be" in r.stderr
    s = world.status()
    assert s["last_run"]["result"] == "refused" and s["last_run"]["step"] == "start" and s["release"]["tag"] == "v1.0.0"
    before = (world.run_dir / "status.json").read_bytes()
    r = world.fetch("--tag", "latest")  # a usage error by hand says nothing about the router
    assert r.returncode == 2 and "is not a release tag" in r.stderr
    assert (world.run_dir / "status.json").read_bytes() == before
    r = world.fetch("--check")
    assert (world.run_dir / "status.json").read_bytes() == before


def test_a_textfile_directory_planted_as_a_symlink_or_open_to_others_is_not_written_through(world, tmp_path):
    """OpenWrt's /var is /tmp: anyone could make /tmp/prometheus before fetch does."""
    world.release("v1.0.0")
    target = tmp_path / "elsewhere"
    target.mkdir()
    shutil.rmtree(world.prom, ignore_errors=True)
    world.prom.symlink_to(target)
    r = world.fetch()
    assert r.returncode == 0 and "no textfile written" in r.stderr
    assert os.listdir(target) == [] and world.status()["release"]["tag"] == "v1.0.0"  # the JSON is still written
    world.prom.unlink()
    world.prom.mkdir()
    world.prom.chmod(0o777)
    assert "no textfile written" in world.fetch().stderr and os.listdir(world.prom) == []
    world.prom.chmod(0o755)
    assert world.fetch().returncode == 0 and os.listdir(world.prom) == ["wan.prom"]
