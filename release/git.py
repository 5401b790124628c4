"""Every question asked of git: the revision of the sites (stamped into each MANIFEST and
release), the sites as they were at another revision (the plan's base), released tags, commit
times and tag dates (releases). render/ never runs git: the tasks ask here and hand render/ plain values.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .policy import is_tag


class GitError(Exception):
    """git could not answer (not a repository, an unknown ref); the message says which."""


def _git(*args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=text, timeout=60)


def revision(sites: Path) -> str:
    """The git revision of the sites directory, with '+dirty' when it has uncommitted changes;
    'unknown' outside a repository."""
    try:
        rev = _git("-C", str(sites), "rev-parse", "HEAD")
        if rev.returncode != 0:
            return "unknown"
        dirty = _git("-C", str(sites), "status", "--porcelain", "--", ".").stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tracked_changes(repo: Path) -> bool:
    """Whether any tracked file of the repository differs from HEAD (templates, programs, ...)."""
    return bool(_git("-C", str(repo), "status", "--porcelain", "--untracked-files=no").stdout.strip())


def merge_base(branch: str = "main") -> str:
    """The merge base of HEAD and `branch` (where a pull request started); HEAD when there is none."""
    return _git("merge-base", "HEAD", branch).stdout.strip() or "HEAD"


@contextlib.contextmanager
def sites_at(ref: str, sites: Path) -> Iterator[Path]:
    """The sites directory as it was at git `ref`, in a temporary directory while the block runs
    (git archive: no checkout, the work tree is untouched)."""
    top = _git("-C", str(sites), "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise GitError(f"cannot read the sites at {ref}: {top.stderr.strip()}")
    rel = Path(sites).resolve().relative_to(Path(top.stdout.strip()))
    data = _git("-C", top.stdout.strip(), "archive", "--format=tar", ref, "--", str(rel), text=False)
    if data.returncode != 0:
        raise GitError(f"cannot read the sites at {ref}: {data.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory(prefix="wan-plan-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / rel


def commit_time(repo: Path, revision: str) -> int:
    """The commit time of `revision` (a '+dirty' suffix ignored); 0 when git does not know it."""
    r = _git("-C", str(repo), "log", "-1", "--format=%ct", revision.split("+")[0])
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


def tag_time(repo: Path, tag: str) -> int:
    """The date of an annotated tag (its tagger date); 0 for a lightweight or missing one
    (policy.release_date then takes the commit's time)."""
    r = _git("-C", str(repo), "for-each-ref", "--format=%(objecttype) %(taggerdate:unix)", f"refs/tags/{tag}")
    kind, _, when = r.stdout.strip().partition(" ")
    return int(when) if r.returncode == 0 and kind == "tag" and when.isdigit() else 0


def released_tags(repo: Path) -> list[str]:
    """The release tags (vMAJOR.MINOR.PATCH) the repository holds."""
    return [t for t in _git("-C", str(repo), "tag", "--list", "v*").stdout.split() if is_tag(t)]


def reachable_from(repo: Path, revision: str, ref: str) -> bool | None:
    """Whether commit `revision` is an ancestor of (or is) `ref`; None when git does not know `ref`."""
    if _git("-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        return None
    return _git("-C", str(repo), "merge-base", "--is-ancestor", revision.split("+")[0], ref).returncode == 0
