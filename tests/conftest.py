"""Shared fixtures. Goldens are regenerated only on purpose: pytest --update-goldens."""
from __future__ import annotations

import pytest

from support import REPO


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



@pytest.fixture(scope="session", autouse=True)
def _suite_labs_in_background(request, tmp_path_factory):
    # the lab sets the session's lab tests read start now, in a process of their own (tests/lab/suite_labs.py)
    for plugin in request.config.pluginmanager.get_plugins():
        start = getattr(plugin, "start_suite_labs", None)
        if start is not None and getattr(plugin, "__name__", "").endswith("conftest"):
            start(request.session, tmp_path_factory)
            break
