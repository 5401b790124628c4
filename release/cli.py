"""The release verbs behind tasks.py (release, release.keygen): each returns an exit code and
prints for a person."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from render.cli import print_problems
from render.errors import WanError
from render.validate import load_sites

from . import git, keys, policy, programs, provenance
from .bundle import build, verify

REPO = Path(__file__).resolve().parent.parent


def release(sites: str, tag: str, dist: str, allow_dirty: bool = False, allow_older: bool = False,
            on: str | None = None, lab_result: str | None = None, with_plan: bool = False) -> int:
    """Signed per-router bundles for `tag` in dist/<tag>/, refused when policy says so.
    `on`: a ref (origin/main) the released commit must be reachable from; `lab_result`: the lab's
    result.json of this commit, attached as lab-result.json; `with_plan`: plan.md since the
    previous tag attached. Both are listed in the signed SHA256SUMS."""
    try:
        n = policy.serial(tag)
        wan = load_sites(sites)
        rev = git.revision(Path(sites))
        tracked = git.tracked_changes(REPO)
        refusal = None if allow_dirty else policy.refuse_uncommitted(sites, rev, tracked)
        refusal = refusal or (None if allow_older else policy.refuse_downgrade(tag, git.released_tags(REPO)))
        if refusal:
            print(refusal, file=sys.stderr)
            return 1
        rev = policy.revision_of_release(rev, tracked)
        if on:
            reachable = git.reachable_from(REPO, rev, on)
            if not reachable:
                print(f"--on {on}: " + ("git does not know this ref (fetch it first)" if reachable is None else
                      f"the released commit {rev} is not reachable from {on}: only reviewed commits on {on} are released"),
                      file=sys.stderr)
                return 1
        extras = {}
        if lab_result:
            problems = provenance.lab_result_problems(Path(lab_result), rev, Path(sites))
            if problems:
                print("\n".join(problems), file=sys.stderr)
                return 1
            extras[provenance.LAB_RESULT] = Path(lab_result).read_bytes()
        if with_plan:
            previous = provenance.previous_tag(tag, git.released_tags(REPO))
            extras[provenance.PLAN] = provenance.plan_markdown(Path(sites), tag, previous).encode()
        trusted = keys.trusted_key(REPO)
        signing = keys.find_signing_key(REPO)
        if signing.public in programs.trusted(REPO, programs.RELEASE_GLOB):  # a second trusted key (a rotation)
            trusted = signing.public
        refusal = policy.refuse_foreign_key(signing, trusted)
        if refusal:
            print(refusal, file=sys.stderr)
            return 1
        mtime = git.commit_time(REPO, rev)
        r = build(wan, signing, tag, Path(dist), rev, mtime, date=policy.release_date(git.tag_time(REPO, tag), mtime),
                  extras=extras, programs=programs.current_serial(REPO))
    except WanError as e:
        return print_problems(e)
    except git.GitError as e:
        print(f"release: {e}", file=sys.stderr)
        return 1
    problems = verify(r.dir, trusted)
    verifier = shutil.which("signify-openbsd") or shutil.which("signify")
    if verifier and not problems:
        pub = r.dir.parent / f".{tag}.pub"
        pub.write_text(trusted.text("the key this release was checked with"))
        v = subprocess.run([verifier, "-V", "-q", "-p", str(pub), "-x", str(r.dir / "SHA256SUMS.sig"),
                            "-m", str(r.dir / "SHA256SUMS")], capture_output=True, text=True)
        pub.unlink()
        if v.returncode:
            problems.append(f"{Path(verifier).name}: {v.stderr.strip()}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"released {tag} (serial {n}, revision {rev}): {len(r.routers)} router bundles, {r.bytes:,} bytes, "
          f"in {r.seconds:.2f} s "
          f"-> {r.dir}/ (signed by key {signing.keynum.hex()}; verified{' with ' + Path(verifier).name if verifier else ''})")
    return 0


def keygen(force: bool = False) -> int:
    """A new signing key pair: release/wan-release.pub (commit it) and .wan-release.sec (secret)."""
    try:
        pub, sec = keys.keygen(REPO, force=force)
    except WanError as e:
        return print_problems(e)
    print(f"wrote {pub} (commit it: routers trust this key) and {sec} (secret, git-ignored: put its text into the "
          f"CI secret store as {keys.SECRET_ENV}, then keep it offline)")
    return 0


def programs_keygen(force: bool = False) -> int:
    """The program key pair: release/wan-programs.pub (commit it) and .wan-programs.sec (offline)."""
    refusal = programs.refuse_in_ci()
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    try:
        pub, sec = programs.keygen(REPO, force=force)
    except WanError as e:
        return print_problems(e)
    print(f"wrote {pub} (commit it: routers trust this key for their programs) and {sec} (secret, git-ignored: "
          "keep it offline, never in CI)")
    return 0


def programs_release(serial: int, dist: str, key_file: str | None = None, allow_dirty: bool = False) -> int:
    """A program release dist/programs-<serial>/ signed by the offline program key; records the serial
    in release/programs.env (commit it: the WAN's next release tells routers to install it)."""
    refusal = programs.refuse_in_ci()
    if not refusal and serial <= programs.current_serial(REPO):
        refusal = (f"--serial {serial}: program releases must grow (release/programs.env has "
                   f"{programs.current_serial(REPO)}); routers refuse an older one")
    if not refusal and not allow_dirty and git.tracked_changes(REPO):
        refusal = "uncommitted changes: a program release must come from a commit (or --allow-dirty for a try-out)"
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    try:
        signing = programs.signing_key(REPO, Path(key_file) if key_file else None)
        rev = git.revision(REPO / "router")
        d = programs.build(REPO, serial, Path(dist), signing, rev)
    except WanError as e:
        return print_problems(e)
    (REPO / programs.PROGRAMS_ENV).write_text(f"WAN_PROGRAMS_SERIAL={serial}\n")
    print(f"program release {d.name} in {d}/ (signed by program key {signing.keynum.hex()}); SHA256SUMS digest "
          f"{programs.digest(d)}.\nPublish it as a GitHub release tagged {d.name}, not marked latest "
          f"(gh release create {d.name} --latest=false {d}/*), then commit {programs.PROGRAMS_ENV}.")
    return 0
