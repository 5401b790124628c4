"""From a sites directory to the WAN model: schema first, then what a schema cannot say.

Every problem is collected (not just the first) and reported with file, line and a fix.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

from . import crypto, hostkey
from .errors import Problem, WanError, show
from .hostkey import HostKey
from .load import Document, load_yaml, printable, where
from .model import CryptoProfile, Dns, Dpd, Router, Site, Wan
from .topology import plan_transits, plan_tunnels

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
DEFAULT_DPD = {"delay": 10, "timeout": 60}
NAME = re.compile(r"[a-z][a-z0-9_]{0,23}\Z")  # schema/defs.schema.json#/$defs/name, anchored for Python

# Addresses that are never a router's, a LAN's or a host's (RFC 6890 special-purpose registry).
# 100.64.0.0/10 (CGNAT, RFC 6598) is deliberately absent: a site behind CGNAT has such an address.
RESERVED = (
    (IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (IPv4Network("255.255.255.255/32"), "the limited broadcast address"),
    (IPv4Network("240.0.0.0/4"), "reserved class E space (240.0.0.0/4)"),
)


def reserved(x: IPv4Address | IPv4Network) -> str | None:
    """What reserved range `x` (an address, or a subnet overlapping one) falls in, or None."""
    for net, what in RESERVED:
        if (x in net) if isinstance(x, IPv4Address) else x.overlaps(net):
            return what
    return None


def _ecma_pattern(pattern: str) -> re.Pattern:
    r"""A JSON Schema (ECMA 262) pattern for Python's `re.search`: `$` there matches only at the very
    end, in Python also before a final newline ("name\n" would pass `^[a-z]+$`); so each unescaped
    `$` outside a character class becomes `\Z`."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        out.append("\\Z" if c == "$" and not in_class else c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return _ecma_pattern(pattern)


# bool is an int in Python, and jsonschema counts 5.0 as an integer: neither is one here.
_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many({
    "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda _, x: isinstance(x, (int, float)) and not isinstance(x, bool),
})
StrictValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern},
                                                type_checker=_TYPES)


@lru_cache(maxsize=None)
def _validators() -> dict[str, jsonschema.protocols.Validator]:
    resources = []
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        schemas[path.name] = schema
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry = Registry().with_resources(resources)
    cls = StrictValidator
    return {
        "wan": cls(schemas["wan.schema.json"], registry=registry),
        "site": cls(schemas["site.schema.json"], registry=registry),
    }


def _fix(schema: dict) -> str:
    hint = schema.get("x-fix")
    return f"; {hint}" if hint else ""


def schema_problems(doc: Document, kind: str) -> list[Problem]:
    """Validate a loaded document against its schema; one Problem per error, at the value's line."""
    problems = []
    errors = list(_validators()[kind].iter_errors(doc.data))
    # a value of the wrong type also fails its enum or pattern: say only what is wrong first
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    for err in errors:
        path = tuple(err.absolute_path)
        v = err.validator
        if path in mistyped and v != "type":
            continue
        if v == "required":
            missing = [k for k in err.validator_value if not isinstance(err.instance, dict) or k not in err.instance]
            for key in missing:
                problems.append(Problem(doc.file, doc.line(path), where(path) or "(top level)",
                                        f"missing required key {key!r}; add it (see sites/ in the repository for an example)"))
            continue
        if v == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            extras = [k for k in err.instance if k not in err.schema.get("properties", {})]
            for key in extras:
                p = path + (key,)
                hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
                problems.append(Problem(doc.file, doc.line(p), where(p),
                                        f"unknown key {show(key)}; remove it or fix its spelling{hint}"))
            continue
        schema = err.schema
        if not path and v == "type":
            # the file is not a mapping: say so without showing it (it may be a key file linked in by mistake)
            problems.append(Problem(doc.file, doc.line(path), "", f"is not a {kind} file: its top level is not a "
                                    "mapping of keys; see sites/ for an example (its content is not shown)"))
            continue
        if v in ("pattern", "maxLength", "minLength") and isinstance(err.instance, str) and "x-ipv6" in schema \
                and _is_ipv6(err.instance):
            problems.append(Problem(doc.file, doc.line(path), where(path), f"{show(err.instance)}: {schema['x-ipv6']}"))
        elif v in ("pattern", "maxLength", "minLength") and isinstance(err.instance, str):
            # propertyNames errors point at the mapping; name the key itself
            key_path = path + (err.instance,) if _is_name_error(err) else path
            problems.append(Problem(doc.file, doc.line(key_path), where(key_path),
                                    f"{show(err.instance)} is not allowed{_fix(schema)}"))
        elif v == "enum":
            choices = ", ".join(json.dumps(c) for c in err.validator_value)
            problems.append(Problem(doc.file, doc.line(path), where(path),
                                    f"{show(err.instance)} is not one of {choices}{_fix(schema)}"))
        elif v == "type":
            problems.append(Problem(doc.file, doc.line(path), where(path),
                                    f"{show(err.instance)} should be {_article(err.validator_value)}{_fix(schema)}"))
        elif v in ("minimum", "maximum"):
            problems.append(Problem(doc.file, doc.line(path), where(path),
                                    f"{show(err.instance)} is {'below the minimum' if v == 'minimum' else 'above the maximum'} {err.validator_value}"))
        elif v in ("minItems", "maxItems", "minProperties"):
            problems.append(Problem(doc.file, doc.line(path), where(path),
                                    f"{_count_msg(v, err.validator_value)}"))
        elif v == "uniqueItems":
            problems.append(Problem(doc.file, doc.line(path), where(path), "lists the same item twice; remove the repeat"))
        else:
            problems.append(Problem(doc.file, doc.line(path), where(path), f"{err.message}{_fix(schema)}"))
    return problems


def _is_ipv6(text: str) -> bool:
    try:
        return (ip_network(text, strict=False) if "/" in text else ip_address(text)).version == 6
    except ValueError:
        return False


def _is_name_error(err) -> bool:
    e = err
    while e is not None:
        if e.validator == "propertyNames":
            return True
        e = e.parent
    return any(p == "propertyNames" for p in err.schema_path)


def _article(t) -> str:
    names = {"string": "a string (quote it)", "integer": "a whole number", "object": "a mapping of keys to values",
             "array": "a list", "number": "a number", "boolean": "true or false"}
    if isinstance(t, list):
        return " or ".join(names.get(x, x) for x in t)
    return names.get(t, t)


def _count_msg(v: str, n: int) -> str:
    return {"minItems": f"needs at least {n} item(s)", "maxItems": f"allows at most {n} items",
            "minProperties": f"needs at least {n} entry"}[v]


def load_sites(sites_dir: Path | str) -> Wan:
    """Load, validate and model a sites directory; raise WanError listing every problem."""
    sites_dir = Path(sites_dir)
    shown = _display_dir(sites_dir)
    if not sites_dir.is_dir():
        raise WanError([Problem(shown, 0, "", "is not a directory; pass --sites DIR with wan.yaml and one <site>.yaml per site")])
    problems: list[Problem] = []
    wan_path = sites_dir / "wan.yaml"
    if not wan_path.exists() and not wan_path.is_symlink():
        raise WanError([Problem(f"{shown}/wan.yaml", 0, "", "missing; every sites directory needs wan.yaml (see sites/wan.yaml)")])
    for odd in sorted(sites_dir.glob("*.yml")):
        problems.append(Problem(f"{shown}/{printable(odd.name)}", 0, "", "ignored extension .yml; rename it to .yaml"))

    docs: list[Document] = []
    wan_doc = None
    inside = sites_dir.resolve()
    for path in [wan_path] + sorted(p for p in sites_dir.glob("*.yaml") if p.name != "wan.yaml"):
        display = f"{shown}/{printable(path.name)}"
        kind = "wan" if path.name == "wan.yaml" else "site"
        if kind == "site" and not NAME.match(path.name[:-len(".yaml")]):
            problems.append(Problem(display, 0, "", "is not named <site>.yaml with a valid site name (1-24 lower-case "
                                    "letters, digits and '_', starting with a letter); rename it (it was not read)"))
            continue
        if path.is_symlink() and not _within(path, inside):
            problems.append(Problem(display, 0, "", "is a symbolic link to a file outside the sites directory; it was not "
                                    "read; copy the site file into the directory instead"))
            continue
        try:
            doc = load_yaml(path, display)
        except WanError as e:
            problems.extend(e.problems)
            continue
        found = schema_problems(doc, kind)
        problems.extend(found)
        if found:
            continue
        if kind == "wan":
            wan_doc = doc
        else:
            docs.append(doc)
    if wan_doc is None or problems:
        raise WanError(problems)
    if not docs:
        raise WanError([Problem(f"{shown}/wan.yaml", 1, "", "the WAN has no sites; add a <site>.yaml beside wan.yaml")])

    wan_model, problems = _semantics(wan_doc, docs, shown)
    if problems:
        raise WanError(problems)
    return wan_model


def _within(path: Path, directory: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(directory)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _display_dir(d: Path) -> str:
    try:
        return printable(str(d.resolve().relative_to(Path.cwd().resolve())))
    except ValueError:
        return printable(str(d))


@lru_cache(maxsize=1)
def _public_suffixes():
    # The Public Suffix List as shipped inside the pinned `publicsuffixlist` wheel (requirements.txt):
    # the same list on every machine, so validation and rendering stay deterministic; it is updated
    # by bumping the pin, never fetched at run time.
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


def public_suffix(domain: str) -> bool:
    """True for a domain under which anyone may register names: `com`, `co.uk`, `github.io`, and any
    single label (the list's implicit `*` rule: an unknown top-level domain is a suffix too)."""
    return "." not in domain or bool(_public_suffixes().is_public(domain))


def _address_problems(P, doc: Document, path: tuple, addr: IPv4Address, what: str) -> None:
    why = reserved(addr)
    if why:
        P(doc, path, f"{addr} is {why}, never {what}; use a unicast address")


def _semantics(wan_doc: Document, docs: list[Document], shown: str) -> tuple[Wan | None, list[Problem]]:
    problems: list[Problem] = []
    w = wan_doc.data
    P = lambda doc, path, msg: problems.append(Problem(doc.file, doc.line(path), where(path), msg))  # noqa: E731

    profiles = {}
    for name, p in w["crypto_profiles"].items():
        insecure = frozenset(p.get("insecure", ()))
        used: set[str] = set()
        for kind in ("ike", "esp"):
            for i, proposal in enumerate(p[kind]):
                found, weak = crypto.check_proposal(proposal, kind, insecure)
                used |= weak
                for msg in found:
                    P(wan_doc, ("crypto_profiles", name, kind, i), f"{show(proposal)}: {msg}")
                for alg in sorted(weak - insecure):
                    P(wan_doc, ("crypto_profiles", name, kind, i),
                      f"{show(proposal)} uses {alg} ({crypto.WHY[alg]}); use a strong proposal such as "
                      f"{'aes256-sha2_256;dh19' if kind == 'ike' else 'aes_gcm256'}, or, on purpose, list {alg} under "
                      f"crypto_profiles.{name}.insecure")
        for i, alg in enumerate(p.get("insecure", ())):
            if alg not in used:
                P(wan_doc, ("crypto_profiles", name, "insecure", i),
                  f"{alg} is allowed here but no proposal of this profile uses it; remove it from insecure")
        profiles[name] = CryptoProfile(name, tuple(p["ike"]), tuple(p["esp"]), p.get("ikelifetime", 28800),
                                       p.get("salifetime", 3600), tuple(sorted(insecure)))
    defaults = w["defaults"]
    if defaults["crypto_profile"] not in profiles:
        P(wan_doc, ("defaults", "crypto_profile"),
          f"crypto profile {show(defaults['crypto_profile'])} is not defined; define it under crypto_profiles or use one of: {', '.join(sorted(profiles))}")

    seen_names: dict[str, Document] = {}
    seen_public: dict[IPv4Address, Document] = {}
    seen_ids: dict[str, tuple[Document, str]] = {}
    seen_domains: dict[str, Document] = {}
    seen_keys: dict[str, tuple[Document, str]] = {}  # CKAID -> the site file and the key's place in it
    all_lans: list[tuple[IPv4Network, Document, int]] = []
    records: list[tuple[str, Document, tuple]] = []  # (fully qualified name, doc, path)
    sites: list[Site] = []
    for doc in docs:
        d = doc.data
        name = d["name"]
        stem = Path(doc.file).stem
        if stem != name:
            P(doc, ("name",), f"site name {show(name)} does not match the file name {Path(doc.file).name}; rename the file to {name}.yaml or the site to {stem!r}")
        if name in seen_names:
            P(doc, ("name",), f"site name {show(name)} is already used by {seen_names[name].file}; site names must be unique")
        seen_names.setdefault(name, doc)

        r = d["router"]
        if r["platform"] == "openwrt" and r["libreswan"] != 4:
            # field-facts.md W8/W9: openwrt/packages net/libreswan is 4.12 on 23.05, 24.10 and master
            P(doc, ("router", "libreswan"), f"OpenWrt ships Libreswan 4 (4.12 in its package feed), not {r['libreswan']}; "
              "use libreswan: 4 for an OpenWrt router")
        release, firewall = _platform(P, doc, r)
        public = None if r["public_address"] == "dynamic" else IPv4Address(r["public_address"])
        if public is None:
            _dynamic_problems(P, doc, r)
        else:
            _address_problems(P, doc, ("router", "public_address"), public, "a router's public address")
            if public in seen_public:
                P(doc, ("router", "public_address"), f"{public} is already the public address of {seen_public[public].file}; each router needs its own")
            seen_public.setdefault(public, doc)

        lans: list[IPv4Network] = []
        for i, text in enumerate(d["lans"]):
            net = ip_network(text, strict=False)
            if str(net) != text:
                P(doc, ("lans", i), f"{text} has host bits set; write the network address {net}")
            why = reserved(net)
            if why:
                P(doc, ("lans", i), f"{net} overlaps {why}, which is never a LAN; use a private range such as 10.x.y.0/24")
            lans.append(net)
            all_lans.append((net, doc, i))

        lan_address = IPv4Address(r["lan_address"])
        _address_problems(P, doc, ("router", "lan_address"), lan_address, "a router's LAN address")
        if not any(lan_address in n for n in lans):
            P(doc, ("router", "lan_address"), f"{lan_address} is outside the site's LANs ({', '.join(map(str, lans))}); use the router's address in one of them")
        elif _edge(lan_address, lans):
            P(doc, ("router", "lan_address"), f"{lan_address} is the network or broadcast address of {_edge(lan_address, lans)}; use a host address")
        dns = d["dns"]
        server = IPv4Address(dns["server"])
        _address_problems(P, doc, ("dns", "server"), server, "a DNS server's address")
        if not any(server in n for n in lans):
            P(doc, ("dns", "server"), f"{server} is outside the site's LANs ({', '.join(map(str, lans))}); the DNS server must sit in one of them so the tunnels reach it")
        elif _edge(server, lans):
            P(doc, ("dns", "server"), f"{server} is the network or broadcast address of {_edge(server, lans)}; name the DNS server host's own address")
        # dns.server == router.lan_address: the router's own dnsmasq is the LAN's DNS server (the how-to's
        # OpenWrt router); the peers forward the domain to that address through the tunnel (a router-DNS site)
        domain = dns["domain"]
        if public_suffix(domain):
            P(doc, ("dns", "domain"), f"{domain} is a public suffix (a top-level domain or a name on the Public Suffix "
              f"List): every router would send all names under it to this site; use a domain of the site's own under "
              f"it, such as {name.replace('_', '-')}.{domain if '.' in domain else 'example.com'}")
        if domain in seen_domains:
            P(doc, ("dns", "domain"), f"domain {domain} is already served by {seen_domains[domain].file}; each site serves its own domain")
        seen_domains.setdefault(domain, doc)
        for rname, raddr in dns.get("records", {}).items():
            rpath = ("dns", "records", rname)
            _address_problems(P, doc, rpath, IPv4Address(raddr), "a host's address")
            fqdn = f"{rname}.{domain}"
            if len(fqdn) > 253:
                P(doc, rpath, f"{printable(rname)}.{domain} is longer than the 253 characters a DNS name may have; shorten it")
            records.append((fqdn, doc, rpath))

        ov = d.get("overrides", {})
        if "crypto_profile" in ov and ov["crypto_profile"] not in profiles:
            P(doc, ("overrides", "crypto_profile"),
              f"crypto profile {show(ov['crypto_profile'])} is not defined in wan.yaml; use one of: {', '.join(sorted(profiles))}")
        ike_id = r.get("ike_id", str(public) if public is not None else f"@{name}")
        if "ike_id" in r and not ike_id.startswith("@"):
            _address_problems(P, doc, ("router", "ike_id"), IPv4Address(ike_id), "a router's IKE id")
        if ike_id in seen_ids and not ("ike_id" not in r and seen_ids[ike_id][1].endswith("(its public address)")):
            other, how = seen_ids[ike_id]
            P(doc, ("router", "ike_id") if "ike_id" in r else ("router", "public_address"),
              f"IKE id {ike_id} is already {how} of {other.file}; each router needs its own IKE id "
              "(its peers pick the tunnel and the key by it): set a distinct router.ike_id")
        seen_ids.setdefault(ike_id, (doc, "the ike_id" if "ike_id" in r else "the IKE id (its public address)"))
        keys = {field: _host_key(P, doc, field, r[field], seen_keys) for field in KEY_FIELDS if field in r}
        if "next_key" in r and "previous_key" in r:
            P(doc, ("router", "next_key"), "a rollover is under way (previous_key is set): retire previous_key in "
              "one release before adding a next_key (docs/keys.md)")
        sites.append(Site(
            name=name, file=doc.file,
            router=Router(r["platform"], r["libreswan"], public, lan_address, ike_id,
                          keys["key"], keys.get("next_key"), keys.get("previous_key"), release, firewall),
            lans=tuple(lans),
            dns=Dns(domain, server, tuple(sorted((k, IPv4Address(v)) for k, v in dns.get("records", {}).items()))),
            crypto_profile=ov.get("crypto_profile"),
            dpd=Dpd(**ov.get("dpd", defaults.get("dpd", DEFAULT_DPD))),
            dns_mode=ov.get("dns_mode", defaults.get("dns_mode", "forward")),
        ))

    # A public address used as another site's ike_id: the default id of that site is its address.
    for public, pdoc in seen_public.items():
        other = seen_ids.get(str(public))
        if other and other[0] is not pdoc and other[1] == "the ike_id":
            P(other[0], ("router", "ike_id"), f"IKE id {public} is the public address (and so the IKE id) of {pdoc.file}; "
              "use this router's own address or an @name")

    # A router-DNS site's names reach a router in hosts mode only as records: its DHCP names cannot be
    # written there. With no records, nothing of its domain would resolve at such a router.
    # Every other site counts (not only its tunnel peers): with transit through a hub, spokes resolve each
    # other's domains too.
    for s, doc in ((s, next(d for d in docs if d.file == s.file)) for s in sites):
        if not s.router_dns or s.dns.records:
            continue
        hosts = (["this site"] if s.dns_mode == "hosts" else []) + \
            [o.name for o in sites if o.name != s.name and o.dns_mode == "hosts"]
        if hosts:
            who = ", ".join(hosts[:-1]) + " and " + hosts[-1] if len(hosts) > 1 else hosts[0]
            P(doc, ("dns", "server"), f"{s.dns.server} is this site's router (a router-DNS site) and dns.records is empty, "
              f"while {who} {'uses' if len(hosts) == 1 else 'use'} dns_mode: hosts, where only a site's records are "
              f"written into the routers (not its DHCP names): nothing in {s.dns.domain} would resolve there; add the "
              "names the other sites need under dns.records, or use dns_mode: forward (overrides.dns_mode, or "
              "defaults.dns_mode in wan.yaml)")

    # A record inside another site's domain: the other routers send that name to the other site.
    for fqdn, doc, rpath in records:
        for domain, ddoc in seen_domains.items():
            if ddoc is not doc and (fqdn == domain or fqdn.endswith("." + domain)) \
                    and len(domain) > len(doc.data["dns"]["domain"]):
                P(doc, rpath, f"{printable(fqdn)} lies inside {domain}, the domain of {ddoc.file}: the other routers "
                  f"ask that site's DNS server for it; move the record there")

    # LANs must not overlap each other (within or across sites) nor contain a public address
    all_lans.sort(key=lambda x: (x[1].file, x[2]))
    for i, (net, doc, idx) in enumerate(all_lans):
        for other, odoc, oidx in all_lans[:i]:
            if net.overlaps(other):
                of = "" if odoc is doc else f" of {odoc.file}"
                P(doc, ("lans", idx), f"{net} overlaps lans[{oidx}] {other}{of}; give every LAN its own address range")
        for public, pdoc in seen_public.items():
            if public in net:
                P(doc, ("lans", idx), f"{net} contains {public}, the public address of {pdoc.file}; a LAN may not contain a router's public address")

    hubs = tuple(w.get("hubs", []))
    if w["topology"] == "hub-and-spoke":
        if not hubs:
            P(wan_doc, ("topology",), "hub-and-spoke needs at least one hub; list the hub sites under hubs:")
        for i, h in enumerate(hubs):
            if h not in seen_names:
                P(wan_doc, ("hubs", i), f"hub {show(h)} is not a site; add sites/{h}.yaml or use one of: {', '.join(sorted(seen_names))}")
    elif hubs:
        P(wan_doc, ("hubs",), "hubs are only used with topology: hub-and-spoke; remove them or change the topology")
    if len(sites) < 2:
        P(wan_doc, (), "a WAN needs at least two sites; add another <site>.yaml")
    problems.extend(_dynamic_pairs(w["topology"], hubs, sites, {d.data["name"]: d for d in docs}))

    if problems:
        return None, problems

    sites.sort(key=lambda s: s.name)
    tunnels, tproblems = plan_tunnels(w["topology"], hubs, sites, profiles, defaults["crypto_profile"],
                                      {s.name: doc for s, doc in zip(sites, sorted(docs, key=lambda d: d.data["name"]))})
    problems.extend(tproblems)
    return Wan(w["name"], w["topology"], hubs, tuple(sites), tunnels, shown,
               release_valid_days=w.get("release", {}).get("valid_days", 90),
               transits=plan_transits(w["topology"], hubs, tunnels)), problems


KEY_FIELDS = ("key", "next_key", "previous_key")


def _dynamic_problems(P, doc: Document, r: dict) -> None:
    """A dynamic router is known to its peers only by its IKE id: its address is not (its peers accept
    it from any address, `right=%any`, and pick the conn and the key by `rightid`)."""
    ike_id = r.get("ike_id")
    if ike_id is None:
        P(doc, ("router", "public_address"), "a router with a dynamic public address needs an explicit IKE id: its "
          "peers accept it from any address and know it only by that id; add ike_id: @<a name of its own> under "
          "router (such as @" + doc.data["name"].replace("_", "-") + "-gw." + str(doc.data.get("dns", {}).get("domain", "example.net")) + ")")
    elif not ike_id.startswith("@"):
        P(doc, ("router", "ike_id"), f"{ike_id} is an address, but this router's public address is dynamic (behind NAT, "
          "its address is not its own and changes); use an @name id such as @" + doc.data["name"].replace("_", "-") + "-gw")


def _dynamic_pairs(topology: str, hubs: tuple[str, ...], sites: list[Site], docs: dict[str, Document]) -> list[Problem]:
    """Two dynamic sites the topology would join by a tunnel: neither knows where the other is, and
    behind NAT neither can be reached, so no end could start it."""
    problems = []
    dynamic = sorted(s.name for s in sites if s.router.dynamic)
    for i, b in enumerate(dynamic):
        for a in dynamic[:i]:
            if topology == "hub-and-spoke" and a not in hubs and b not in hubs:
                continue  # spokes get no tunnel between them
            doc = docs[b]
            how = ("a mesh joins every pair of sites directly" if topology == "mesh"
                   else f"{'both are hubs' if a in hubs and b in hubs else 'a hub and its spoke are joined directly'}")
            fix = ("give one of them a fixed public address, or use topology: hub-and-spoke with a hub that has a "
                   "fixed address, so neither needs a tunnel to the other" if topology == "mesh"
                   else "a hub needs a fixed public address: give it one, or make another site with a fixed address the hub")
            problems.append(Problem(doc.file, doc.line(("router", "public_address")), where(("router", "public_address")),
                                    f"{b} and {a} ({docs[a].file}) both have a dynamic public address and {how}: neither "
                                    f"knows the other's address (behind NAT neither can even be reached), so no end could "
                                    f"start their tunnel; {fix}"))
    return problems

# The platform releases a router may run, what is rendered for each (docs/platforms.md), and the default
# when a site file does not say. OpenWrt: 24.10 is the current stable series; 23.05 differs in what we
# must do to its stock files (openwrt/packages openwrt-23.05 net/libreswan/files/ipsec.conf:6-25 and
# ipsec.secrets:9: IKEv1 conns, includes commented out, a catch-all PSK), so a 23.05 router must say so.
# EL: 8, 9 and 10 (firewalld with policy objects, nftables, crypto-policies on all three); EL 7 and
# older (iptables firewalld backend, Libreswan 3.x) are not covered.
RELEASES = {"openwrt": ("23.05", "24.10"), "el": ("8", "9", "10")}
DEFAULT_RELEASE = {"openwrt": "24.10", "el": "9"}
DEFAULT_FIREWALL = {"openwrt": "fw4", "el": "firewalld"}


def _platform(P, doc: Document, r: dict) -> tuple[str, str]:
    """The router's platform release and firewall manager, defaulted and checked against its platform."""
    platform = r["platform"]
    value = r.get("platform_release", DEFAULT_RELEASE[platform])
    release = str(value)
    if release not in RELEASES[platform]:
        allowed = " or ".join(f"'{x}'" if platform == "openwrt" else x for x in RELEASES[platform])
        if platform == "openwrt" and isinstance(value, int):
            why = "OpenWrt releases are written as 'YY.MM' in quotes"
        elif platform == "el" and not isinstance(value, int):
            why = "EL releases are written as the major release number"
        else:
            why = "this release is not covered (docs/platforms.md says what differs between the covered ones)"
        P(doc, ("router", "platform_release"), f"{show(value) if isinstance(value, str) else value} is not an "
          f"{'OpenWrt' if platform == 'openwrt' else 'EL'} release the WAN renders for: {why}; use {allowed}")
    firewall = r.get("firewall", DEFAULT_FIREWALL[platform])
    if platform == "openwrt" and "firewall" in r:
        P(doc, ("router", "firewall"), "OpenWrt routers always use fw4 (the WAN adds its rules as fw4 includes); "
          "remove firewall: here, it is for EL routers")
        firewall = "fw4"
    return release, firewall


def _host_key(P, doc: Document, field: str, value: dict, seen: dict[str, tuple[Document, str]]) -> HostKey:
    """The router's key at router.<field>: a well-formed raw RSA key whose CKAID is the one given,
    used by no other router (and not twice by this one). A private key is never asked for."""
    path = ("router", field)
    key = HostKey(value["rsasigkey"], value["ckaid"])
    parsed = hostkey.parse_rsasigkey(key.rsasigkey)
    if isinstance(parsed, str):
        P(doc, path + ("rsasigkey",), f"the public key {parsed}; paste the rsasigkey line /etc/wan/enrol printed on "
          "the router")
        return key
    real = hostkey.ckaid_of(key.rsasigkey)
    if real != key.ckaid:
        P(doc, path + ("ckaid",), f"ckaid {key.ckaid} is not the CKAID of this rsasigkey (that is {real}); paste both "
          "lines from the same run of /etc/wan/enrol on this router")
    if real in seen:
        other, field_ = seen[real]
        there = "this file" if other is doc else other.file
        P(doc, path + ("rsasigkey",), f"this public key (ckaid {real}) is already used as {field_} in {there}; every "
          "router makes its own keys on itself (/etc/wan/enrol), never a copy, and a rollover needs a new key")
    seen.setdefault(real, (doc, f"router.{field}"))
    return key


def _edge(addr: IPv4Address, lans: list[IPv4Network]) -> IPv4Network | None:
    """The LAN of which `addr` is the network or broadcast address (a /31 or /32 has neither)."""
    for n in lans:
        if n.prefixlen < 31 and addr in (n.network_address, n.broadcast_address):
            return n
    return None
