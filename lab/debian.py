"""Debian packages of another release, fetched for the lab without touching the host's apt.

The lab's roots (lab/roots.py) are debootstrapped from a Debian mirror; the lab's User-Mode Linux
(lab/uml.py) is Debian 13's package, downloaded here with apt itself: a private apt configuration
(its own sources list, package lists and cache below a work directory) so the host's sources, lists
and locks stay as they are. apt verifies the release file against Debian's archive keyring and the
packages against the release file's hashes, as it does for the host.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# Debian's archive keys (package debian-archive-keyring; apt depends on it on Debian)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def mirror(suite: str) -> str:
    """The Debian mirror apt uses here for `suite` ($WAN_LAB_DEBIAN_MIRROR wins; deb.debian.org for a
    suite apt has no source for)."""
    if os.environ.get("WAN_LAB_DEBIAN_MIRROR"):
        return os.environ["WAN_LAB_DEBIAN_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            pass
    for text in texts:
        # deb822: a stanza with URIs and our suite (not -security, not -updates)
        for stanza in re.split(r"\n\s*\n", text):
            uri = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uri and suites and suite in suites.group(1).split() and re.search(r"^Components:.*\bmain\b", stanza, re.M):
                return uri.group(1)
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 4 and f[0] == "deb" and f[2] == suite and "main" in f[3:]:
                return f[1] if not f[1].startswith("[") else f[2]
    return "http://deb.debian.org/debian"


def download(suite: str, packages: list[str], work: Path) -> dict[str, Path]:
    """The .deb of each package (its current version in `suite`'s main), downloaded into `work`
    (which receives the private apt state too). Raises RuntimeError naming the mirror and apt's
    own words when the lists or a package cannot be had."""
    if not KEYRING.exists():
        raise RuntimeError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
    src = mirror(suite)
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {src} {suite} main\n")
    opts = [f"-oDir::Etc::SourceList={work / 'sources.list'}", "-oDir::Etc::SourceParts=-",
            f"-oDir::State::Lists={work / 'lists'}", f"-oDir::Cache={work / 'cache'}",
            "-oDebug::NoLocking=true", "-oAPT::Sandbox::User=root", "-q"]
    for argv in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", *packages]):
        got = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600, check=False)
        if got.returncode != 0:
            raise RuntimeError(f"`apt-get {argv[len(opts) + 1]}` for Debian {suite} from {src} ($WAN_LAB_DEBIAN_MIRROR) "
                               f"failed (exit {got.returncode}): {(got.stderr or got.stdout).strip()[-600:]}")
    debs: dict[str, Path] = {}
    for deb in work.glob("*.deb"):
        debs[deb.name.split("_", 1)[0]] = deb
    missing = [p for p in packages if p not in debs]
    if missing:
        raise RuntimeError(f"apt-get download from Debian {suite} ({src}) left no .deb for {', '.join(missing)}")
    return debs
