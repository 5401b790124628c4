"""Fixtures and markers for the lab kernel tests."""

import sys

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab: boots a real lab kernel (User-Mode Linux or QEMU); slow, needs root")


@pytest.fixture(scope="session", autouse=True)
def _the_lab_lock():
    """Hold the machine's lab lock for the whole session, so another lab run (a benchmark, a
    second session) cannot slip in between two tests and make them wait."""
    from lab.run import one_lab_at_a_time
    with one_lab_at_a_time(lambda line: print(line, file=sys.stderr, flush=True)):
        yield
