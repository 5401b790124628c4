"""The lab's own key pairs: one NSS database per router with throw-away raw RSA keys in it.

A real router makes its key at enrolment (router/enrol) and only the public half enters its site
file; the lab cannot have those private halves, so it makes its own pairs, one NSS database per
router, with the very tools a router uses (`certutil -N`, `ipsec newhostkey`, `ipsec showhostkey`),
and renders the WAN with their public halves in place of the site files' keys. They are lab keys,
not secrets: they are cached in ~/.cache/wan-lab/keys/<router>/ (key generation is the slow part
in a lab kernel) and each router's lab copies its own database to /var/lib/ipsec/nss.

A site file may name more than one key for a router (a rollover: key plus next_key or
previous_key, and the change lab's two revisions): every distinct CKAID of a router gets a
distinct lab key in that router's database, in the order first met, so a rollover in the site
files is a rollover in the lab.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from render.hostkey import HostKey, ckaid_of
from render.model import Wan

from . import kernels


@dataclass
class RouterKeys:
    """One router's lab NSS database and the keys in it (slot 0 first)."""

    router: str
    nss: Path
    keys: list[HostKey]
    seconds: list[float] = field(default_factory=list)  # generation time of each key made in this run


def keys_dir() -> Path:
    return kernels.cache_dir() / "keys"


def _run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:500]}")
    return r.stdout + r.stderr


def make_key(nss: Path, run=None) -> tuple[HostKey, float]:
    """A new raw RSA key pair inside the NSS database `nss`, as `ipsec newhostkey` makes it on a
    router; returns its public half and the seconds the generation took. `run(argv) -> output`
    (raising on failure) runs the tools somewhere else: inside a lab router (lab/scenarios/rotation.py)."""
    run = run or _run
    t0 = time.monotonic()
    out = run(["ipsec", "newhostkey", "--nssdir", str(nss)])
    seconds = time.monotonic() - t0
    m = re.search(r"CKAID ([0-9a-f]{40})", out)
    if not m:
        raise RuntimeError("ipsec newhostkey printed no CKAID")
    ckaid = m.group(1)
    shown = run(["ipsec", "showhostkey", "--nssdir", str(nss), "--left", "--ckaid", ckaid])
    m = re.search(r"leftrsasigkey=(0s[A-Za-z0-9+/=]+)", shown)
    if not m or ckaid_of(m.group(1)) != ckaid:
        raise RuntimeError("ipsec showhostkey did not print the key newhostkey made")
    return HostKey(m.group(1), ckaid), seconds


def router_keys(router: str, count: int = 1, base: Path | None = None) -> RouterKeys:
    """The router's lab database with at least `count` keys (made now if the cache has fewer)."""
    base = base or keys_dir()
    d = base / router
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as lock:  # two labs (or a lab and a test) may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = d / "keys.json"
        nss = d / "nss"
        keys = [HostKey(**k) for k in json.loads(index.read_text())] if index.exists() and nss.exists() else []
        seconds: list[float] = []
        if len(keys) < count:
            # work on a copy, then swap: a killed run leaves the cached database as it was
            tmp = Path(tempfile.mkdtemp(prefix="nss.new-", dir=d))
            if keys:
                shutil.copytree(nss, tmp, dirs_exist_ok=True)
            else:
                _run(["certutil", "-N", "-d", f"sql:{tmp}", "--empty-password"])
            while len(keys) < count:
                key, s = make_key(tmp)
                keys.append(key)
                seconds.append(round(s, 3))
            os.chmod(tmp, 0o700)
            old = d / "nss.old"
            shutil.rmtree(old, ignore_errors=True)
            if nss.exists():
                os.rename(nss, old)
            os.rename(tmp, nss)
            shutil.rmtree(old, ignore_errors=True)
            (d / "keys.json.new").write_text(json.dumps([dataclasses.asdict(k) for k in keys], indent=1) + "\n")
            os.rename(d / "keys.json.new", index)
    return RouterKeys(router, nss, keys, seconds)


class LabKeys:
    """Lab keys for the routers of one lab run, mapped from the site files' keys by CKAID."""

    def __init__(self, base: Path | None = None):
        self.base = base
        self.slots: dict[str, dict[str, int]] = {}  # router -> site-file CKAID -> slot in its lab database
        self.routers: dict[str, RouterKeys] = {}

    def _lab_key(self, router: str, real: HostKey) -> HostKey:
        slots = self.slots.setdefault(router, {})
        slot = slots.setdefault(real.ckaid, len(slots))
        have = self.routers.get(router)
        if have is None or len(have.keys) <= slot:
            made = router_keys(router, slot + 1, self.base)
            if have is not None:
                made.seconds = have.seconds + made.seconds
            self.routers[router] = have = made
        return have.keys[slot]

    def apply(self, wan: Wan) -> Wan:
        """The same WAN with each router's keys replaced by lab keys from that router's own database."""
        sites = []
        for s in wan.sites:
            r = s.router
            lab = {f: self._lab_key(s.name, getattr(r, f)) for f in ("key", "next_key", "previous_key")
                   if getattr(r, f) is not None}
            sites.append(dataclasses.replace(s, router=dataclasses.replace(r, **lab)))
        return dataclasses.replace(wan, sites=tuple(sites))

    def nss(self, router: str) -> Path:
        """The router's lab NSS database (copy it; never write to the cache)."""
        return self.routers[router].nss

    def generation_seconds(self) -> dict[str, list[float]]:
        """Seconds per key made during this run (routers whose keys came from the cache: none)."""
        return {r: k.seconds for r, k in sorted(self.routers.items()) if k.seconds}


def with_lab_keys(wan: Wan, base: Path | None = None) -> tuple[Wan, LabKeys]:
    """`wan` with every router's public keys replaced by lab keys; the LabKeys give each router's
    NSS database (`.nss(router)`) holding the private halves."""
    keys = LabKeys(base)
    return keys.apply(wan), keys


def stranger_key(bits: int = 2048) -> HostKey:
    """A well-formed public key whose private half nobody kept: what a router that was never
    enrolled, or an attacker, would present (the negative tests' "wrong public key")."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from render.hostkey import rsasigkey_from_numbers
    pub = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers()
    text = rsasigkey_from_numbers(pub.e, pub.n)
    return HostKey(text, ckaid_of(text))


def with_wrong_peer_keys(wan: Wan, router: str) -> Wan:
    """`wan` as `router` would see it if it held a wrong public key for every peer: its tunnels
    cannot authenticate any peer (the peers keep their real keys)."""
    sites = tuple(s if s.name == router else
                  dataclasses.replace(s, router=dataclasses.replace(s.router, key=stranger_key(), next_key=None,
                                                                    previous_key=None))
                  for s in wan.sites)
    return dataclasses.replace(wan, sites=sites)
