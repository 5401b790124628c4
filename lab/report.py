"""The verdict: a site x site matrix in the terminal, junit.xml for CI."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

CELL_KINDS = ("tunnel", "ping", "router_ping", "dns")


def cells(result: dict, sites: list[str]) -> dict[tuple[str, str], dict[str, bool]]:
    """(from, to) -> kind -> ok; a tunnel check counts for both directions."""
    out: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for c in result.get("checks", []):
        if c["kind"] not in CELL_KINDS:
            continue
        pairs = [(c["src"], c["dst"]), (c["dst"], c["src"])] if c["kind"] == "tunnel" else [(c["src"], c["dst"])]
        for p in pairs:
            out[p][c["kind"]] = out[p].get(c["kind"], True) and c["ok"]
    return out


def matrix(result: dict, sites: list[str]) -> str:
    """Rows: from; columns: to. A cell is T(unnel) P(ing) R(outer ping) D(NS), '.' where it failed."""
    m = cells(result, sites)
    width = max(6, max(len(s) for s in sites) + 1)
    lines = ["from \\ to".ljust(width + 2) + "".join(s.rjust(width) for s in sites)]
    for a in sites:
        row = a.ljust(width + 2)
        for b in sites:
            if a == b:
                row += "-".rjust(width)
                continue
            kinds = m.get((a, b), {})
            txt = "".join(k[0].upper() if kinds.get(k) else ("." if k in kinds else " ") for k in ("tunnel", "ping", "router_ping", "dns"))
            row += txt.rjust(width)
        lines.append(row)
    lines.append("cell: T tunnel up on both ends, P LAN host pings through ESP, R router pings from its LAN address, D DNS through the tunnel; '.' failed")
    return "\n".join(lines)


def summary(result: dict) -> tuple[int, int]:
    checks = result.get("checks", [])
    return sum(c["ok"] for c in checks), len(checks)


def junit(result: dict, path: Path, kernel: str) -> None:
    checks = result.get("checks", [])
    failures = sum(not c["ok"] for c in checks) + (1 if result.get("error") else 0)
    cases = []
    for c in checks:
        name = f"{c['kind']} {c['src']} -> {c['dst']}"
        body = "" if c["ok"] else f"<failure message={quoteattr(c['evidence'].get('why') or 'failed')}>{escape(json.dumps(c['evidence'], sort_keys=True))}</failure>"
        cases.append(f'  <testcase classname="lab.{c["kind"]}" name={quoteattr(name)}>{body}</testcase>')
    if result.get("error"):
        cases.append(f'  <testcase classname="lab" name="lab run"><error message={quoteattr(result["error"])}/></testcase>')
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="wan-lab ({kernel})" tests="{len(cases)}" '
                    f'failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n")
