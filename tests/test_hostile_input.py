"""Property: any value in any field either renders files the real tools accept, or is refused
with a clear error (file, line, sentence); never a traceback, never a half-written tree."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from render.check import check_dnsmasq, check_ipsec
from render.errors import WanError
from render.render import render_wan, write_trees
from render.secrets import MasterKey
from render.validate import load_sites

from support import REPO

BASE = REPO / "tests/errors/overlapping-lans/sites"  # any small WAN; its paris.yaml is replaced below
SITE = {
    "name": "paris",
    "router": {"platform": "el", "libreswan": 4, "public_address": "203.0.113.30", "lan_address": "10.2.0.1"},
    "lans": ["10.2.0.0/24"],
    "dns": {"domain": "paris.acme.fr", "server": "10.2.0.53", "records": {"files": "10.2.0.20"}},
}
FIELDS = [("name",), ("router", "platform"), ("router", "libreswan"), ("router", "public_address"),
          ("router", "lan_address"), ("router", "ike_id"), ("lans", 0), ("dns", "domain"), ("dns", "server"),
          ("dns", "records", "files")]

hostile = st.one_of(
    st.sampled_from([
        "paris\nleftupdown=/bin/sh", "10.2.0.1 ; reboot", "$(reboot)", "`id`", "paris.acme.fr/#/6.6.6.6",
        "@x\n\tauto=start", "10.2.0.0/24\nconn evil", "..", "a" * 300, "", " ", "\x00", "\u202eevil", "0.0.0.0/0",
        "255.255.255.255", "10.2.0.0/8", "@", "@-x", "10.2.0.1/24", "01.2.3.4", "el\r\n", "PSK", "%any",
    ]),
    st.text(max_size=40),
    st.integers(min_value=-10, max_value=10),
    st.none(), st.booleans(), st.lists(st.text(max_size=5), max_size=3),
)


def _set(doc: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


@pytest.mark.skipif(os.geteuid() != 0 and shutil.which("ipsec") is None, reason="needs Libreswan")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=hostile)
def test_any_value_renders_checkable_files_or_is_refused_clearly(field, value):
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        shutil.copytree(BASE, sites)
        doc = yaml.safe_load(yaml.safe_dump(SITE))
        _set(doc, field, value)
        (sites / "paris.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        out = Path(tmp) / "out"
        try:
            wan = load_sites(sites)
        except WanError as e:
            assert e.problems
            for p in e.problems:
                assert p.file.endswith(".yaml") and p.line >= 1 and p.message
                assert "\n" not in str(p) and "\x00" not in str(p)
            return
        write_trees(render_wan(wan, MasterKey(b"h" * 32, "lab"), "prop"), out)
        for router in ("acme", "paris"):
            results = check_ipsec(router, out / router) + [check_dnsmasq(router, out / router)]
            assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
