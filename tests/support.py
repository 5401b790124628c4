"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent



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


def site_key(name: str) -> dict:
    """A public key for a test site named `name` (ckaid, rsasigkey), as the site file holds it (the same on every call).
    From tests/data/site-keys.json (public halves only; nobody kept the private ones), or made now
    for a name the fixtures do not know."""
    import json
    known = json.loads((REPO / "tests/data/site-keys.json").read_text())
    if f"{name}:2048" in known:
        return dict(known[f"{name}:2048"])
    from lab.keys import stranger_key
    k = stranger_key()
    return {"ckaid": k.ckaid, "rsasigkey": k.rsasigkey}
