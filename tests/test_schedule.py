"""router/enrol installs the schedule that runs fetch (docs/enrolment.md), under BusyBox ash and bash:
OpenWrt: one line in /etc/crontabs/root at a splay of the router's own, replaced on every enrol,
read by the real BusyBox crond; EL: wan-fetch.service and wan-fetch.timer, checked by the real
`systemd-analyze verify` and `systemd-analyze calendar`, enabled by the real `systemctl --root`.

Stand-ins, for what cannot run on this machine: OpenWrt's /etc/init.d/cron (procd is not here) is
a script that records how it was called; systemd is not PID 1 here, so enrol takes its "not booted
with systemd" path (the timer is enabled offline, started at the next boot), as it would in any
root that is not the running system's."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_enrol import ENROL, SHELLS

from support import program_kit

pytestmark = pytest.mark.skipif(not shutil.which("ipsec") or not shutil.which("certutil"), reason="needs libreswan and nss tools")
CRON_LINE = re.compile(r"^(\S+) (\S+) \* \* \* /etc/wan/fetch >/dev/null 2>&1 # wan-fetch: ")


@pytest.fixture
def kit(tmp_path):
    """A program release of this checkout's programs, signed by a throw-away program key."""
    return program_kit(tmp_path)


def enrol(shell, root: Path, *args, rc=0, kit_dir=None) -> subprocess.CompletedProcess:
    pre = ["--install", str(kit_dir), "--router", "acme", "--url", "https://example.org/o/r/releases"] if kit_dir else []
    r = subprocess.run(shell + [str(ENROL), "--root", str(root), "--nssdir", str(root / "nss"), *pre, *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == rc, r.stdout + r.stderr
    return r


def openwrt_root(tmp: Path) -> Path:
    root = tmp / "openwrt"
    (root / "etc/init.d").mkdir(parents=True)
    (root / "etc/openwrt_release").write_text("DISTRIB_ID='OpenWrt'\n")
    cron = root / "etc/init.d/cron"
    cron.write_text(f'#!/bin/sh\necho "$*" >> "{tmp}/cron-calls"\n')
    cron.chmod(0o755)
    (root / "etc/crontabs").mkdir()
    return root


def crond_reads(crontabs: Path, tmp: Path) -> list[list[str]]:
    """The real BusyBox crond, in a mount namespace of its own (its pid file stays there), reads
    `crontabs` and logs (level 0) every entry as bitmaps: minutes, hours, days, months, weekdays.
    Returns the bitmaps of each entry."""
    log = tmp / "crond.log"
    log.unlink(missing_ok=True)
    p = subprocess.Popen(["unshare", "-m", "sh", "-c",
                          f'mount -t tmpfs none /run && exec busybox crond -f -l 0 -L "{log}" -c "{crontabs}"'])
    try:
        end = time.monotonic() + 20
        entries: list[list[str]] = []
        while time.monotonic() < end:
            lines = log.read_text().splitlines() if log.exists() else []
            entries = [lines[i + 1:i + 6] for i, line in enumerate(lines) if "entry:" in line]
            if entries and all(len(e) == 5 for e in entries):
                break
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    return entries


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_openwrt_enrol_installs_one_cron_line_with_a_splay_and_a_second_enrol_replaces_it(tmp_path, shell, kit):
    d, _, _ = kit
    root = openwrt_root(tmp_path)
    crontab = root / "etc/crontabs/root"
    crontab.write_text("0 3 * * * /sbin/other-job\n*/15 * * * * /etc/wan/fetch\n")  # the line the old docs asked for
    r = enrol(shell, root, kit_dir=d)
    lines = crontab.read_text().splitlines()
    assert lines[0] == "0 3 * * * /sbin/other-job" and len(lines) == 2, lines
    m = CRON_LINE.match(lines[1])
    assert m and m[2] == "*", lines[1]
    minutes = [int(x) for x in m[1].split(",")]
    assert len(minutes) == 4 and minutes[0] < 15 and all(b - a == 15 for a, b in zip(minutes, minutes[1:], strict=False)), minutes
    assert "WAN_INTERVAL=15\n" in (root / "etc/wan/fetch.conf").read_text()
    assert (tmp_path / "cron-calls").read_text().split("\n") == ["enable", "restart", ""]
    assert oct(crontab.stat().st_mode & 0o777) == "0o600" and "scheduled" in r.stderr
    # crond reads it: each of those minutes of every hour, every day
    entries = crond_reads(root / "etc/crontabs", tmp_path)
    assert len(entries) == 2, entries
    mins, hours, days, months, wdays = entries[1]
    assert [i for i, c in enumerate(mins) if c == "1"] == minutes
    assert set(hours) == {"1"} and len(hours) == 24 and set(days) == set(months) == set(wdays) == {"1"}

    splays = {minutes[0]}
    for _ in range(8):  # again and again: still one line, the other job kept; the splay is drawn anew
        enrol(shell, root, "--interval", "30", kit_dir=d)
        lines = crontab.read_text().splitlines()
        assert len(lines) == 2 and lines[0] == "0 3 * * * /sbin/other-job" and CRON_LINE.match(lines[1]), lines
        minutes = [int(x) for x in CRON_LINE.match(lines[1])[1].split(",")]
        assert len(minutes) == 2 and minutes[1] - minutes[0] == 30
        splays.add(minutes[0])
    assert len(splays) > 1, "the splay is not random"
    assert "WAN_INTERVAL=30\n" in (root / "etc/wan/fetch.conf").read_text()


@pytest.mark.parametrize("interval, hours_apart", [(120, 2), (1440, 24), (60, 1)])
def test_openwrt_intervals_of_hours_fall_on_the_same_minute(tmp_path, kit, interval, hours_apart):
    root = openwrt_root(tmp_path)
    d, _, _ = kit
    enrol(["sh"], root, "--interval", str(interval), kit_dir=d)
    entries = crond_reads(root / "etc/crontabs", tmp_path)
    assert len(entries) == 1
    mins, hours = entries[0][0], entries[0][1]
    assert mins.count("1") == 1
    on = [i for i, c in enumerate(hours) if c == "1"]
    assert len(on) == 24 // hours_apart and all(b - a == hours_apart for a, b in zip(on, on[1:], strict=False)), hours


def _verify(root: Path, tmp: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify of the installed units in `root`, with the system's own units next
    to them (a unit that wants sysinit.target must find it)."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)  # the service's ExecStart=/bin/sh must exist in the root
    shutil.copy(os.path.realpath("/bin/sh"), root / "bin/sh")
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/wan-fetch.timer",
                           "/etc/systemd/system/wan-fetch.service"], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("systemd-analyze") or not shutil.which("systemctl"), reason="needs systemd's tools")
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_el_enrol_installs_a_timer_and_its_service_that_systemd_accepts(tmp_path, shell, kit):
    d, _, _ = kit
    root = tmp_path / "el"
    (root / "etc/systemd/system").mkdir(parents=True)
    r = enrol(shell, root, "--interval", "20", kit_dir=d)
    units = root / "etc/systemd/system"
    timer, service = (units / "wan-fetch.timer").read_text(), (units / "wan-fetch.service").read_text()
    assert "\nOnCalendar=*-*-* *:00/20:00\n" in timer and "\nRandomizedDelaySec=20min\n" in timer
    assert "\nOnBootSec=2min\n" in timer and "\nWantedBy=timers.target\n" in timer
    assert "\nExecStart=/bin/sh /etc/wan/fetch\n" in service and "\nType=oneshot\n" in service
    assert os.readlink(units / "timers.target.wants/wan-fetch.timer") == "/etc/systemd/system/wan-fetch.timer"
    assert "starts at the next boot" in r.stderr
    v = _verify(root, tmp_path)
    assert v.returncode == 0 and v.stderr == "" and v.stdout == "", v.stderr  # not even a warning
    cal = re.search(r"^OnCalendar=(.*)$", timer, re.M)[1]
    c = subprocess.run(["systemd-analyze", "calendar", "--iterations=4", cal], capture_output=True, text=True, timeout=30)
    assert c.returncode == 0, c.stderr
    times = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ \S+ (\d\d):(\d\d):00", c.stdout)
    marks = [int(h) * 60 + int(m) for h, m in times]
    assert len(marks) == 4 and all((b - a) % 1440 == 20 for a, b in zip(marks, marks[1:], strict=False)), c.stdout
    before = {p.name: p.read_bytes() for p in units.iterdir() if p.is_file()}
    enrol(shell, root, "--interval", "20", kit_dir=d)  # idempotent
    assert {p.name: p.read_bytes() for p in units.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(units / "timers.target.wants")) == ["wan-fetch.timer"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd's tools")
@pytest.mark.parametrize("interval, calendar", [(60, "*-*-* *:00:00"), (240, "*-*-* 00/4:00:00"), (1440, "*-*-* 00:00:00")])
def test_el_timers_of_hours_are_calendars_systemd_reads(tmp_path, interval, calendar):
    root = tmp_path / "el"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/wan").mkdir(parents=True)
    (root / "etc/wan/fetch.conf").write_text(f"WAN_ROUTER=acme\nWAN_INTERVAL={interval}\n")
    enrol(["sh"], root, "--schedule")
    timer = (root / "etc/systemd/system/wan-fetch.timer").read_text()
    assert f"\nOnCalendar={calendar}\n" in timer and f"\nRandomizedDelaySec={interval}min\n" in timer
    c = subprocess.run(["systemd-analyze", "calendar", "--iterations=3", calendar], capture_output=True, text=True, timeout=30)
    assert c.returncode == 0, c.stderr
    assert not (root / "nss").exists()  # --schedule alone makes no key


@pytest.mark.parametrize("bad", ["7", "0", "45", "90", "1500", "15m", "-15", ""])
def test_an_interval_cron_cannot_keep_is_refused_before_anything_is_installed(tmp_path, kit, bad):
    d, _, _ = kit
    root = openwrt_root(tmp_path)
    r = enrol(["sh"], root, "--interval", bad, kit_dir=d, rc=2) if bad else None
    if r:
        assert f"--interval: '{bad}' is not minutes that divide an hour or a day" in r.stderr
        assert "nothing was installed" in r.stderr
        assert not (root / "etc/wan").exists() and os.listdir(root / "etc/crontabs") == []
    # the same from fetch.conf, by its line
    (root / "etc/wan").mkdir(exist_ok=True)
    (root / "etc/wan/fetch.conf").write_text(f"WAN_ROUTER=acme\n# every so often\nWAN_INTERVAL={bad}\n")
    r = enrol(["sh"], root, "--schedule", rc=2)
    assert f"etc/wan/fetch.conf:3: WAN_INTERVAL: '{bad}' is not minutes that divide an hour or a day" in r.stderr
    assert os.listdir(root / "etc/crontabs") == []


def test_dry_run_shows_the_schedule_and_the_files_and_changes_nothing(tmp_path, kit):
    d, _, _ = kit
    root = openwrt_root(tmp_path)
    r = enrol(["sh"], root, "--dry-run", kit_dir=d)
    assert "would install" in r.stdout and f"{root}/etc/wan/fetch" in r.stdout and "WAN_INTERVAL=15" in r.stdout
    assert CRON_LINE.match(next(line for line in r.stdout.splitlines() if "# wan-fetch" in line and not line.startswith("#")))
    assert not (root / "etc/wan").exists() and os.listdir(root / "etc/crontabs") == [] and not (root / "nss").exists()
    assert not (tmp_path / "cron-calls").exists()
    el = tmp_path / "el"
    (el / "etc/systemd/system").mkdir(parents=True)
    r = enrol(["sh"], el, "--dry-run", "--schedule", "--interval", "30")
    assert "[Timer]" in r.stdout and "OnCalendar=*-*-* *:00/30:00" in r.stdout and "ExecStart=/bin/sh /etc/wan/fetch" in r.stdout
    assert os.listdir(el / "etc/systemd/system") == []


def test_a_re_enrol_keeps_the_status_settings(tmp_path, kit):
    d, _, _ = kit
    root = openwrt_root(tmp_path)
    enrol(["sh"], root, kit_dir=d)
    with open(root / "etc/wan/fetch.conf", "a") as f:
        f.write("WAN_PROM_DIR=\nWAN_ALERT_DOWN_MINUTES=45\n")
    enrol(["sh"], root, "--interval", "10", kit_dir=d)
    conf = (root / "etc/wan/fetch.conf").read_text()
    assert "WAN_PROM_DIR=\n" in conf and "WAN_ALERT_DOWN_MINUTES=45\n" in conf and conf.count("WAN_INTERVAL=") == 1
    assert "WAN_INTERVAL=10\n" in conf
