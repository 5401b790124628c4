"""MANIFEST.json: what a rendered router tree holds, for machines (the plan, the checks, the lab).

Written at the root of out/<router>/ (not installed on the router): every file with its sha256
and mode, every tunnel with the digest of its conf and the CKAIDs of its peer's keys, the CKAID of
the router's own key, and where the tree came from. No secret is in a tree.
This module is the only one that knows its JSON keys: the dataclass fields are the keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = 2  # 2: raw RSA keys, no secrets


class ManifestError(ValueError):
    """A MANIFEST.json that is not one this code wrote (the message says what is wrong)."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    mode: str  # octal, four digits: "0644"


@dataclass(frozen=True)
class TunnelEntry:
    peer: str
    initiator: bool  # this router brings the tunnel up (auto=start)
    conns: tuple[str, ...]  # the connection names pluto knows (4.x expands subnets= into aliases)
    conf_sha256: str
    peer_address: str
    local_subnets: tuple[str, ...]
    remote_subnets: tuple[str, ...]
    crypto_profile: str
    peer_ike_id: str
    peer_key: str  # CKAID of the key the peer signs with (its rightrsasigkey=)
    peer_extra_keys: tuple[str, ...] = ()  # CKAIDs also accepted during the peer's key rollover


@dataclass(frozen=True)
class Manifest:
    wan: str
    router: str
    platform: str  # "el" or "openwrt"
    libreswan: int  # 4 or 5
    source_revision: str
    key: str  # CKAID of the key this router signs with (the lab's own when rendered by the lab)
    lan_address: str
    public_address: str
    files: dict[str, FileEntry]  # path relative to the router's / -> entry
    tunnels: dict[str, TunnelEntry]  # tunnel name -> entry
    extra_keys: tuple[str, ...] = ()  # CKAIDs of its next or previous key during a rollover
    format: int = FORMAT

    def to_json(self) -> str:
        """The file's text: keys sorted, one-space indent, a final newline (stable for goldens)."""
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ManifestError(f"format {d.get('format')!r}, this code reads format {FORMAT}; render the tree again")
            return cls(**{**d,
                          "extra_keys": tuple(d.get("extra_keys", ())),
                          "files": {p: FileEntry(**f) for p, f in d["files"].items()},
                          "tunnels": {n: TunnelEntry(**{**t, "conns": tuple(t["conns"]),
                                                        "local_subnets": tuple(t["local_subnets"]),
                                                        "remote_subnets": tuple(t["remote_subnets"]),
                                                        "peer_extra_keys": tuple(t.get("peer_extra_keys", ()))})
                                      for n, t in d["tunnels"].items()}})
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"not a MANIFEST.json this code wrote ({type(e).__name__}: {e}); render the tree again") from None

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest in a file; a ManifestError names the file."""
        try:
            return cls.from_json(Path(path).read_bytes())
        except OSError as e:
            raise ManifestError(f"{path}: {e.strerror}; render the tree again") from None
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None
