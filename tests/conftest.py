"""Shared fixtures. Goldens are regenerated only on purpose: pytest --update-goldens."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN_KEY = b"golden-tests-only-not-a-real-master-key"


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite tests/golden/*/expected and tests/errors/*/expected.log from the current code")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # messages name files relative to the working directory: make that the repository
    monkeypatch.chdir(REPO)


def copy_sites(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
