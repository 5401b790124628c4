"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN_KEY = b"golden-tests-only-not-a-real-master-key"


def sites_repo(path: Path) -> Path:
    """A git repository at `path` holding a copy of the example sites, committed."""
    import shutil
    import subprocess
    shutil.copytree(REPO / "sites", path / "sites")
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "sites"], check=True)
    return path
