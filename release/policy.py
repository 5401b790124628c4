"""Release policy: what a tag is, how routers order releases, and when a release is refused.

Tags are vMAJOR.MINOR.PATCH; the serial MAJOR*1000000 + MINOR*1000 + PATCH orders them for
routers (POSIX sh compares integers). Each refusal is a sentence for the person releasing, or
None when the release may go ahead.
"""
from __future__ import annotations

import re

from render.errors import Problem, WanError

from . import signify
from .keys import PUBLIC_KEY

TAG = re.compile(r"^v(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


def serial(tag: str) -> int:
    """The integer a router compares: v1.4.2 -> 1004002. A bad tag is a WanError naming --tag."""
    m = TAG.match(tag)
    if not m:
        raise WanError([Problem("--tag", 0, "", f"{tag!r} is not a release tag; use vMAJOR.MINOR.PATCH, "
                                                "each part 0-999, e.g. v1.4.0")])
    major, minor, patch = (int(x) for x in m.groups())
    return major * 1_000_000 + minor * 1_000 + patch


def release_date(tag_time: int, commit_time: int) -> int | None:
    """The date a release carries (WAN_DATE), from which it expires: the annotated tag's date, else
    the tagged commit's time (a lightweight tag), else None (bundle.build then takes now). The same
    tag always gives the same bytes, and a new annotated patch tag of the same commit
    (`git tag -a v1.4.1 -m renew v1.4.0^{}`) renews a release before it expires."""
    return tag_time or commit_time or None


def expires(date: int, valid_days: int) -> int:
    """WAN_EXPIRES: `valid_days` (wan.yaml release.valid_days) after the release's date; routers
    refuse the release from then on (fetch exits 4)."""
    return date + valid_days * 86400


def is_tag(name: str) -> bool:
    return bool(TAG.match(name))


def revision_of_release(revision: str, tracked_changes: bool) -> str:
    """The revision a release records: '+dirty' when the sites or the tracked files (templates,
    router programs) differ from the commit."""
    return revision + "+dirty" if tracked_changes and not revision.endswith("+dirty") else revision


def refuse_uncommitted(sites: str, revision: str, tracked_changes: bool) -> str | None:
    if revision.endswith("+dirty") or tracked_changes:
        return (f"uncommitted changes ({sites} or the templates and programs): a release must come from a commit "
                "so it can be rebuilt byte for byte (commit them, or --allow-dirty for a try-out)")
    return None


def refuse_downgrade(tag: str, released: list[str]) -> str | None:
    n = serial(tag)
    newer = [t for t in released if t != tag and is_tag(t) and serial(t) > n]
    if newer:
        return (f"--tag {tag}: older than {max(newer, key=serial)}, released already; routers refuse a downgrade, "
                "so tags must grow (or --allow-older)")
    return None


def refuse_foreign_key(signing: signify.SecretKey, trusted: signify.PublicKey) -> str | None:
    if signing.public != trusted:
        return (f"the signing key ({signing.keynum.hex()}) is not the one in {PUBLIC_KEY} ({trusted.keynum.hex()}): "
                "routers would refuse this release. Use the matching key, or commit its public half.")
    return None
