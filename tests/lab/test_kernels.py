"""lab.kernels against real kernels: ESP, nftables families, exit codes, timeouts, cleanup."""

from __future__ import annotations

import errno
import gzip
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lab.kernels import ESP_PROBE, GuestRun, available_kernels, esp_probe_host, run_in_guest

GUEST_KINDS = ("uml", "qemu")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON = os.path.realpath(sys.executable)  # the interpreter itself, not a pyenv shim
# Generous: the first QEMU run of a machine also waits for TCG to warm up.
BOOT_TIMEOUT = {"uml": 60.0, "qemu": 120.0}


def _needs(kind: str) -> None:
    why = available_kernels()[kind]
    if why is not None:
        pytest.skip(why)


def _run(kind: str, script: str, share: Path, **kw) -> GuestRun:
    kw.setdefault("timeout", BOOT_TIMEOUT[kind])
    return run_in_guest(kind, ["sh", "-c", script], share, cwd=share, env={"PATH": PATH}, **kw)


def _results(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


# What the lab needs from a kernel, written into the share as key=value lines: an ESP SA and an
# 'inet' nftables table in a fresh namespace, and the host's Python with the project's libraries.
PROBE = f"""
out=$PWD/probe.txt
ns=wanlab-test-$$
ip netns add $ns
if ip netns exec $ns {ESP_PROBE} 2>esp.err; then echo esp=yes; else echo esp=no; fi >> $out
if ip netns exec $ns nft add table inet t 2>inet.err; then echo inet=yes; else echo inet=no; fi >> $out
ip netns del $ns
if {shlex.quote(PYTHON)} -c 'import yaml, jsonschema'; then echo python=yes; else echo python=no; fi >> $out
"""


@pytest.fixture(scope="module", params=GUEST_KINDS)
def probed(request, tmp_path_factory) -> tuple[str, GuestRun, dict[str, str]]:
    kind = request.param
    _needs(kind)
    share = tmp_path_factory.mktemp(f"probe-{kind}")
    run = _run(kind, PROBE, share)
    assert run.exit_code == 0, run.console
    return kind, run, _results(share / "probe.txt")


@pytest.mark.lab
def test_lab_kernel_installs_esp_sa(probed):
    kind, run, results = probed
    assert results["esp"] == "yes", f"{kind}: {run.console}"


@pytest.mark.lab
def test_inet_nftables_work_in_qemu_and_not_in_uml(probed):
    kind, run, results = probed
    assert results["inet"] == ("yes" if kind == "qemu" else "no")
    assert run.firewall_capable is (kind == "qemu")


@pytest.mark.lab
def test_host_python_and_project_libraries_run_inside(probed):
    _, _, results = probed
    assert results["python"] == "yes"


@pytest.mark.lab
def test_boot_marker_streams_before_the_command_output(probed):
    _, run, _ = probed
    assert "@@GUEST-READY" in run.console
    assert 0 < run.boot_seconds <= run.total_seconds


@pytest.mark.lab
@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_exit_code_of_the_command_comes_back(kind, tmp_path):
    _needs(kind)
    lines: list[str] = []
    run = _run(kind, "echo from-inside; exit 7", tmp_path, on_line=lines.append)
    assert run.exit_code == 7
    assert "from-inside" in lines
    assert not list(tmp_path.glob(".guest-*")), "control files left in the share"


@pytest.mark.lab
@pytest.mark.parametrize("kind", GUEST_KINDS)
def test_command_past_the_timeout_is_killed_with_its_kernel(kind, tmp_path):
    _needs(kind)
    timeout = {"uml": 15.0, "qemu": 40.0}[kind]
    run = _run(kind, "sleep 600", tmp_path, timeout=timeout)
    assert "@@GUEST-READY" in run.console, "the kernel did not even boot in time"
    assert run.timed_out and run.exit_code == -1
    assert run.total_seconds < timeout + 15
    with pytest.raises(ProcessLookupError):
        os.kill(run.pid, 0)
    with pytest.raises(ProcessLookupError):  # UML's helper processes share its process group
        os.killpg(run.pid, 0)
    assert not list(tmp_path.glob(".guest-*"))


def _processes_mentioning(text: str) -> set[int]:
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            pass
    return found


@pytest.mark.lab
def test_interrupt_while_running_kills_the_kernel_and_cleans_up(tmp_path):
    _needs("uml")
    kernel_pids: set[int] = set()

    def interrupt_once_ready(line: str) -> None:
        if "@@GUEST-READY" in line:
            kernel_pids.update(_processes_mentioning(str(tmp_path)))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run("uml", "sleep 600", tmp_path, on_line=interrupt_once_ready)
    assert kernel_pids, "the kernel's processes were not found while it ran"
    assert not kernel_pids & _processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob(".guest-*"))


@pytest.mark.lab
def test_two_uml_runs_at_once_do_not_collide(tmp_path):
    _needs("uml")
    runs: dict[int, GuestRun] = {}

    def one(i: int) -> None:
        runs[i] = _run("uml", f"echo {i} > $PWD/mine; exit {i}", tmp_path)

    threads = [threading.Thread(target=one, args=(i,)) for i in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.exit_code for i, r in runs.items()} == {3: 3, 4: 4}


def test_host_kind_runs_a_plain_subprocess(tmp_path):
    run = run_in_guest("host", ["sh", "-c", "pwd > out; exit 5"], tmp_path, cwd=tmp_path,
                       env={"PATH": PATH}, timeout=10)
    assert (run.kind, run.exit_code, run.timed_out) == ("host", 5, False)
    assert (tmp_path / "out").read_text().strip() == str(tmp_path)


def test_host_kind_timeout_kills_the_command(tmp_path):
    run = run_in_guest("host", ["sleep", "600"], tmp_path, cwd=tmp_path, env={"PATH": PATH},
                       timeout=1)
    assert run.timed_out and run.exit_code == -1
    with pytest.raises(ProcessLookupError):
        os.kill(run.pid, 0)


def _kernel_config(option: str) -> str | None:
    config = Path("/proc/config.gz")
    if not config.exists():
        return None
    for line in gzip.decompress(config.read_bytes()).decode().splitlines():
        if line.startswith(option + "="):
            return line.split("=", 1)[1]
    return "n"


def test_esp_probe_agrees_with_the_kernel_config():
    ok, why = esp_probe_host()
    assert isinstance(ok, bool) and isinstance(why, str)
    esp = _kernel_config("CONFIG_INET_ESP")
    if esp is None or os.geteuid() != 0:
        return  # nothing to compare against
    # Built in: the probe must work. Unset: it must not. A module may or may not be loadable.
    if esp == "y":
        assert ok, why
    elif esp == "n":
        assert not ok and why


def test_available_kernels_names_every_kind():
    kernels = available_kernels()
    assert set(kernels) == {"host", "qemu", "uml"}
    assert all(v is None or (isinstance(v, str) and v) for v in kernels.values())


def test_uml_xstate_launcher_refuses_exactly_the_xstate_regset(tmp_path):
    """lab/uml_xstate.py makes ptrace(GETREGSET/SETREGSET, NT_X86_XSTATE) fail with EIO and
    leaves every other ptrace request alone (without the filter, asking about a process we do not
    trace gives ESRCH)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong]\n"
        "for req, addr in ((0x4204, 0x202), (0x4205, 0x202), (0x4204, 0x1), (0x3, 0)):\n"
        "    libc.ptrace(req, os.getppid(), addr, 0)\n"
        "    print(hex(req), hex(addr), ctypes.get_errno())\n")
    plain = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True).stdout.split("\n")
    launcher = str(Path(__file__).resolve().parents[2] / "lab/uml_xstate.py")
    guarded = subprocess.run([sys.executable, launcher, sys.executable, str(probe)],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    eio, esrch = str(errno.EIO), str(errno.ESRCH)
    assert [line.split()[-1] for line in plain if line] == [esrch] * 4
    assert [line.split()[-1] for line in guarded if line] == [eio, eio, esrch, esrch]


@pytest.mark.lab
def test_a_boot_that_does_not_reach_init_in_time_is_tried_once_more_then_given_up(tmp_path, monkeypatch):
    """A hung boot (no @@GUEST-READY within the boot limit) is killed and booted once more; a
    second hung boot ends the run as timed out, with the reason on the console. The limit is made
    too short for any boot here, so both boots 'hang'."""
    _needs("uml")
    monkeypatch.setenv("WAN_LAB_BOOT_LIMIT", "0.2")
    seen: list[str] = []
    run = _run("uml", "touch ran", tmp_path, timeout=60.0, on_line=seen.append)
    assert sum("booting it once more" in line for line in seen) == 1
    assert run.timed_out and run.exit_code == -1 and "a hung boot" in run.console
    assert not (tmp_path / "ran").exists() and not list(tmp_path.glob(".guest-*"))
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)
