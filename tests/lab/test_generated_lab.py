"""Two generated WANs per run (lab/generate.py; seeds printed, WAN_LAB_SEEDS=a,b reproduces them, as
does ./run lab --generate SEED) proven in the lab as far as it can: a valid WAN that fails here is
a bug in the renderer or the lab."""
from __future__ import annotations

import pytest

from lab.generate import from_seed

pytestmark = pytest.mark.lab


def test_two_generated_wans_pass_the_lab(uml_labs):
    seeds = [int(k.split()[1]) for k in uml_labs if k.startswith("generated ")]
    assert len(seeds) == 2
    for seed in seeds:
        _proven(uml_labs[f"generated {seed}"], seed)


def _proven(outcome, seed: int) -> None:
    spec = from_seed(seed)
    r = outcome.result
    assert outcome.ok, f"seed {seed} ({spec.describe()}): {r.error or [c for c in r.checks if not c.ok][:5]}"
    # a 5.x site ran a 4.x rendering: the result names it
    assert set(r.other_major) == {s.name for s in spec.sites if s.libreswan == 5}
    # the lab proves the pairs the topology joins and names the others
    spokes = [s.name for s in spec.sites if s.name not in spec.hubs] if spec.hubs else []
    assert len(r.unjoined_pairs) == len(spokes) * (len(spokes) - 1) // 2
    assert len([c for c in r.checks if c.kind == "tunnel"]) == len({(c.src, c.dst) for c in r.checks if c.kind == "tunnel"})
