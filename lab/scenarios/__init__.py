"""Lab scenarios: plug-ins loaded by name.

A scenario is a module with
- `STAGE`: "before_tunnels" (it brings the tunnels itself, e.g. by a release) or "after_tunnels";
- `prepare(ctx: PrepareContext) -> Prepared` on the host: renders, builds, decides what the lab
  needs (its own data, the trees routers start from, other revisions' sites to wire);
- `play(lab, data: dict)` inside the lab kernel: drives the lab through the engine's public API
  (lab/engine.py) and adds `Check` rows; it never rewrites the plan it was given;
- optionally `revisions(options) -> list[Path]`: other sites directories it will load (so the
  lab's own addresses are picked around theirs too).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..contracts import Infra, WanView
from ..proc import LabError

REGISTRY = {
    "change": "lab.scenarios.change",    # new trees applied by reconcile (or a restart) while traffic runs
    "release": "lab.scenarios.release",  # routers enrol, fetch signed releases, refuse bad ones, roll back
    "faults": "lab.scenarios.faults",    # the RouterHost primitives: kill -9, stop, WAN cut, reboot
    "heal": "lab.scenarios.heal",        # repairs between releases: a conn, a conf, DNS, the firewall put back
    "nat": "lab.scenarios.nat",          # dynamic sites behind a CGNAT: MSS clamp, outside address change
    "later": "lab.scenarios.later",      # a release changing both ends of tunnels, fetched at random moments
    "rotation": "lab.scenarios.rotation",  # a router key rolled over in three releases while pings run; old key refused
}


def load(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise LabError(f"no lab scenario {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])


@dataclass
class PrepareContext:
    """What a scenario's host side gets: the WAN as the lab runs it, its rendering, the lab's
    addresses and naming, the lab's own router keys, and helpers to load and render other revisions."""

    wan: Any  # render.model.Wan, as the lab runs it (Libreswan major of the lab)
    out: Path  # its rendered trees
    keys: Any  # lab.keys.LabKeys: the lab's key pair per router (`load` applies them to other revisions too)
    results: Path
    prefix: str
    infra: Infra
    options: dict
    load: Any  # (sites dir) -> (Wan as the lab runs it, notes)
    view: Any  # (wan, out, index) -> WanView


@dataclass
class Prepared:
    data: dict = field(default_factory=dict)
    install: dict[str, str] = field(default_factory=dict)  # router -> tree it starts from instead of its rendering
    serve_release: bool = False
    no_firewall: str | None = None  # why the firewall is not exercised with this scenario
    index: dict[str, int] | None = None  # site numbering shared by every revision
    more_sites: list[WanView] = field(default_factory=list)  # other revisions: their sites are wired too
    notes: list[str] = field(default_factory=list)
