"""The lab's structure, checked without booting anything: no import circle, no module reaching into
another's private names, the typed contracts round-trip through JSON, the lab's own addresses stay
clear of the WAN's, and the whole repository is ruff-clean."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from lab import scenarios
from lab.contracts import Check, LabPlan, LabResult
from lab.plan import pick_infra, wan_view
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO

LAB = REPO / "lab"
MODULES = sorted(p for p in LAB.rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every lab module this one imports, at any depth of the code (function-level imports count),
    except those only under `if TYPE_CHECKING:` (annotations, never executed)."""
    tree = ast.parse(path.read_text())
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lab"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if base.startswith("lab"):
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).exists()
                              or (REPO / sub.replace(".", "/") / "__init__.py").exists() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(me)
    return found


def test_the_lab_has_no_import_circle():
    graph = {_module(p): _imports(p) for p in MODULES}
    # a package's __init__ is imported with any of its modules: count that edge too
    for mod in list(graph):
        parent = mod.rpartition(".")[0]
        if parent and parent in graph and parent != "lab":
            graph[mod] = graph[mod] | {parent}
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n in graph and not state.get(n):
                dfs(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            dfs(m)


def test_no_lab_module_uses_another_modules_private_names():
    """`x._name` where x is another module or an object from one: only `self._...` and a module's own names."""
    offenders = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    offenders.append(f"{p.relative_to(REPO)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lab")):
                offenders += [f"{p.relative_to(REPO)}:{node.lineno}: imports {a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_every_lab_module_imports_alone_in_a_fresh_interpreter():
    mods = [_module(p) for p in MODULES if p.name not in ("uml_xstate.py",)]
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for m in mods:  # one interpreter each: an import that only works after another one would show
        r = subprocess.run([sys.executable, "-c", script, m], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, f"{m}: {r.stderr[-800:]}"


def test_scenarios_are_found_by_name_and_an_unknown_one_is_refused():
    for name in scenarios.REGISTRY:
        sc = scenarios.load(name)
        assert sc.STAGE in ("before_tunnels", "after_tunnels") and callable(sc.prepare) and callable(sc.play)
    with pytest.raises(scenarios.LabError,
                       match="no lab scenario 'nope'; choose one of change, faults, heal, later, nat, release, rotation"):
        scenarios.load("nope")


@pytest.fixture(scope="module")
def example_plan(tmp_path_factory) -> LabPlan:
    wan = load_sites(REPO / "sites")
    out = tmp_path_factory.mktemp("out")
    write_trees(render_wan(wan, "lab"), out)
    view = wan_view(wan, out, "wtest")
    return LabPlan(prefix="wtest", firewall=True, libreswan_major=4, routers="netns", infra=pick_infra([wan], "wtest"),
                   wan=view, network_sites=view.sites)


def test_the_plan_round_trips_through_json_and_only_the_contract_spells_its_keys(example_plan):
    text = example_plan.to_json()
    again = LabPlan.from_json(text)
    assert again == example_plan
    assert again.wan.site("paris").lans[1].bridge == "br-lan1"
    assert again.wan.tunnel_between("rome", "acme").name == "acme-rome"
    assert json.loads(text)["infra"]["inet_gw"] == "100.64.0.1"


def test_the_result_round_trips_through_json():
    r = LabResult(ok=False, checks=[Check("ping", "a", "b", False, {"why": "no reply"})], timings={"routers": 1.5},
                  unjoined_pairs=[("s1", "s2")], other_major={"a": "targets Libreswan 5; ran a 4.x rendering"})
    again = LabResult.from_json(r.to_json())
    assert again == r and isinstance(again.checks[0], Check) and again.failed()[0].evidence["why"] == "no reply"


def test_hub_and_spoke_views_join_spokes_to_hubs_and_spokes_through_one_hub(tmp_path):
    from lab.generate import write_generated
    sites = write_generated(3, tmp_path / "g", topology="hub-and-spoke", n_sites=4, n_hubs=1)
    wan = load_sites(sites)
    write_trees(render_wan(wan, "lab"), tmp_path / "out")
    view = wan_view(wan, tmp_path / "out", "wtest")
    hubs = set(wan.hubs)
    assert all(s.name in hubs or o.name in hubs for s, o in view.joined_pairs())
    spokes = [s.name for s in wan.sites if s.name not in hubs]
    # every spoke pair is a transit pair through the first hub by name; none is left unproven
    assert len(view.transits) == len(spokes) * (len(spokes) - 1) // 2 > 0
    assert {x.hub for x in view.transits} == {min(hubs)}
    assert view.unjoined_pairs() == []
    assert len(view.reached_pairs()) == len(wan.sites) * (len(wan.sites) - 1)
    assert {s.name: s.shapes[0] for s in view.sites} == {s.name: "hub" if s.name in hubs else "spoke" for s in wan.sites}
    assert {s.name for s in view.sites if "dynamic" in s.shapes} == {s.name for s in wan.sites if s.router.dynamic}
    # the plan round-trips through JSON with its transit pairs (it crosses the kernel boundary)
    assert type(view).from_json(view.to_json()) == view


def test_the_labs_own_addresses_are_picked_around_the_wans(tmp_path):
    """A WAN that uses 100.64.0.1, 100.64.0.53, 198.18.0.1 and a LAN with 10.66.66.66 gets other lab addresses."""
    wan = load_sites(REPO / "sites")
    acme = wan.site("acme")
    rome = wan.site("rome")
    crowded = dataclasses.replace(wan, sites=tuple(
        dataclasses.replace(s, router=dataclasses.replace(s.router, public_address=IPv4Address("100.64.0.1"))) if s is acme
        else dataclasses.replace(s, router=dataclasses.replace(s.router, public_address=IPv4Address("198.18.0.1")),
                                 lans=(IPv4Network("10.66.66.0/24"),)) if s is rome else s for s in wan.sites))
    infra = pick_infra([crowded, wan], "wx")
    mine = (infra.inet_gw, infra.isp_resolver, infra.release_server, infra.isp_answer, infra.rebind_answer)
    used = {IPv4Address(a) for a in mine}
    assert len(used) == 5
    assert IPv4Address("100.64.0.1") not in used and IPv4Address("198.18.0.1") not in used
    assert not any(a in IPv4Network("10.66.66.0/24") for a in used)
    assert IPv4Address(infra.rebind_answer) in IPv4Network("10.0.0.0/8")


def test_the_whole_repository_is_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:]


def _status(*sas: tuple[int, str, str, str]) -> dict[str, set[str]]:
    """pluto 4.10 `whack --status` lines (as in CI's diagnostics), parsed as the lab parses them."""
    from lab.routers import parse_spis
    return parse_spis("\n".join(f'000 #{n}: "{conn}" esp.{out}@192.0.2.1 esp.{inn}@192.0.2.2 tun.0@192.0.2.1 '
                                f'tun.0@192.0.2.2 Traffic: ESPin=0B' for n, conn, out, inn in sas))


def test_sa_kept_ignores_stale_sas_one_end_alone_held_and_sees_a_rekey_on_both(example_plan):
    """After home rebooted, paris kept the old IKE SA's Child SAs until liveness cleared them, while the new
    ones carried the traffic (CI, session 5): their going away is no disturbance; a rekey is."""
    from lab.proofs import sa_kept
    view = example_plan.wan
    tun = view.tunnel_between("home", "paris")
    home_conns = sorted(view.site("home").conns[tun.name])
    paris_conns = sorted(view.site("paris").conns[tun.name])
    assert len(home_conns) == len(paris_conns) == 2  # paris has two LANs: one Child SA each
    live_home = _status((9, home_conns[0], "2cfb30e3", "3aec684"), (11, home_conns[1], "9c4ad9e5", "1363caa0"))
    live_paris = _status((26, paris_conns[0], "3aec684", "2cfb30e3"), (27, paris_conns[1], "1363caa0", "9c4ad9e5"))
    stale_paris = _status((23, paris_conns[1], "dc81b353", "ae5e3d3b"), (24, paris_conns[0], "cd83891f", "542543b6"))
    both = {c: live_paris.get(c, set()) | stale_paris.get(c, set()) for c in paris_conns}
    before = {"home": live_home, "paris": both}
    assert sa_kept(view, before, {"home": live_home, "paris": live_paris}, tun)
    assert sa_kept(view, before, before, tun)
    rekeyed_home = _status((30, home_conns[0], "aaaa0001", "bbbb0001"), (11, home_conns[1], "9c4ad9e5", "1363caa0"))
    rekeyed_paris = _status((31, paris_conns[0], "bbbb0001", "aaaa0001"), (27, paris_conns[1], "1363caa0", "9c4ad9e5"))
    assert not sa_kept(view, before, {"home": rekeyed_home, "paris": rekeyed_paris}, tun)
    assert not sa_kept(view, before, {"home": live_home, "paris": stale_paris}, tun)  # only the stale ones left
    one_conn = {"home": {home_conns[0]: live_home[home_conns[0]]}, "paris": live_paris}
    assert not sa_kept(view, one_conn, one_conn, tun)  # a conn with no live SA before proves nothing


def test_labs_at_once_each_run_in_a_process_of_their_own_named_in_the_output(tmp_path):
    """lab.inner --jobs 2: every lab runs (here each fails at once: its plan is missing), its lines carry
    its name, and the exit code says a lab failed. (A lab kernel is needed for real labs: tests/lab.)"""
    argv = ["--jobs", "2"]
    for name in ("one", "two", "three"):
        argv += [str(tmp_path / f"{name}.json"), str(tmp_path / name / "inner")]
    r = subprocess.run([sys.executable, "-m", "lab.inner", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    for name in ("one", "two", "three"):
        assert f"@lab {name} (started;" in r.stdout
        assert re.search(rf"^\[{name}\] .*FileNotFoundError.*{name}\.json", r.stdout, re.M), r.stdout


def test_a_tunnel_torn_down_and_set_up_again_during_the_proofs_is_told_by_its_new_sas(tmp_path):
    """lab/engine.py changed_sas: the re-run after a flap also covers a tunnel that went down and came
    back while the traffic proofs ran (CI's QEMU example, session 7): it holds other SPIs than when the
    proofs began. Unchanged SPIs, or none before and none after, are not a flap."""
    from lab.engine import changed_sas
    out = tmp_path / "out"
    wan = load_sites(REPO / "sites")
    write_trees(render_wan(wan, "lab"), out)
    view = wan_view(wan, out, "wt")
    bp = "berlin-paris"
    before = {n: {c: {f"{i:08x}"} for i, c in enumerate(view.site(n).all_conns())} for n in view.names}
    same = {n: {c: set(s) for c, s in conns.items()} for n, conns in before.items()}
    assert changed_sas(view, before, same) == []
    after = {n: {c: set(s) for c, s in conns.items()} for n, conns in before.items()}
    conn = view.site("paris").conns[bp][-1]  # paris has two LANs: the second pair's conn
    after["paris"][conn] = {"deadbeef"}
    assert changed_sas(view, before, after) == [bp]
    del after["paris"][conn]  # gone on one end (cleared, not yet back)
    assert changed_sas(view, before, after) == [bp]
    empty = {n: {} for n in view.names}
    assert changed_sas(view, empty, empty) == []
