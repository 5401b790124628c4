"""From a sites directory to the WAN model: schema first, then what a schema cannot say.

Every problem is collected (not just the first) and reported with file, line and a fix.
"""
from __future__ import annotations

import json
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

from .errors import Problem, WanError, show
from .load import Document, load_yaml, where
from .model import CryptoProfile, Dns, Dpd, Router, Site, Wan
from .topology import plan_tunnels

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
DEFAULT_DPD = {"delay": 10, "timeout": 60}


@lru_cache(maxsize=None)
def _validators() -> dict[str, jsonschema.protocols.Validator]:
    resources = []
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        schemas[path.name] = schema
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry = Registry().with_resources(resources)
    cls = jsonschema.Draft202012Validator
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
    for err in _validators()[kind].iter_errors(doc.data):
        path = tuple(err.absolute_path)
        v = err.validator
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
        if v in ("pattern", "maxLength", "minLength") and isinstance(err.instance, str):
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
    if not wan_path.exists():
        raise WanError([Problem(f"{shown}/wan.yaml", 0, "", "missing; every sites directory needs wan.yaml (see sites/wan.yaml)")])
    for odd in sorted(sites_dir.glob("*.yml")):
        problems.append(Problem(f"{shown}/{odd.name}", 0, "", "ignored extension .yml; rename it to .yaml"))

    docs: list[Document] = []
    wan_doc = None
    for path in [wan_path] + sorted(p for p in sites_dir.glob("*.yaml") if p.name != "wan.yaml"):
        try:
            doc = load_yaml(path, f"{shown}/{path.name}")
        except WanError as e:
            problems.extend(e.problems)
            continue
        kind = "wan" if path.name == "wan.yaml" else "site"
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


def _display_dir(d: Path) -> str:
    try:
        return str(d.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(d)


def _semantics(wan_doc: Document, docs: list[Document], shown: str) -> tuple[Wan | None, list[Problem]]:
    problems: list[Problem] = []
    w = wan_doc.data
    P = lambda doc, path, msg: problems.append(Problem(doc.file, doc.line(path), where(path), msg))  # noqa: E731

    profiles = {
        name: CryptoProfile(name, tuple(p["ike"]), tuple(p["esp"]), p.get("ikelifetime", 28800), p.get("salifetime", 3600))
        for name, p in w["crypto_profiles"].items()
    }
    defaults = w["defaults"]
    if defaults["crypto_profile"] not in profiles:
        P(wan_doc, ("defaults", "crypto_profile"),
          f"crypto profile {show(defaults['crypto_profile'])} is not defined; define it under crypto_profiles or use one of: {', '.join(sorted(profiles))}")

    seen_names: dict[str, Document] = {}
    seen_public: dict[IPv4Address, Document] = {}
    seen_domains: dict[str, Document] = {}
    all_lans: list[tuple[IPv4Network, Document, int]] = []
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
        public = IPv4Address(r["public_address"])
        if public in seen_public:
            P(doc, ("router", "public_address"), f"{public} is already the public address of {seen_public[public].file}; each router needs its own")
        seen_public.setdefault(public, doc)

        lans: list[IPv4Network] = []
        for i, text in enumerate(d["lans"]):
            net = ip_network(text, strict=False)
            if str(net) != text:
                P(doc, ("lans", i), f"{text} has host bits set; write the network address {net}")
            lans.append(net)
            all_lans.append((net, doc, i))

        lan_address = IPv4Address(r["lan_address"])
        if not any(lan_address in n for n in lans):
            P(doc, ("router", "lan_address"), f"{lan_address} is outside the site's LANs ({', '.join(map(str, lans))}); use the router's address in one of them")
        elif any(lan_address in (n.network_address, n.broadcast_address) for n in lans if n.prefixlen < 31):
            P(doc, ("router", "lan_address"), f"{lan_address} is a network or broadcast address; use a host address")
        dns = d["dns"]
        server = IPv4Address(dns["server"])
        if not any(server in n for n in lans):
            P(doc, ("dns", "server"), f"{server} is outside the site's LANs ({', '.join(map(str, lans))}); the DNS server must sit in one of them so the tunnels reach it")
        if server == lan_address:
            P(doc, ("dns", "server"), f"{server} is the router's own LAN address; name the site's DNS server host (the router forwards to it)")
        domain = dns["domain"]
        if domain in seen_domains:
            P(doc, ("dns", "domain"), f"domain {domain} is already served by {seen_domains[domain].file}; each site serves its own domain")
        seen_domains.setdefault(domain, doc)

        ov = d.get("overrides", {})
        if "crypto_profile" in ov and ov["crypto_profile"] not in profiles:
            P(doc, ("overrides", "crypto_profile"),
              f"crypto profile {show(ov['crypto_profile'])} is not defined in wan.yaml; use one of: {', '.join(sorted(profiles))}")
        ike_id = r.get("ike_id", str(public))
        sites.append(Site(
            name=name, file=doc.file,
            router=Router(r["platform"], r["libreswan"], public, lan_address, ike_id),
            lans=tuple(lans),
            dns=Dns(domain, server, tuple(sorted((k, IPv4Address(v)) for k, v in dns.get("records", {}).items()))),
            crypto_profile=ov.get("crypto_profile"),
            dpd=Dpd(**ov.get("dpd", defaults.get("dpd", DEFAULT_DPD))),
            dns_mode=ov.get("dns_mode", defaults.get("dns_mode", "forward")),
        ))

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

    if problems:
        return None, problems

    sites.sort(key=lambda s: s.name)
    tunnels, tproblems = plan_tunnels(w["topology"], hubs, sites, profiles, defaults["crypto_profile"],
                                      {s.name: doc for s, doc in zip(sites, sorted(docs, key=lambda d: d.data["name"]))})
    problems.extend(tproblems)
    return Wan(w["name"], w["topology"], hubs, tuple(sites), tunnels, shown,
               release_valid_days=w.get("release", {}).get("valid_days", 90)), problems
