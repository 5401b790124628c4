"""Bad input: each broken sites directory against the exact messages it must produce."""
from __future__ import annotations

from pathlib import Path

import pytest

from render.errors import WanError
from render.validate import load_sites

from support import REPO

CASES = sorted(p.name for p in (REPO / "tests/errors").iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES)
def test_broken_sites_give_the_expected_messages(case, update_goldens):
    d = Path("tests/errors") / case
    with pytest.raises(WanError) as info:
        load_sites(d / "sites")
    got = str(info.value) + "\n"
    expected = REPO / d / "expected.log"
    if update_goldens:
        expected.write_text(got)
    assert got == expected.read_text()


def test_every_error_names_a_file_and_a_line():
    for case in CASES:
        with pytest.raises(WanError) as info:
            load_sites(Path("tests/errors") / case / "sites")
        for p in info.value.problems:
            assert p.file.endswith(".yaml"), (case, str(p))
            # a file that was not read has no line; every other problem has one
            assert p.line >= 1 or (p.where == "" and "not read" in p.message), (case, str(p))


def test_the_example_wan_is_valid():
    wan = load_sites("sites")
    assert [s.name for s in wan.sites] == ["acme", "berlin", "home", "oslo", "paris", "rome"]
    assert len(wan.tunnels) == 15


@pytest.mark.parametrize("case", ["alias-bomb", "merge-key-bomb", "deep-nesting", "recursive-alias"])
def test_yaml_bombs_are_refused_before_they_grow(case):
    """A few hundred bytes that pyyaml alone expands into gigabytes (the merge-key chain took over
    1 GB) or recurses on until a traceback: refused while the memory used stays small."""
    import tracemalloc
    tracemalloc.start()
    try:
        with pytest.raises(WanError) as info:
            load_sites(Path("tests/errors") / case / "sites")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "rome.yaml" in str(info.value) or "paris.yaml" in str(info.value)
    assert peak < 64 * 2**20, f"{case}: {peak / 2**20:.0f} MiB"


def test_missing_directory_and_missing_wan_yaml(tmp_path):
    with pytest.raises(WanError, match="is not a directory"):
        load_sites(tmp_path / "nope")
    with pytest.raises(WanError, match="wan.yaml: missing"):
        load_sites(tmp_path)


def test_github_format_annotates_the_file_and_line(capsys):
    from render import cli
    assert cli.validate("tests/errors/duplicate-key/sites", "github") == 1
    out, err = capsys.readouterr()
    expected = (REPO / "tests/errors/duplicate-key/expected.log").read_text().splitlines()
    assert err.splitlines()[: len(expected)] == expected  # the person-readable lines stay as they are
    f, line = expected[0].split(":")[:2]
    assert out.startswith(f"::error file={f},line={line},title=WAN validation::")
