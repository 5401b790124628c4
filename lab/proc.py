"""What every in-kernel lab module shares: running a command, progress lines for the host, scrubbing.

In a lab kernel every process start costs 0.1-0.2 s (User-Mode Linux: ptrace for every system
call of the fork); callers batch where they can.
"""
from __future__ import annotations

import re
import subprocess

KEY_RE = re.compile(r"0x[0-9a-fA-F]{16,}")


class LabError(Exception):
    """A lab could not be built or run (not a failed check: those are Check rows)."""


class CommandFailed(LabError):
    pass


def progress(phase: str, done: int, total: int, note: str = "") -> None:
    """`@@ phase k/N note`: the host side (lab/console.py) draws it."""
    print(f"@@ {phase} {done}/{total} {note}".rstrip(), flush=True)


def log(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def run(argv: list[str], check: bool = True, timeout: float = 60, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=env)
    if check and r.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:2000]}")
    return r


def scrub(text: str) -> str:
    """Keys never leave the lab: XFRM key material is replaced (the routers' keys are raw RSA in
    their NSS databases: no secret is in any file or output the lab reads)."""
    return KEY_RE.sub("0x<scrubbed>", text)
