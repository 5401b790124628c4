"""Pre-shared keys: derived per tunnel from one master key that never enters git.

psk(tunnel) = base64url(HMAC-SHA256(master, "wan-psk-v1:" + tunnel name)). Both ends derive the
same key; changing the master rotates every tunnel; one leaked PSK reveals nothing of the others.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _random
from dataclasses import dataclass
from pathlib import Path

from .errors import Problem, WanError

ENV = "WAN_PSK_MASTER"
LOCAL_FILE = ".wan-psk-master"  # git-ignored, at the repository root
MIN_BYTES = 16


@dataclass(frozen=True)
class MasterKey:
    """The master key and where it came from (the origin is safe to show, the key never is)."""

    key: bytes
    origin: str  # "env", "file", "lab"

    def __repr__(self) -> str:  # never let the key reach a log through repr()
        return f"MasterKey(origin={self.origin!r})"

    def psk(self, tunnel: str) -> str:
        mac = hmac.new(self.key, b"wan-psk-v1:" + tunnel.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def lab_key() -> MasterKey:
    """A throw-away key for the lab: random per run, so lab trees are useless on a real router."""
    return MasterKey(_random.token_bytes(32), "lab")


def find_master(repo_root: Path, file: Path | None = None) -> MasterKey:
    """The real master key: the environment (CI's secret store), else the ignored local file."""
    value = os.environ.get(ENV)
    origin = "env"
    if file is not None or not value:
        path = file or repo_root / LOCAL_FILE
        try:
            value = path.read_text().strip()
            origin = "file"
        except FileNotFoundError:
            raise WanError([Problem(ENV, 0, "", f"no PSK master key: set {ENV} (CI secret store) or write one line to {path} "
                                                "(git-ignored), e.g. `python3 -c 'import secrets; "
                                                f"print(secrets.token_urlsafe(32))' > {LOCAL_FILE}`; "
                                                "for the lab use --lab-secrets")]) from None
    key = value.encode()
    if len(key) < MIN_BYTES:
        raise WanError([Problem(ENV, 0, "", f"the PSK master key is shorter than {MIN_BYTES} characters; "
                                            "make a longer random one")])
    return MasterKey(key, origin)
