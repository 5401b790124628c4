"""Bad input: each broken sites directory against the exact messages it must produce."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from render.errors import WanError
from render.validate import load_sites

from support import REPO, site_key

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


# --- hostile input: the layers behind the golden cases -------------------------------------------

PATTERN_EXAMPLES = {  # one valid value per pattern in schema/*.json
    "name": "paris", "ipv4": "10.1.2.3", "ipv4_subnet": "10.1.2.0/24", "domain": "acme.inc",
    "record_name": "hobbit", "ike_id": "@gw.acme.inc", "proposal": "aes_gcm256", "wan_name": "acme-wan",
    "public_address": "dynamic",
    "ckaid": "79b228c57b942ecd10db91fdd9024024e1b8e64e", "rsasigkey": "0sAwEAAdqmFCTf2M1R5lQ0bWoamw==",
}


def _patterns() -> dict[str, str]:
    import json
    found = {}

    def walk(node, key):
        if isinstance(node, dict):
            if "pattern" in node:
                found[key] = node["pattern"]
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
    for f in sorted((REPO / "schema").glob("*.schema.json")):
        doc = json.loads(f.read_text())
        walk(doc.get("$defs", {}), None)
        if "name" in doc.get("properties", {}) and "pattern" in doc["properties"]["name"]:
            found["wan_name" if f.name == "wan.schema.json" else "name"] = doc["properties"]["name"]["pattern"]
    return found


def test_every_schema_pattern_means_the_whole_string():
    """jsonschema applies `pattern` with re.search, where `$` also matches before a final newline:
    the validator must treat `$` as the end of the string for every pattern, present and future."""
    from render.validate import StrictValidator
    patterns = _patterns()
    assert set(patterns) == set(PATTERN_EXAMPLES), "a new pattern needs an example here"
    for key, pattern in patterns.items():
        assert pattern.startswith("^") and pattern.endswith("$"), (key, "unanchored: re.search would match a part")
        v = StrictValidator({"type": "string", "pattern": pattern})
        good = PATTERN_EXAMPLES[key]
        assert v.is_valid(good), key
        for bad in (good + "\n", "\n" + good, good + "\r\n", good + "\x00", good + " "):
            assert not v.is_valid(bad), (key, bad)


def test_integers_are_integers():
    from render.validate import StrictValidator
    v = StrictValidator({"type": "integer", "enum": [4, 5]})
    assert v.is_valid(5) and v.is_valid(4)
    for bad in (5.0, True, False, "5", None, 4.5):
        assert not v.is_valid(bad), bad


def _site(name: str, public: str, net: str, domain: str, platform: str = "el", extra: str = "") -> str:
    a, b, c, _ = net.split(".")
    k = site_key(name)
    return (f"name: {name}\nrouter:\n  platform: {platform}\n  libreswan: 4\n  public_address: {public}\n"
            f"  lan_address: {a}.{b}.{c}.1\n  key: {{ckaid: {k['ckaid']}, rsasigkey: '{k['rsasigkey']}'}}\n"
            f"{extra}lans: [{net}/24]\ndns:\n  domain: {domain}\n  server: {a}.{b}.{c}.53\n")


WAN_YAML = ("name: t\ntopology: mesh\ncrypto_profiles:\n  modern:\n    ike: [\"aes256-sha2_256;dh19\"]\n"
            "    esp: [\"aes_gcm256\"]\ndefaults:\n  crypto_profile: modern\n")


def test_files_that_are_not_site_files_are_refused_unread(tmp_path, capsys):
    """A symlink out of sites/ (to the release signing key, say), a FIFO, a directory and a key file
    copied in: each refused as such; validate prints none of their content and never blocks on the FIFO."""
    from render import cli
    secret = "RWRCSwAAAABzZWNyZXQtc2lnbmluZy1rZXktbm90LWZvci1wcmludGluZw"
    (tmp_path / ".wan-release.sec").write_text("untrusted comment: wan release secret key\n" + secret + "\n")
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "wan.yaml").write_text(WAN_YAML)
    (sites / "acme.yaml").write_text(_site("acme", "192.0.2.10", "10.1.2.0", "acme.inc"))
    (sites / "paris.yaml").symlink_to(tmp_path / ".wan-release.sec")
    (sites / "rome.yaml").write_text(secret + "\n")
    os.mkfifo(sites / "oslo.yaml")
    (sites / "home.yaml").mkdir()
    (sites / "berlin.yaml").symlink_to("acme.yaml")  # inside sites/: read (and refused for its name)
    assert cli.validate(str(sites)) == 1
    out, err = capsys.readouterr()
    assert secret not in out + err
    assert "paris.yaml: is a symbolic link to a file outside the sites directory" in err
    assert "rome.yaml:1: is not a site file" in err
    assert "oslo.yaml: is not a regular file" in err and "home.yaml: is not a regular file" in err
    assert "berlin.yaml" not in err  # a link inside sites/ is read like any file


def test_merge_keys_and_anchors_keep_yaml_meaning(tmp_path):
    """Merge keys stay usable: the mapping's own keys win over merged ones, as YAML defines."""
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "wan.yaml").write_text(
        "name: t\ntopology: mesh\ncrypto_profiles:\n  modern: &m\n    ike: [\"aes256-sha2_256;dh19\"]\n"
        "    esp: [\"aes_gcm256\"]\n    salifetime: 1800\n  other:\n    <<: *m\n    salifetime: 900\n"
        "defaults:\n  crypto_profile: other\n")
    (sites / "acme.yaml").write_text(_site("acme", "192.0.2.10", "10.1.2.0", "acme.inc"))
    (sites / "paris.yaml").write_text(_site("paris", "203.0.113.30", "10.2.0.0", "paris.acme.fr"))
    wan = load_sites(sites)
    assert wan.tunnels[0].crypto.name == "other" and wan.tunnels[0].crypto.salifetime == 900
    assert wan.tunnels[0].crypto.esp == ("aes_gcm256",)


def test_nested_site_domains_stay_valid_and_each_goes_to_its_own_server(tmp_path):
    """`branch.corp.example` beside `corp.example`: every router forwards each domain to the server of
    the site that owns it (dnsmasq picks the longest matching domain), on EL and on OpenWrt."""
    from render.render import render_wan
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "wan.yaml").write_text(WAN_YAML)
    (sites / "corp.yaml").write_text(_site("corp", "192.0.2.10", "10.1.2.0", "corp.example"))
    (sites / "branch.yaml").write_text(_site("branch", "203.0.113.30", "10.2.0.0", "branch.corp.example", "openwrt"))
    (sites / "shop.yaml").write_text(_site("shop", "198.51.100.7", "10.3.0.0", "shop.branch.corp.example"))
    wan = load_sites(sites)
    trees = render_wan(wan, "t")
    owner = {"corp.example": "10.1.2.53", "branch.corp.example": "10.2.0.53", "shop.branch.corp.example": "10.3.0.53"}
    for router, tree in trees.items():
        me = wan.site(router)
        text = b"".join(f.content for p, f in tree.items() if p.endswith(("dnsmasq.d/wan.conf", "wan/dnsmasq.conf"))).decode()
        forwards = dict(re.findall(r"server='?/([^/]+)/([0-9.]+)@", text))
        assert forwards == {d: s for d, s in owner.items() if d != me.dns.domain}, (router, forwards)


ALLOWED_IKE = ["aes256-sha2_256;dh19", "aes128-sha2_512;modp2048", "aes_gcm256-sha2_512;dh20", "aes_gcm_16_128;dh31",
               "aes_ctr192-sha2_384;ecp_384", "chacha20_poly1305-sha2_256;curve25519", "camellia256-sha2_512;dh21",
               "aes-256-sha2;modp3072", "aes_cbc_128-hmac_sha2_256;modp4096", "aes256-sha512;modp8192", "aes_gcm_c_256"]
ALLOWED_ESP = ["aes_gcm256", "aes_gcm_16_128", "aes_gcm256-null", "aes256-sha2_256", "aes128-sha2_512_256",
               "aes_ccm256", "chacha20poly1305", "camellia_ctr256-sha2", "aes256-sha2_384;dh19", "aes_ctr128-sha384"]


@pytest.mark.skipif(shutil.which("ipsec") is None, reason="needs Libreswan's algparse")
def test_the_crypto_allowlist_is_what_libreswan_accepts():
    """Every allowed form passes our check and Debian's `ipsec algparse` (4.10); every weak one is
    refused without `insecure:` and passes with it."""
    from render.crypto import check_proposal
    for kind, proposals in (("ike", ALLOWED_IKE), ("esp", ALLOWED_ESP)):
        for p in proposals:
            assert check_proposal(p, kind, frozenset()) == ([], set()), p
            r = subprocess.run(["ipsec", "algparse", "-v2", f"{kind}={p}"], capture_output=True, text=True)
            assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, (p, r.stdout + r.stderr)
    for kind, p, weak in (("esp", "null", "null"), ("esp", "3des-sha2_256", "3des"), ("ike", "aes256-md5;dh19", "md5"),
                          ("ike", "aes256-sha1;dh19", "sha1"), ("ike", "aes256-sha2_256;modp1536", "modp1536"),
                          ("esp", "aes_gmac", "null"), ("ike", "aes256-sha2_256;none", "null")):
        problems, used = check_proposal(p, kind, frozenset())
        assert used == {weak}, p
        assert check_proposal(p, kind, frozenset({weak})) == ([], {weak})


def test_an_insecure_profile_is_allowed_on_purpose_and_marked(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "wan.yaml").write_text(WAN_YAML.replace("defaults:", "  legacy:\n    ike: [\"aes256-sha1;modp2048\"]\n"
                                     "    esp: [\"aes256-sha1\"]\n    insecure: [sha1]\ndefaults:"))
    (sites / "acme.yaml").write_text(_site("acme", "192.0.2.10", "10.1.2.0", "acme.inc") + "overrides:\n  crypto_profile: legacy\n")
    (sites / "paris.yaml").write_text(_site("paris", "203.0.113.30", "10.2.0.0", "paris.acme.fr"))
    wan = load_sites(sites)
    assert wan.tunnels[0].crypto.insecure == ("sha1",)
    from render.plan import as_markdown, plan_trees
    from render.render import render_wan
    trees = render_wan(wan, "t")
    assert b"insecure: sha1" in trees["acme"]["etc/ipsec.d/acme-paris.conf"].content
    md = as_markdown(wan, plan_trees(trees, trees), "main")
    assert "**Weak crypto on purpose:** profile `legacy` allows sha1 (tunnels: acme-paris)" in md
