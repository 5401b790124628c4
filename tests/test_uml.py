"""Which User-Mode Linux the lab boots (lab/uml.py): the interpreter rewrite with real executables,
the host fallback when Debian 13's cannot be fetched (a mirror on a closed local port)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import uml

LOADER = Path("/lib64/ld-linux-x86-64.so.2")


def test_a_relative_interpreter_is_found_from_the_working_directory(tmp_path: Path) -> None:
    exe = tmp_path / "true"
    shutil.copy2("/bin/true", exe)
    assert uml.set_interpreter(exe, b"./ld.so") == str(LOADER).encode()
    # without the loader beside the working directory the kernel cannot start it...
    bare = tmp_path / "elsewhere"
    bare.mkdir()
    with pytest.raises(FileNotFoundError):
        subprocess.run([str(exe)], cwd=bare, check=True)
    # ...with it, it runs (the kernel opened ./ld.so relative to the working directory of execve)
    (tmp_path / "ld.so").symlink_to(LOADER.resolve())
    assert subprocess.run([str(exe)], cwd=tmp_path).returncode == 0


def test_an_interpreter_that_does_not_fit_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    exe = tmp_path / "true"
    shutil.copy2("/bin/true", exe)
    before = exe.read_bytes()
    with pytest.raises(RuntimeError, match="does not fit"):
        uml.set_interpreter(exe, b"/" + b"x" * 64)
    assert exe.read_bytes() == before


def test_a_static_binary_or_a_text_file_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(RuntimeError, match="not a 64-bit"):
        uml.set_interpreter(text, b"./ld.so")
    if Path("/bin/busybox").exists():
        with pytest.raises(RuntimeError, match="no program interpreter"):
            uml.set_interpreter(Path("/bin/busybox"), b"./ld.so")


@pytest.mark.skipif(uml.host() is None, reason="the host's user-mode-linux is not installed")
def test_without_a_mirror_the_hosts_uml_is_booted_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAN_LAB_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # discard port: refused here
    monkeypatch.delenv("WAN_LAB_UML", raising=False)
    said: list[str] = []
    kernel = uml.prepare(tmp_path / "uml", said.append)
    assert kernel == uml.host()
    assert any("WARNING" in s and "could not be fetched" in s for s in said), said
    assert not uml.cached(tmp_path / "uml")  # nothing half-fetched is taken for a kernel next time
    assert [p.name for p in (tmp_path / "uml").iterdir() if not p.name.startswith(".lock")] == []


def test_wan_lab_uml_host_takes_the_package_without_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAN_LAB_UML", "host")
    monkeypatch.setenv("WAN_LAB_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    if uml.host() is None:
        with pytest.raises(RuntimeError, match="apt-get install user-mode-linux"):
            uml.prepare(tmp_path / "uml", print)
    else:
        assert uml.prepare(tmp_path / "uml", print).binary == uml.HOST_BINARY
    assert not (tmp_path / "uml").exists()


def test_the_cached_tree_is_complete_when_there_is_one() -> None:
    """The tree the lab boots (fetched by an earlier lab run on this machine): loader, modules, the
    interpreter rewritten; booting it is what every UML lab test does."""
    base = Path(os.environ.get("WAN_LAB_CACHE") or "~/.cache/wan-lab").expanduser() / "uml"
    trees = uml.cached(base)
    if not trees:
        pytest.skip("no Debian 13 User-Mode Linux fetched on this machine yet (the first UML lab fetches it)")
    kernel = uml._from_tree(trees[-1])
    assert (kernel.cwd / "ld.so").resolve().exists()
    assert (kernel.modules / kernel.release / "modules.dep").exists()
    data = kernel.binary.read_bytes()
    assert b"./ld.so\0" in data and b"/lib64/ld-linux-x86-64.so.2\0" not in data
    # started as the lab starts it (its tree as working directory, its libc by env(1)), it runs on this host
    env = ["/usr/bin/env", *(f"{k}={v}" for k, v in kernel.env.items())]
    got = subprocess.run([*env, str(kernel.binary), "--version"], cwd=kernel.cwd, capture_output=True, text=True, timeout=30)
    assert got.stdout.strip() == kernel.release, got.stderr
    # and not from elsewhere: the interpreter is relative to the tree
    assert subprocess.run([*env, str(kernel.binary), "--version"], cwd="/", capture_output=True).returncode != 0
