"""A router key rotation in the lab (docs/keys.md): three signed releases (1 added, 2 rolled,
3 retired) that every router fetches in turn with the real fetch, reconcile and pluto, while a ping
stream crosses each tunnel of the rotated router R; then R tries its retired key on every peer.

Host side: `prepare()` is the release scenario's (enrolment trees, release v1.0.0, the lab's
release signing key) plus what the lab needs to sign more releases later (the WAN as the lab runs
it and that signing key, in a file the lab deletes once it has used it: a throw-away lab key).
In the lab: every router enrols by fetching v1.0.0; R makes its second key pair inside its own NSS
database (`ipsec newhostkey`, lab/keys.py make_key, run in the router: timed in the lab kernel),
the lab renders and signs v1.1.0 (key OLD, next_key NEW), v1.2.0 (key NEW, previous_key OLD) and
v1.3.0 (key NEW), and the routers fetch them:

| step | release | order | R signs with | R's peers hold for R's id |
|---|---|---|---|---|
| added | v1.1.0 | peers first, R last | OLD | OLD (conn) + NEW (`whack --addkey`) |
| rolled | v1.2.0 | R first, peers last (R signs NEW to peers still on release 1) | NEW | NEW + OLD |
| retired | v1.3.0 | peers first, R last | NEW | NEW |

After each step, on top of what the step's fetches did: each tunnel of R authenticates afresh (its
initiator terminates and initiates its conns), and the peer's pluto log says which of R's keys
verified the signature. Pluto logs that only in its debug stream: `dbg("  '%s' passed",
keyid_str)` in try_all_keys (programs/pluto/keys.c v4.10:282, v4.12:282, v5.2:305), the keyid
being the first nine base64 digits of the RFC 3110 key (lib/libswan/keyid.c v4.10:31); the
"established IKE SA; authenticated peer ... using preloaded certificate '<id>'" line names the id
only (keys.c v4.10:378-405). So the peers run with `whack --debug base` for this scenario.
After release 3, a stand-in conn on R (a copy of R's conn with the OLD public key, so pluto signs
with the OLD private key, still in R's database) initiates to each peer; the peer refuses it with
"authentication failed: using RSA... for '<R's id>' tried preloaded: *<NEW keyid>" (keys.c
v4.10:372-376, v5.2:390-393: the keys it tried, OLD not among them).
On 5.2 (the suite plays it on tests/lab/wans/three-v5: R and one peer on 5.2, the other on 4.10)
`whack --keyid ID --addkey --pubkeyrsa K` adds a key beside the ones held and a plain add replaces
them (programs/pluto/rcv_whack.c v5.2:122-210 key_add_request), as on 4.10, and `whack
--listpubkeys` prints the same " Key KEYID" line and quoted id (keys.c v5.2:825-846 show_pubkey).
"""
from __future__ import annotations

import dataclasses
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

from release import signify
from release.bundle import build

from ..contracts import Check, Record
from ..keys import make_key
from ..proc import LabError, log, progress
from ..proofs import wait_tunnels_of
from . import PrepareContext, Prepared
from . import release as rel
from .change import PingStream

STAGE = "before_tunnels"
NSSDIR = "/var/lib/ipsec/nss"  # where the lab router's NSS database is (lab/router-setup.sh)
STEPS = (  # name, tag, who fetches first ("peers" or "R")
    ("added", "v1.1.0", "peers"),
    ("rolled", "v1.2.0", "R"),
    ("retired", "v1.3.0", "peers"),
)


@dataclass(frozen=True)
class RotationData(Record):
    release: dict  # the release scenario's data (dist, the enrol step)
    rotated: str  # R
    secret: str  # file: the WAN as the lab runs it and the lab's release signing key (deleted after use)


# ---- host side ---------------------------------------------------------------------------------
def pick_rotated(wan) -> str:
    """R: a router that initiates at least one of its tunnels and responds to at least one."""
    for s in wan.sites:
        roles = {t.initiator == s.name for t in wan.tunnels if s.name in (t.a, t.b)}
        if roles == {True, False}:
            return s.name
    raise LabError("the rotation lab needs a router that initiates one tunnel and responds to another "
                   "(three sites in a mesh: tests/lab/wans/three)")


def prepare(ctx: PrepareContext) -> Prepared:
    rotated = ctx.options.get("router") or pick_rotated(ctx.wan)
    signing = signify.generate()
    p = rel.prepare(dataclasses.replace(ctx, options={"negatives": False}), signing)
    secret = ctx.results / "rotation.pickle"
    with open(secret, "wb") as f:
        pickle.dump({"wan": ctx.wan, "signing": signing}, f)
    secret.chmod(0o600)
    p.data = RotationData(release=p.data, rotated=rotated, secret=str(secret)).to_dict()
    return p


# ---- in the lab --------------------------------------------------------------------------------
def keyid(rsasigkey: str) -> str:
    """pluto's name for a raw RSA key: the first nine base64 digits of its RFC 3110 blob
    (lib/libswan/keyid.c v4.10:31)."""
    return rsasigkey[2:11]


def held_keys(router, ike_id: str) -> list[str]:
    """The keyids pluto holds for `ike_id` (`whack --listpubkeys`: a "... Key KEYID ..." line, then
    the id in quotes on the next; router/fetch readd_keys reads it the same way)."""
    out, k = [], None
    for line in router.whack("--listpubkeys").stdout.splitlines():
        m = re.search(r" Key (\S+)", line)
        if m:
            k = m.group(1)
            continue
        m = re.search(r"'([^']+)'", line)
        if k and m:
            if m.group(1) == ike_id:
                out.append(k)
            k = None
    return sorted(out)


def _log(router) -> str:
    return router.logs().get("pluto.log", "")


def _since(router, mark: int) -> str:
    return _log(router)[mark:]


def _passed(text: str, ids: set[str]) -> list[str]:
    """The keyids among `ids` that verified a peer's signature (pluto's debug line)."""
    return [k for k in re.findall(r"'([A-Za-z0-9+/]{9})' passed", text) if k in ids]


def _installed_tag(router) -> str:
    r = router.exec(["sh", "-c", ". /etc/wan/release.env && echo $WAN_TAG"])
    return r.stdout.strip()


def _build_releases(lab, d: RotationData, new) -> dict[str, str]:
    """Render and sign the three releases with R's new key; returns step -> tag."""
    with open(d.secret, "rb") as f:
        saved = pickle.load(f)
    Path(d.secret).unlink()  # the lab's signing key is used here only
    wan, signing = saved["wan"], saved["signing"]
    site = next(s for s in wan.sites if s.name == d.rotated)
    old = site.router.key

    def with_keys(**keys):
        r = dataclasses.replace(site.router, key=None, next_key=None, previous_key=None)
        s = dataclasses.replace(site, router=dataclasses.replace(r, **keys))
        return dataclasses.replace(wan, sites=tuple(s if x.name == site.name else x for x in wan.sites))

    wans = {"added": with_keys(key=old, next_key=new), "rolled": with_keys(key=new, previous_key=old),
            "retired": with_keys(key=new)}
    for name, tag, _ in STEPS:
        build(wans[name], signing, tag, Path(d.release["dist"]), "lab-rotation")
    return old


def _conns_up(router, conns: tuple[str, ...], timeout: float) -> bool:
    """Until each of these conns has an established Child SA on the router (whack --trafficstatus)."""
    end = time.monotonic() + timeout
    while not set(conns) <= set(router.traffic()):
        if time.monotonic() > end:
            return False
        time.sleep(0.25)
    return True


def _reauthenticate(lab, rotated: str) -> dict[str, str]:
    """Each tunnel of R authenticates afresh: its initiator terminates and initiates its conns (all
    tunnels first, then the wait: a tunnel the old-key probe left down is initiated here too)."""
    tunnels = [t for t in lab.view.tunnels if rotated in (t.a, t.b)]
    for t in tunnels:
        init = lab.routers[t.initiator]
        conns = lab.view.site(t.initiator).conns[t.name]
        for c in conns:
            init.whack("--name", c, "--terminate")
        for c in conns:
            init.whack("--name", c, "--initiate", "--asynchronous")
    out = {}
    for t in tunnels:
        # this tunnel's conns on each end (a loaded machine: an IKE_AUTH may be retransmitted)
        down = [e for e in (t.a, t.b) if not _conns_up(lab.routers[e], lab.view.site(e).conns[t.name], 120)]
        out[t.name] = "up" if not down else f"down on {', '.join(down)}"
    return out


def _probe_old_key(lab, rotated: str, peer: str, old, mark: int) -> tuple[bool, str, dict]:
    """A stand-in conn on R signing with the OLD key initiates to `peer`: the peer's refusal line.

    The tunnel's conns are terminated on both ends first: pluto initiates a conn over an IKE SA it
    already has with the same host pair and ids (a CREATE_CHILD_SA, no authentication at all:
    find_phase1_state, programs/pluto/initiate.c v4.10:333 and state.c v4.10:1923-1943), so the
    stand-in must start a new IKE SA to be authenticated. The fresh authentication that follows
    (_reauthenticate) brings the tunnel back."""
    r, p = lab.routers[rotated], lab.routers[peer]
    t = next(t for t in lab.view.tunnels if {t.a, t.b} == {rotated, peer})
    conf = r.exec(["cat", f"/etc/ipsec.d/{t.name}.conf"]).stdout
    block = re.search(r"^conn \S+\n(?:\t.*\n)+", conf, re.M)
    if not block:
        return False, f"no conn in {rotated}'s /etc/ipsec.d/{t.name}.conf", {}
    name = f"oldkey-{peer}"
    text = re.sub(r"^conn \S+", f"conn {name}", block.group(0), flags=re.M)
    text = re.sub(r"^\tleftrsasigkey=.*$", f"\tleftrsasigkey={old.rsasigkey}", text, flags=re.M)
    text = re.sub(r"^\tauto=.*$", "\tauto=add", text, flags=re.M) + "\tkeyingtries=1\n"
    me = re.search(r"^\tleftid=(\S+)", text, re.M).group(1)
    # the initiator first: terminated by the responder first, it would start the tunnel again at once
    # (its conn is auto=start: "deleting IKE SA but connection is supposed to remain up")
    for who in (t.initiator, t.peer_of(t.initiator)):
        for c in lab.view.site(who).conns[t.name]:
            lab.routers[who].whack("--name", c, "--terminate")
    conns = lab.view.site(rotated).conns[t.name]
    end = time.monotonic() + 10
    while time.monotonic() < end and any(f'"{c}"' in line and "ESTABLISHED_IKE_SA" in line  # an IKE SA to share
                                         for c in conns for line in r.whack("--status").stdout.splitlines()):
        time.sleep(0.25)
    path = f"/run/{name}.conf"
    steps = {}
    x = r.exec(["sh", "-c", 'printf "%s" "$1" > "$2" && ipsec addconn --config "$2" "$3"', "sh", text, path, name])
    steps["addconn"] = {"rc": x.returncode, "output": (x.stdout + x.stderr).strip()[-500:]}
    x = r.whack("--name", name, "--initiate", "--asynchronous")
    steps["initiate"] = {"rc": x.returncode, "output": (x.stdout + x.stderr).strip()[-500:]}
    # keys.c v4.10:365-369: "authentication failed: using SIGNER with HASH for 'ID' tried KEYS"
    pattern = re.compile(r"authentication failed: using \S+ with \S+ for '([^']+)' tried[^\n]*")
    end, line = time.monotonic() + 30, ""
    while time.monotonic() < end and not line:
        for m in pattern.finditer(_since(p, mark)):
            if m.group(1) == me:
                line = m.group(0)
        time.sleep(0.25)
    r.whack("--name", name, "--delete")
    r.exec(["rm", "-f", path])
    if not line:
        return False, f"no refusal of {me} in {peer}'s pluto log", steps
    return True, line, steps


def _step(lab, d: RotationData, name: str, tag: str, first: str, keys: dict, report: dict) -> None:
    rotated = d.rotated
    peers = sorted({t.peer_of(rotated) for t in lab.view.tunnels if rotated in (t.a, t.b)})
    ike_id = keys["id"]
    expect_signer = keys["new"] if name in ("rolled", "retired") else keys["old"]
    expect_held = sorted({keys["new"]} if name == "retired" else {keys["old"], keys["new"]})
    marks = {p: len(_log(lab.routers[p])) for p in peers}
    others = [n for n in lab.view.start_order if n != rotated]
    order = others + [rotated] if first == "peers" else [rotated] + others
    rel.set_latest(d.release["dist"], tag)
    tunnels = [t for t in lab.view.tunnels if rotated in (t.a, t.b)]
    streams = {t.name: PingStream(lab.view.site(rotated).lans[0].host_ns, lab.view.site(t.peer_of(rotated)).lans[0].host)
               for t in tunnels}
    fetched = {}
    t0 = time.monotonic()
    for s in streams.values():
        s.__enter__()
    try:
        for k, router in enumerate(order, 1):
            r = rel.fetch(lab, router)
            lab.wait_initiated(router)
            fetched[router] = r
            progress(f"rotation {name}: routers fetched {tag}", k, len(order), router)
        up = {t.name: all(wait_tunnels_of(lab.routers[e], timeout=60) for e in (t.a, t.b)) for t in tunnels}
    finally:
        for s in streams.values():
            s.__exit__(None, None, None)
    seconds = round(time.monotonic() - t0, 2)
    installed = {n: _installed_tag(lab.routers[n]) for n in order}
    for router, r in fetched.items():
        ok = r["rc"] == 0 and "rolled back" not in r["output"] and installed[router] == tag
        lab.add(Check("rotation", router, f"{name}: fetch {tag}", ok, {
            "step": name, "tag": tag, "rc": r["rc"], "seconds": r["seconds"], "installed": installed[router],
            "output": r["output"],
            "why": "" if ok else f"the fetch did not apply {tag} (exit {r['rc']}, installed {installed[router]!r})"}))
    loss = {}
    for t in tunnels:
        s = streams[t.name]
        lost = s.sent - s.received
        loss[t.name] = {"sent": s.sent, "lost": lost, "loss_percent": round(100 * lost / s.sent, 2) if s.sent else None}
        lab.add(Check("rotation", rotated, f"{name}: {t.name} up", up[t.name] and s.sent > 0, {
            "step": name, "tunnel": t.name, "initiator": t.initiator, **loss[t.name],
            "why": "" if up[t.name] else "not every conn of the tunnel is established on both ends after the step"}))
    held = {p: held_keys(lab.routers[p], ike_id) for p in peers}
    for p in peers:
        ok = held[p] == expect_held
        lab.add(Check("rotation", p, f"{name}: keys held for {rotated}", ok, {
            "step": name, "held": held[p], "expected": expect_held, "old": keys["old"], "new": keys["new"],
            "why": "" if ok else f"{p}'s pluto holds {held[p]} for {ike_id}, not {expect_held}"}))
    refusals = {}
    if name == "retired":  # the old key, presented by a stand-in conn on R, is refused by every peer
        for p in peers:
            ok, line, probe = _probe_old_key(lab, rotated, p, keys["old_key"], len(_log(lab.routers[p])))
            ok = ok and f"*{keys['new']}" in line and keys["old"] not in line
            refusals[p] = line
            lab.add(Check("rotation", p, f"{name}: old key refused", ok, {
                "step": name, "log_line": line, "old": keys["old"], "new": keys["new"], "probe": probe,
                "why": "" if ok else f"{p} did not refuse {rotated}'s old key as expected"}))
    reauth = _reauthenticate(lab, rotated)
    ids = {keys["old"], keys["new"]}
    signers = {p: _passed(_since(lab.routers[p], marks[p]), ids) for p in peers}
    for p in peers:
        t = next(t.name for t in tunnels if t.peer_of(rotated) == p)
        ok = bool(signers[p]) and set(signers[p]) == {expect_signer} and reauth[t] == "up"
        lab.add(Check("rotation", rotated, f"{name}: signs to {p} with {'NEW' if expect_signer == keys['new'] else 'OLD'}",
                      ok, {"step": name, "tunnel": t, "verified_with": signers[p], "expected": expect_signer,
                           "reauthenticated": reauth[t],
                           "why": "" if ok else f"{p}'s pluto verified {rotated} with {signers[p]} (expected only "
                                                f"{expect_signer}), or the fresh authentication left the tunnel {reauth[t]}"}))
    report["steps"].append({"step": name, "tag": tag, "order": order, "seconds": seconds,
                            "fetch_seconds": {n: r["seconds"] for n, r in fetched.items()}, "loss": loss,
                            "held": held, "verified_with": signers, "reauthenticated": reauth,
                            **({"old_key_refused": refusals} if refusals else {})})


def play(lab, data: dict) -> None:
    d = RotationData.from_dict(data)
    rd = rel.ReleaseData.from_dict(d.release)
    server = rel.Server(lab, rd.dist)
    server.start()
    report: dict = {"rotated": d.rotated, "enrol": {}, "steps": []}
    r = lab.routers
    try:
        rel.set_latest(rd.dist, rd.steps[0].tag)
        rel.enrol(lab, rd, report)
        peers = sorted({t.peer_of(d.rotated) for t in lab.view.tunnels if d.rotated in (t.a, t.b)})
        for p in peers:  # the debug stream names the key that verified a signature (see the docstring)
            r[p].whack("--debug", "base")
        router = r[d.rotated]

        def in_router(argv: list[str]) -> str:
            x = router.exec(argv, timeout=300)
            if x.returncode != 0:
                raise LabError(f"{d.rotated}: {' '.join(argv[:2])} failed ({x.returncode}): {(x.stderr or x.stdout)[-300:]}")
            return x.stdout + x.stderr

        new, seconds = make_key(Path(NSSDIR), run=in_router)
        report["key_generation_seconds"] = round(seconds, 3)
        log(f"rotation: {d.rotated} made its new key {new.ckaid} in {seconds:.2f} s (ipsec newhostkey in the lab kernel)")
        old = _build_releases(lab, d, new)
        tunnel = next(t for t in lab.view.tunnels if d.rotated in (t.a, t.b))
        conf = router.exec(["cat", f"/etc/ipsec.d/{tunnel.name}.conf"]).stdout
        ike_id = re.search(r"^\tleftid=(\S+)", conf, re.M).group(1)  # R's IKE id, as its peers' conns name it
        keys = {"old": keyid(old.rsasigkey), "new": keyid(new.rsasigkey), "old_key": old, "id": ike_id,
                "old_ckaid": old.ckaid, "new_ckaid": new.ckaid}
        report.update({"old_ckaid": old.ckaid, "new_ckaid": new.ckaid, "old_keyid": keys["old"], "new_keyid": keys["new"]})
        for k, (name, tag, first) in enumerate(STEPS, 1):
            _step(lab, d, name, tag, first, keys, report)
            progress("rotation steps", k, len(STEPS), name)
    finally:
        for p in (t.peer_of(d.rotated) for t in lab.view.tunnels if d.rotated in (t.a, t.b)):
            if p in r:
                r[p].whack("--no-debug", "base")
        server.stop()
        Path(d.secret).unlink(missing_ok=True)
        lab.report("rotation", report)
