"""The lab as a person sees it: progress lines, the verdict (a site x site matrix, the PASS/FAIL
line, notes), and junit.xml for CI."""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .contracts import LabResult

CELL_KINDS = ("tunnel", "ping", "router_ping", "dns")


class Progress:
    """One line per phase step on a terminal (overwritten), phase ends only elsewhere (CI logs)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, line: str) -> None:
        m = re.match(r"^@@ (.+?) (\d+)/(\d+)(?: (.*))?$", line.strip())
        if m:
            phase, k, n = m.group(1), int(m.group(2)), int(m.group(3))
            text = f"lab: {phase} {k}/{n}"
            if self.tty:
                self.stream.write("\r\033[K" + text)
                if k == n:
                    self.stream.write("\n")
            elif k == n and text != self.last:
                self.stream.write(text + "\n")
            self.last = text
        elif line.startswith("lab: ") or "@@GUEST-READY" in line:
            if self.tty and self.last:
                self.stream.write("\r\033[K")
            self.stream.write(("lab: kernel booted" if "@@GUEST-READY" in line else line.strip()) + "\n")
        self.stream.flush()


def cells(result: LabResult) -> dict[tuple[str, str], dict[str, bool]]:
    """(from, to) -> kind -> ok; a tunnel check counts for both directions."""
    out: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for c in result.checks:
        if c.kind not in CELL_KINDS:
            continue
        pairs = [(c.src, c.dst), (c.dst, c.src)] if c.kind == "tunnel" else [(c.src, c.dst)]
        for p in pairs:
            out[p][c.kind] = out[p].get(c.kind, True) and c.ok
    return out


def matrix(result: LabResult, sites: list[str]) -> str:
    """Rows: from; columns: to. A cell is T(unnel) P(ing) R(outer ping) D(NS), '.' where it failed,
    '~' where the topology joins no tunnel (not proven)."""
    m = cells(result)
    unjoined = {tuple(p) for p in result.unjoined_pairs} | {(b, a) for a, b in result.unjoined_pairs}
    transit = {(a, b) for a, b, _ in result.transit_pairs} | {(b, a) for a, b, _ in result.transit_pairs}
    width = max(6, max(len(s) for s in sites) + 1)
    lines = ["from \\ to".ljust(width + 2) + "".join(s.rjust(width) for s in sites)]
    for a in sites:
        row = a.ljust(width + 2)
        for b in sites:
            if a == b:
                row += "-".rjust(width)
                continue
            if (a, b) in unjoined:
                row += "~".rjust(width)
                continue
            kinds = m.get((a, b), {})
            txt = "".join(k[0].upper() if kinds.get(k) else ("." if k in kinds else " ") for k in CELL_KINDS)
            if (a, b) in transit:  # no tunnel of its own: '^' where the T would be
                txt = "^" + txt[1:]
            row += txt.rjust(width)
        lines.append(row)
    lines.append("cell: T tunnel up on both ends, P LAN host pings through ESP, R router pings from its LAN address, "
                 "D DNS through the tunnel; '.' failed" + ("; '~' no tunnel joins the pair (not proven)" if unjoined else "")
                 + ("; '^' spoke to spoke through a hub (transit, paths below)" if transit else ""))
    return "\n".join(lines)


def libreswan_lines(result: LabResult) -> list[str]:
    """Which Libreswan ran each router, and every router that targets a major it did not run on:
    NOT proven on that major (no root with it here: lab/libreswan5.py)."""
    if not result.libreswan:
        return []
    ran = ", ".join(f"{n} {v['ran']}" + (" (own root)" if v.get("root") else "") for n, v in sorted(result.libreswan.items()))
    lines = [f"libreswan: {ran}"]
    for n, v in sorted(result.libreswan.items()):
        if not str(v["ran"]).startswith(f"{v['target']}."):
            lines.append(f"NOT PROVEN on Libreswan {v['target']}.x: {n} targets {v['target']} but ran Libreswan {v['ran']} "
                         f"with a {str(v['ran']).split('.')[0]}.x rendering ({v.get('why') or 'no root with it'})")
    return lines


def verdict(result: LabResult, sites: list[str], results_dir: Path) -> str:
    passed, total = result.summary()
    lines = ["", matrix(result, sites), ""]
    for c in result.failed()[:30]:
        lines.append(f"FAILED {c.kind} {c.src} -> {c.dst}: {c.evidence.get('why') or json.dumps(c.evidence, sort_keys=True)}")
    if result.error:
        lines.append(f"ERROR {result.error}")
    rel = result.scenarios.get("release") or {}
    for name, e in rel.get("enrol", {}).items():
        lines.append(f"release: {name} fetched, verified and applied its release in {e['fetch_seconds']} s; "
                     + (f"a ping crossed its new tunnels {e['until_traffic']} s after the fetch started"
                        if e.get("until_traffic") is not None else "NO ping crossed its new tunnels"))
    for st in rel.get("steps", []):
        how = "handled as it must be" if st["ok"] else "WRONG"
        lines.append(f"release: {st['step']}: {how} (fetch exit {st['rc']}, {st['seconds']} s)")
    later = result.scenarios.get("later") or {}
    if "outages" in later:
        lines.append(f"later: seed {later['seed']} (WAN_LAB_LATER_SEED reproduces it); fetched at "
                     + ", ".join(f"{n} {s} s" for n, s in later["moments"].items()))
        for name, o in later["outages"].items():
            lines.append(f"later: {name} down {o['seconds']} s (its ends began to apply at {o['applying_at'][0]} and "
                         f"{o['applying_at'][1]} s)")
        lines.append(f"later: unchanged tunnel {later['stream']['tunnel']}: {later['stream']['lost']} of "
                     f"{later['stream']['sent']} echoes lost")
    for k, step in enumerate((result.scenarios.get("change") or {}).get("steps", []), 1):
        lines.append(f"change {k} ({step['mode']}): {step['seconds']} s; unrelated tunnels disturbed "
                     f"{len(step['disturbed'])}/{step['unchanged_tunnels']}; stream {step['stream']}")
    rot = result.scenarios.get("rotation") or {}
    for st in rot.get("steps", []):
        loss = ", ".join(f"{t} {v['lost']}/{v['sent']}" for t, v in st["loss"].items())
        lines.append(f"rotation of {rot['rotated']}'s key: {st['step']} ({st['tag']}, {' then '.join(st['order'])}): "
                     f"{st['seconds']} s; pings lost {loss}")
    faults = result.scenarios.get("faults") or {}
    for what in ("kill_pluto", "stop_start", "wan_cut", "reboot"):
        if what in faults:
            lines.append(f"fault on {faults['router']}: {what.replace('_', ' ')}: traffic again after "
                         f"{faults[what]['seconds_until_traffic']} s")
    for name, shapes in sorted(result.shapes.items()):
        lines.append(f"site {name}: {', '.join(shapes)}")
    for name, n in sorted((result.scenarios.get("nat") or {}).items()):
        tr, rd = n.get("tcp_transfer", {}), n.get("readdress", {})
        if tr:
            lines.append(f"nat {name}: TCP {tr['from']} -> {name} over its {n['link_mtu']}-byte NAT link: "
                         + (f"{tr['received']} bytes in {tr['seconds']} s (MSS {tr['sender_mss']})" if tr["ok"]
                            else f"stalled at {tr['received']}/{tr['bytes']} bytes (MSS {tr['sender_mss']})")
                         + ("" if tr.get("clamped", True) else ", without the clamp (firewall not loaded)"))
        if rd:
            secs = rd["seconds_until_every_tunnel"]
            lines.append(f"nat {name}: outside address {rd['old_outside']} -> {rd['new_outside']}: "
                         + (f"every tunnel carried traffic again after {secs} s" if secs is not None
                            else "NOT every tunnel came back"))
    if result.transit_pairs:
        m = cells(result)
        for a, b, hub in result.transit_pairs:
            kinds = m.get((a, b), {})
            back = m.get((b, a), {})
            proven = [k for k in ("ping", "router_ping", "dns") if k in kinds or k in back]
            ok = all(kinds.get(k, True) and back.get(k, True) for k in proven) and bool(proven)
            what = ", ".join(k.replace("_", " ") for k in proven) or "nothing"
            lines.append(f"transit {a} -> {hub} -> {b} (both ways): {what} {'proven' if ok else 'FAILED'}")
    if result.unjoined_pairs:
        pairs = ", ".join(f"{a}-{b}" for a, b in result.unjoined_pairs[:8]) + (" ..." if len(result.unjoined_pairs) > 8 else "")
        lines.append(f"not proven: {len(result.unjoined_pairs)} pairs of sites that no tunnel joins ({pairs})")
    lines += libreswan_lines(result)
    lines += firewall_lines(result)
    for n in result.notes:
        lines.append(f"note: {n}")
    t = result.timings
    where = f"kernel {result.kernel}" + (f" ({result.kernel_origin})" if result.kernel_origin else "")
    where += (", Docker routers" if result.routers == "docker" else "")
    lines.append(f"{where}: boot {result.boot_seconds:.1f} s, " +
                 ", ".join(f"{k} {v} s" for k, v in t.items() if k != "inside_total") + f"; total {result.total_seconds:.1f} s")
    fw = "firewall active with drop policies" if result.firewall_exercised else "firewall NOT exercised"
    word = "PASS" if result.ok else "FAIL"
    lines.append(f"{word}: {passed}/{total} checks passed ({fw}); results in {results_dir}")
    return "\n".join(lines)


def firewall_lines(result: LabResult) -> list[str]:
    """Which firewall ran on each router: real firewalld (lab/firewalld.py), the lab's model, or none."""
    return [f"firewall: {n}: {what}" for n, what in sorted(result.firewalls.items())]


def junit(result: LabResult, path: Path) -> None:
    failures = len(result.failed()) + (1 if result.error else 0)
    cases = []
    for c in result.checks:
        name = f"{c.kind} {c.src} -> {c.dst}"
        body = "" if c.ok else (f"<failure message={quoteattr(c.evidence.get('why') or 'failed')}>"
                                f"{escape(json.dumps(c.evidence, sort_keys=True))}</failure>")
        cases.append(f'  <testcase classname="lab.{c.kind}" name={quoteattr(name)}>{body}</testcase>')
    if result.error:
        cases.append(f'  <testcase classname="lab" name="lab run"><error message={quoteattr(result.error)}/></testcase>')
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="wan-lab ({result.kernel})" tests="{len(cases)}" '
                    f'failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n")
