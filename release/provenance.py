"""What a release says about where it came from: the digest of the site files, the lab's result of
the released commit (lab-result.json) and the plan since the previous tag (plan.md). Both are
listed in the signed SHA256SUMS, so a reader can trust that they belong to that release."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from render.plan import as_markdown
from render.plan import plan as make_plan

from . import git
from .policy import serial

LAB_RESULT = "lab-result.json"
PLAN = "plan.md"


def sites_digest(sites: Path) -> str:
    """sha256 over a sha256sum-style listing of every regular file under `sites` (sorted paths):
    the lab and the release compute it alike, so a lab result names the sites it proved."""
    sites = Path(sites)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(sites).as_posix()}\n"
             for p in sorted(sites.rglob("*")) if p.is_file() and not p.is_symlink()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def source(sites: Path) -> dict:
    """The `source` of a lab result: the commit (with '+dirty' when the sites differ from it) and the sites' digest."""
    return {"revision": git.revision(Path(sites)), "sites_digest": sites_digest(sites)}


def lab_result_problems(result_file: Path, revision: str, sites: Path) -> list[str]:
    """Why a lab result.json cannot be attached to the release of `revision`: it failed, it proved
    another commit or other site files, or it does not say the lab used its own key pairs."""
    try:
        result = json.loads(Path(result_file).read_text())
    except (OSError, ValueError) as e:
        return [f"{result_file}: not a lab result ({e.__class__.__name__}); run ./run lab on the released commit"]
    where = f"{result_file}:"
    problems = []
    if result.get("ok") is not True:
        problems.append(f"{where} the lab did not pass; a release is made only from a commit the lab proved")
    src = result.get("source") or {}
    if src.get("revision") != revision:
        problems.append(f"{where} the lab proved revision {src.get('revision') or 'unknown'}, not the released {revision}; "
                        "run the lab on the tagged commit")
    digest = sites_digest(sites)
    if src.get("sites_digest") != digest:
        problems.append(f"{where} the lab proved other site files (digest {src.get('sites_digest') or 'missing'}, "
                        f"the release has {digest}); run the lab on the released sites")
    if (result.get("keys") or {}).get("origin") != "lab":
        problems.append(f"{where} the result does not say that the lab used its own key pairs; use a result of ./run lab")
    return problems


def previous_tag(tag: str, released: list[str]) -> str | None:
    """The newest released tag older than `tag`: what the release's plan compares with."""
    older = [t for t in released if serial(t) < serial(tag)]
    return max(older, key=serial) if older else None


def plan_markdown(sites: Path, tag: str, previous: str | None) -> str:
    """The release's plan in Markdown: what changes on which router since `previous` (the whole
    WAN is new when there is no earlier tag)."""
    if previous is None:
        return (f"## WAN plan of {tag}\n\nThe first release: every router installs its whole tree "
                f"(no earlier release tag to compare with).\n")
    with git.sites_at(previous, Path(sites)) as base_sites:
        wan, plans = make_plan(base_sites, Path(sites), previous)
    return as_markdown(wan, plans, previous).replace(f"## WAN plan against `{previous}`",
                                                     f"## WAN plan of {tag}: changes since `{previous}`", 1)
