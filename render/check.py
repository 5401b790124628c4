"""Check rendered trees with the real tools: Libreswan's parser, dnsmasq, nft.

Nothing here touches the live system: Libreswan reads a wrapper that includes the staged files,
nft runs in a throw-away network namespace.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .manifest import Manifest
from .openwrt import dnsmasq_options, fw4_ruleset


@dataclass(frozen=True)
class CheckResult:
    router: str
    tool: str  # "libreswan", "algparse", "dnsmasq", "nft", "firewalld"
    ok: bool
    detail: str  # the tool's own words when it failed

    def __str__(self) -> str:
        return f"{self.router}: {self.tool}: {'ok' if self.ok else 'FAILED'}{'' if self.ok else chr(10) + self.detail}"


TOOLS = {"libreswan": "ipsec", "dnsmasq": "dnsmasq", "nft": "nft", "unshare": "unshare"}


def missing_tools() -> list[str]:
    return [f"{name} ({exe})" for name, exe in TOOLS.items() if shutil.which(exe) is None]


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def _as_checkable_by_4(conf: str) -> str:
    """A 5.x conf in the form Debian's 4.10 parses: `keyexchange=ikev2`, which 4.10 rejects
    (v4.12 keywords.c:76-78), becomes its 4.x equivalent; everything else is checked as written
    (`leftsubnets={a b}` is the same in both: render._subnets)."""
    return conf.replace("\tkeyexchange=ikev2\n", "\tikev2=insist\n")


def check_ipsec(router: str, tree: Path) -> list[CheckResult]:
    manifest_v5 = Manifest.read(tree / paths.MANIFEST).libreswan == 5
    with tempfile.TemporaryDirectory(prefix="wan-check-") as tmp:
        wrapper = Path(tmp) / "ipsec.conf"
        confdir = tree / paths.IPSEC_D
        if manifest_v5:
            staged = Path(tmp) / "ipsec.d"
            staged.mkdir()
            for f in sorted(confdir.glob("*.conf")):
                (staged / f.name).write_text(_as_checkable_by_4(f.read_text()))
            confdir = staged
        wrapper.write_text(f"include {confdir}/*.conf\n")
        r = _run(["ipsec", "addconn", "--config", str(wrapper), "--checkconfig"])
        # addconn exits 0 after some errors (a bad subnet): any message is a failure
        text = (r.stdout + r.stderr).strip()
        results = [CheckResult(router, "libreswan", r.returncode == 0 and not text, text.replace(tmp, "<staged>"))]
    proposals = set()
    for f in sorted((tree / paths.IPSEC_D).glob("*.conf")):
        for m in re.finditer(r"^\t(ike|esp)=(.+)$", f.read_text(), re.M):
            proposals.add((m.group(1), m.group(2)))
    bad = []
    for kind, value in sorted(proposals):
        r = _run(["ipsec", "algparse", "-v2", f"{kind}={value}"])
        if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
            bad.append(f"{kind}={value}: {(r.stdout + r.stderr).strip().splitlines()[-1]}")
    results.append(CheckResult(router, "algparse", not bad, "\n".join(bad)))
    return results


def check_dnsmasq(router: str, tree: Path) -> CheckResult:
    el = tree / paths.DNSMASQ_EL
    conf_text = el.read_text() if el.exists() else "\n".join(dnsmasq_options(tree)) + "\n"
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="wan-dnsmasq-") as f:
        f.write(conf_text)
        f.flush()
        r = _run(["dnsmasq", "--test", f"--conf-file={f.name}"])
    return CheckResult(router, "dnsmasq", r.returncode == 0, (r.stdout + r.stderr).strip())


def check_nft(router: str, tree: Path) -> CheckResult:
    el = tree / paths.NFT_EL
    ruleset = el.read_text() if el.exists() else fw4_ruleset(tree)
    with tempfile.NamedTemporaryFile("w", suffix=".nft", prefix="wan-nft-") as f:
        f.write(ruleset)
        f.flush()
        # a new network namespace: the host's own ruleset is never read nor touched
        r = _run(["unshare", "--net", "nft", "-c", "-f", f.name])
        detail = (r.stdout + r.stderr).strip().replace(f.name, "<ruleset>")
    return CheckResult(router, "nft", r.returncode == 0, detail)


def check_firewalld(router: str, tree: Path) -> CheckResult | None:
    """firewalld's zone and policy files are well-formed XML with the root element firewalld expects
    (firewalld itself does not run here: its own check, firewall-offline-cmd --check-config, is not run)."""
    files = sorted((tree / "etc/firewalld").rglob("*.xml")) if (tree / "etc/firewalld").is_dir() else []
    if not files:
        return None
    bad = []
    for f in files:
        want = "zone" if f.parent.name == "zones" else "policy"
        try:
            root = ET.parse(f).getroot()
            if root.tag != want:
                bad.append(f"{f.relative_to(tree)}: root element <{root.tag}>, firewalld wants <{want}>")
        except ET.ParseError as e:
            bad.append(f"{f.relative_to(tree)}: {e}")
    return CheckResult(router, "firewalld", not bad, "\n".join(bad))


def check_tree(router: str, tree: Path) -> list[CheckResult]:
    """Every check for one router's rendered tree."""
    fwd = check_firewalld(router, tree)
    return check_ipsec(router, tree) + [check_dnsmasq(router, tree), check_nft(router, tree)] + ([fwd] if fwd else [])


def check_out(out: Path) -> list[CheckResult]:
    results = []
    for tree in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        results.extend(check_tree(tree.name, tree))
    return results
