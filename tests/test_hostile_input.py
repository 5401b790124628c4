"""Property: any value in any field either renders files the real tools accept, or is refused with a
clear error (file, line, sentence); never a traceback, never a half-written tree.

Every string and number field of wan.yaml and of a site file gets hostile values: injections, control
characters at either end, look-alike letters, IPv6, reserved and edge addresses, public suffixes,
floats and booleans for integers, huge numbers, empty and very long values, weak crypto."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from render.check import check_dnsmasq, check_ipsec
from render.errors import WanError
from render.render import render_wan, write_trees
from render.validate import load_sites

from support import REPO, site_key

WAN = {
    "name": "small", "topology": "mesh",
    "crypto_profiles": {"modern": {"ike": ["aes256-sha2_256;dh19"], "esp": ["aes_gcm256"], "ikelifetime": 28800,
                                   "salifetime": 3600}},
    "defaults": {"crypto_profile": "modern", "dpd": {"delay": 10, "timeout": 60}, "dns_mode": "forward"},
}
ACME = {
    "name": "acme",
    "router": {"platform": "el", "libreswan": 4, "public_address": "192.0.2.10", "lan_address": "10.1.2.1",
               "key": site_key("acme")},
    "lans": ["10.1.2.0/24"],
    "dns": {"domain": "acme.inc", "server": "10.1.2.250", "records": {"hobbit": "10.1.2.42"}},
}
SITE = {
    "name": "paris",
    "router": {"platform": "el", "libreswan": 4, "public_address": "203.0.113.30", "lan_address": "10.2.0.1",
               "ike_id": "@gw.paris.acme.fr", "key": site_key("paris")},
    "lans": ["10.2.0.0/24", "10.2.1.0/24"],
    "dns": {"domain": "paris.acme.fr", "server": "10.2.0.53", "records": {"files": "10.2.0.20"}},
    "overrides": {"crypto_profile": "modern", "dpd": {"delay": 10, "timeout": 60}, "dns_mode": "hosts"},
}
# (file, path): every string and number of the two files; RECORD_KEY replaces the record's name
RECORD_KEY = ("paris.yaml", ("dns", "records", "<key>"))
FIELDS = [("paris.yaml", p) for p in (
    ("name",), ("router", "platform"), ("router", "libreswan"), ("router", "public_address"), ("router", "lan_address"),
    ("router", "ike_id"), ("router", "key", "ckaid"), ("router", "key", "rsasigkey"),
    ("lans", 0), ("lans", 1), ("dns", "domain"), ("dns", "server"), ("dns", "records", "files"),
    ("overrides", "crypto_profile"), ("overrides", "dpd", "delay"), ("overrides", "dpd", "timeout"),
    ("overrides", "dns_mode"))] + [RECORD_KEY] + [("wan.yaml", p) for p in (
    ("name",), ("topology",), ("crypto_profiles", "modern", "ike", 0), ("crypto_profiles", "modern", "esp", 0),
    ("crypto_profiles", "modern", "ikelifetime"), ("crypto_profiles", "modern", "salifetime"),
    ("defaults", "crypto_profile"), ("defaults", "dpd", "delay"), ("defaults", "dpd", "timeout"),
    ("defaults", "dns_mode"))]

KNOWN = [
    # injections into the files we write
    "paris\nleftupdown=/bin/sh", "10.2.0.1 ; reboot", "$(reboot)", "`id`", "paris.acme.fr/#/6.6.6.6",
    "@x\n\tauto=start", "10.2.0.0/24\nconn evil", "aes256\nesp=null", "paris.acme.fr/\nserver=/#/6.6.6.6",
    "aes256-sha2_256;dh19 also=x", "'", '"', "%any", "%defaultroute", "PSK", "include /etc/shadow",
    # control and format characters, at either end and inside
    "paris\n", "\nparis", "paris\r", "par\x00is", "par\x1b[2Jis", "\u202eevil", "pa\u200bris", "\ufeffparis", "pa\u2028ris",
    "10.2.0.53\n", "aes_gcm256\n", "@gw.paris.acme.fr\n", "mesh\n", "forward\n", "el\r\n",
    # look-alikes and unicode digits
    "p\u0430ris", "PARIS", "paris.acme.fr.", "\u0661\u0660.2.0.1", "10.2.0.\u0661", "ｐａｒｉｓ",
    # addresses: reserved, edge, IPv6, malformed
    "0.0.0.0", "0.0.0.0/0", "127.0.0.1", "255.255.255.255", "224.0.0.5", "169.254.1.1", "240.0.0.1", "100.64.0.1",
    "10.2.0.0", "10.2.0.255", "10.2.0.0/8", "10.2.0.1/24", "10.2.0.0/33", "01.2.3.4", "1.2.3", "1.2.3.4.5",
    "2001:db8::1", "fd00::/64", "::ffff:10.2.0.1", "10.2.0.53/32", "10.2.1.0/24", "10.1.2.0/24", "192.0.2.10",
    "203.0.113.30",
    # domains
    "com", "co.uk", "github.io", "lan", "acme.inc", "corp.example", "x.acme.inc", "a" * 64 + ".example", "xn--p1ai",
    "-paris.fr", "paris-.fr", "a..b", "*.acme.fr",
    # names, ids, profiles
    "..", "", " ", "-", "a" * 300, "@", "@-x", "@paris", "hub-and-spoke", "hosts", "modern", "legacy", "acme",
    # crypto
    "null", "3des", "aes256-md5;dh19", "aes256-sha1;modp1024", "aes_gcm256-sha2_256", "aes256-sha2_256;modp1536",
    "chacha20poly1305", "aes_ccm256", "aes256-sha2_256;dh19;dh20",
]
# values valid somewhere, so that many examples get through to the real tools
PLAUSIBLE = ["paris", "el", "openwrt", "hosts", "forward", "mesh", "modern", 4, 5, 1, 30, 3600, 86400, "10.2.0.54",
             "10.2.0.2", "10.2.1.0/24", "10.2.2.0/23", "172.16.0.0/12", "100.64.7.7", "198.51.100.99", "@gw2.paris.acme.fr",
             "203.0.113.31", "paris-eu.acme.fr", "x1.y2", "aes_gcm128", "aes256-sha2_512;dh20", "aes_gcm256-sha2_512;dh31",
             "aes_ctr192-sha2_384;ecp_384", "aes_ccm256", "chacha20poly1305", "camellia_ctr256-sha2", "a" * 24, "b-c",
             "db.internal", "a1", "0", "x" * 63]
ALTS = {  # by the field's last key: values that may be valid there
    "name": ["paris", "small", "a" * 24, "b-c", "x1"], "platform": ["el", "openwrt"], "libreswan": [4, 5],
    "public_address": ["203.0.113.31", "100.64.7.7", "198.51.100.99", "10.9.9.9"],
    "lan_address": ["10.2.0.2", "10.2.1.1", "10.2.0.254", "10.2.1.254"], "ike_id": ["@gw2.paris.acme.fr", "@x", "203.0.113.30", "203.0.113.99"],
    "lans": ["10.2.1.0/24", "10.2.2.0/23", "172.16.0.0/12", "10.2.0.0/25", "10.3.0.0/16"],
    "domain": ["paris-eu.acme.fr", "x1.y2", "corp.example", "branch.acme.inc", "x" * 63 + ".example"],
    "server": ["10.2.0.54", "10.2.1.53", "10.2.0.2"], "files": ["10.2.0.21", "192.0.2.99", "10.2.1.77"],
    "<key>": ["db.internal", "a1", "0", "x" * 63, "a-b.c-d"], "crypto_profile": ["modern"],
    "delay": [1, 30, 3600], "timeout": [1, 120, 86400], "dns_mode": ["forward", "hosts"], "topology": ["mesh"],
    "ike": ["aes256-sha2_512;dh20", "aes_gcm256-sha2_512;dh31", "aes_ctr192-sha2_384;ecp_384", "chacha20poly1305;dh19",
            "camellia128-sha2_256;modp3072"],
    "esp": ["aes_gcm128", "aes_ccm256", "chacha20poly1305", "camellia_ctr256-sha2", "aes256-sha2_512;dh19", "aes128-sha384"],
    "ikelifetime": [60, 3600, 86400], "salifetime": [60, 1800, 86400],
    "ckaid": [site_key("extra1")["ckaid"], site_key("acme")["ckaid"], "0" * 40],
    "rsasigkey": [site_key("extra1")["rsasigkey"], site_key("acme")["rsasigkey"], "0sAwEAAQ==",
                  site_key("paris")["rsasigkey"][:200], site_key("paris")["rsasigkey"] + "\n\tauto=start"],
}
hostile = st.one_of(
    st.sampled_from(KNOWN), st.sampled_from(PLAUSIBLE),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), max_size=30),
    st.integers(min_value=-10, max_value=10), st.integers(), st.sampled_from([0, 4, 5, 59, 60, 3600, 86400, 86401, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([4.0, 5.0, 60.0]),
    st.none(), st.booleans(), st.lists(st.text(max_size=5), max_size=3), st.just([]), st.just({}),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)


def _set(doc: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _write(sites: Path, field, value) -> None:
    wan, acme, paris = (yaml.safe_load(yaml.safe_dump(d)) for d in (WAN, ACME, SITE))
    docs = {"wan.yaml": wan, "acme.yaml": acme, "paris.yaml": paris}
    file, path = field
    if field == RECORD_KEY:
        paris["dns"]["records"] = {value if isinstance(value, (str, int, float, bool)) or value is None else str(value): "10.2.0.20"}
    else:
        _set(docs[file], path, value)
    for name, d in docs.items():
        (sites / name).write_text(yaml.safe_dump(d, allow_unicode=True))


@pytest.mark.skipif(os.geteuid() != 0 and shutil.which("ipsec") is None, reason="needs Libreswan")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_renders_checkable_files_or_is_refused_clearly(data):
    field = data.draw(st.sampled_from(FIELDS), label="field")
    # half of the time a value that is valid in this field somewhere, so many get through to the tools
    alts = ALTS.get(field[1][-1] if isinstance(field[1][-1], str) else field[1][-2], [])
    value = data.draw(st.sampled_from(alts) if alts and data.draw(st.booleans()) else hostile, label="value")
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        sites.mkdir()
        _write(sites, field, value)
        out = Path(tmp) / "out"
        try:
            wan = load_sites(sites)
        except WanError as e:
            event("refused")
            assert e.problems
            for p in e.problems:
                assert p.file.endswith(".yaml") and p.line >= 1 and p.message
                text = str(p)
                assert text.isprintable() and text.isascii(), text  # nothing hostile reaches a terminal
            return
        event("rendered and checked")
        write_trees(render_wan(wan, "prop"), out)
        for router in ("acme", "paris"):
            results = check_ipsec(router, out / router) + [check_dnsmasq(router, out / router)]
            assert all(r.ok for r in results), (field, value, [str(r) for r in results if not r.ok])


def test_the_property_base_wan_is_valid():
    """The property's starting point must be valid, or every example would only test refusals."""
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        sites.mkdir()
        _write(sites, FIELDS[0], "paris")
        wan = load_sites(sites)
        assert [s.name for s in wan.sites] == ["acme", "paris"]


@pytest.mark.parametrize("name", ["par\nis.yaml", "par\x1b[2Jis.yaml", "p\u0430ris.yaml", "Paris.yaml", "pa ris.yaml"])
def test_file_names_are_escaped_in_messages_and_refused(tmp_path, name):
    sites = tmp_path / "sites"
    shutil.copytree(REPO / "tests/errors/overlapping-lans/sites", sites)
    (sites / "paris.yaml").rename(sites / name)
    with pytest.raises(WanError) as info:
        load_sites(sites)
    text = str(info.value)
    assert all(line.isascii() and line.isprintable() for line in text.splitlines())
    assert any("is not named <site>.yaml" in p.message for p in info.value.problems)
    assert "\x1b" not in text and "\u0430" not in text and len(text.splitlines()) == len(info.value.problems)
