"""Fixtures and markers for the lab kernel tests."""

import sys
from pathlib import Path

# The tests import the project's lab package from the checkout, wherever pytest is started.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab: boots a real lab kernel (User-Mode Linux or QEMU); slow, needs root")
