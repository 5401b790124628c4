"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sites_repo(path: Path) -> Path:
    """A git repository at `path` holding a copy of the example sites, committed."""
    import shutil
    import subprocess
    shutil.copytree(REPO / "sites", path / "sites")
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "sites"], check=True)
    return path


def site_key(name: str) -> dict:
    """A public key for a test site named `name` (ckaid, rsasigkey), as the site file holds it (the same on every call).
    From tests/data/site-keys.json (public halves only; nobody kept the private ones), or made now
    for a name the fixtures do not know."""
    import json
    known = json.loads((REPO / "tests/data/site-keys.json").read_text())
    if f"{name}:2048" in known:
        return dict(known[f"{name}:2048"])
    from lab.keys import stranger_key
    k = stranger_key()
    return {"ckaid": k.ckaid, "rsasigkey": k.rsasigkey}


# ---- the router side: a stand-in pluto and release servers on loopback ---------------------------
# The stand-in `ipsec` (pluto cannot hold tunnels on this machine's kernel: no ESP). It keeps what
# real pluto keeps, in STUB_STATE:
#   loaded/<conn>  the sha256 of the conf file when it was added (a conf changed on disk but not
#                  added again shows)
#   conns/<conn>   what pluto took from the conf then: leftid, rightid and leftrsasigkey (the key
#                  this end signs with: its private half is in the router's NSS database)
#   keys/<id>      the public keys pluto holds for an IKE id, one a line. Adding a conn replaces
#                  the keys of its ids with the conf's (starterwhack sends them without --addkey:
#                  libreswan lib/libipsecconf/starterwhack.c v5.2:246-290; programs/pluto/
#                  rcv_whack.c v4.10:329-345 deletes an id's keys unless --addkey);
#                  `whack --keyid ID --addkey --pubkeyrsa K` adds one, without --addkey it replaces
#                  them. Deleting a conn leaves the keys (a Libreswan test script under
#                  testing/pluto asks "why the public keys from the deleted still around?" after
#                  `ipsec auto --delete` and --listpubkeys; not checked in pluto's source). Not
#                  checked either: whether pluto keeps a second copy of a key added twice (the
#                  stand-in does not; authentication is the same either way).
# A conn is established when both ends have it loaded and each holds, for the other's IKE id, the
# key the other signs with (pluto tries every key it holds for the id: keys.c v5.2:217-310). The
# other end is STUB_PEER (another router's STUB_STATE, or a directory made by `static_peer`).
# `whack --delete` of a conn that is not loaded fails, as whack does.
# what the router programs ask pluto without changing anything (a repair's and the status's looks)
PLUTO_LOOKS = ("ipsec whack --status", "ipsec whack --trafficstatus", "ipsec whack --listpubkeys")

STUB_IPSEC = r"""#!/bin/sh
# the version query changes nothing and is not logged (as Debian's 4.10 prints it; STUB_LIBRESWAN: another)
[ "$1" = --version ] && { echo "Libreswan ${STUB_LIBRESWAN:-4.10}"; exit 0; }
echo "ipsec $*" >> "$STUB_LOG"
S=$STUB_STATE
mkdir -p "$S/loaded" "$S/conns" "$S/keys"
field() { sed -n "s/^[[:space:]]*$2=//p" "$1" | head -n 1; }
# up CONN: both ends loaded it and each accepts the key the other signs with
up() {
    [ -f "$S/loaded/$1" ] && [ -f "$STUB_PEER/loaded/$1" ] || return 1
    { read -r my_id; read -r my_peer; read -r my_key; } < "$S/conns/$1"
    { read -r p_id; read -r p_peer; read -r p_key; } < "$STUB_PEER/conns/$1"
    [ -n "$my_key" ] && [ -n "$p_key" ] || return 1
    grep -qxF -- "$p_key" "$S/keys/$my_peer" 2>/dev/null && grep -qxF -- "$my_key" "$STUB_PEER/keys/$p_peer" 2>/dev/null
}
case "$1" in
  showhostkey)  # the private keys of the NSS database: $S/nss (one ckaid a line) when a test says,
                # else the key of every router.env under STUB_ROOT (enrol made it, as on a router)
    if [ -f "$S/nss" ]; then cat "$S/nss"; else find "$STUB_ROOT" -path '*/etc/wan/router.env' -exec cat {} + 2>/dev/null |
      sed -n 's/^WAN_CKAID=//p'; fi | sort -u | while read -r c; do echo "< 1> RSA keyid: AwEAAstub ckaid: $c"; done ;;
  whack)
    case "$2" in
      --listpubkeys)  # as pluto 4.10 lists them (programs/pluto/keys.c show_pubkey): keyid, then the id
          for f in "$S"/keys/*; do [ -e "$f" ] || continue
              while read -r k; do kid=$(printf %s "$k" | cut -c3-11)
                  echo "000 Nov 27 17:43:37 2026, 2048 RSA Key $kid (no private key), until --- -- --:--:-- ---- ok"
                  echo "000        ID_FQDN '${f##*/}'"; done < "$f"; done ;;
      # $S/down/CONN: its Child SA failed (the peer refused it) while the IKE SA stands; --initiate brings it up
      --trafficstatus) for f in "$S"/loaded/*; do [ -e "$f" ] || continue; n=${f##*/}
          up "$n" && [ ! -e "$S/down/$n" ] && echo "006 #2: \"$n\", type=ESP, add_time=1, inBytes=0, outBytes=0, id='x'"; done ;;
      --status) for f in "$S"/loaded/*; do [ -e "$f" ] && echo "000 \"${f##*/}\": 10.0.0.1/32===10.0.0.2/32"; done
          for f in "$S"/loaded/*; do [ -e "$f" ] && up "${f##*/}" &&
              echo "000 #1: \"${f##*/}\":500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); newest;"; done ;;
      --initiate) rm -f "$S/down/$5" ;;
      --delete) [ -f "$S/loaded/$4" ] || { echo "whack: no connection named \"$4\"" >&2; exit 1; }
          rm -f "$S/loaded/$4" "$S/conns/$4" ;;
      --keyid)
          id=$3
          case $id in ''|*/*) echo "whack: bad --keyid" >&2; exit 1 ;; esac
          if [ "$4" = --addkey ]; then key=$6
              grep -qxF -- "$key" "$S/keys/$id" 2>/dev/null || echo "$key" >> "$S/keys/$id"
          else key=$5; echo "$key" > "$S/keys/$id"; fi ;;
    esac ;;
  auto|add)
    [ "$1" = auto ] && n=$3 || n=$2
    c="$STUB_ROOT/etc/ipsec.d/$n.conf"
    [ -f "$c" ] || { echo "addconn: cannot load $n: no $c" >&2; exit 1; }
    printf '%s\n%s\n%s\n' "$(field "$c" leftid)" "$(field "$c" rightid)" "$(field "$c" leftrsasigkey)" > "$S/conns/$n"
    field "$c" leftrsasigkey > "$S/keys/$(field "$c" leftid)"
    field "$c" rightrsasigkey > "$S/keys/$(field "$c" rightid)"
    sha256sum < "$c" | cut -d' ' -f1 > "$S/loaded/$n" ;;
esac
exit 0
"""


def _conf_field(conf: str, name: str) -> str:
    return next((line.strip()[len(name) + 1:] for line in conf.splitlines() if line.strip().startswith(name + "=")), "")


def pluto_load(state: Path, conf_path: Path | str, conf: bytes) -> None:
    """What the stand-in `ipsec auto --add` does for one conf (pluto loading it at its start)."""
    import hashlib
    name, text = Path(conf_path).stem, conf.decode()
    for d in ("loaded", "conns", "keys"):
        (state / d).mkdir(parents=True, exist_ok=True)
    left, right = _conf_field(text, "leftid"), _conf_field(text, "rightid")
    (state / "conns" / name).write_text(f"{left}\n{right}\n{_conf_field(text, 'leftrsasigkey')}\n")
    (state / "keys" / left).write_text(_conf_field(text, "leftrsasigkey") + "\n")
    (state / "keys" / right).write_text(_conf_field(text, "rightrsasigkey") + "\n")
    (state / "loaded" / name).write_text(hashlib.sha256(conf).hexdigest() + "\n")


def pluto_expected_keys(root: Path) -> dict[str, set[str]]:
    """The keys pluto must hold for each peer's IKE id once reconcile is done with the files under
    `root`: the conn's rightrsasigkey plus that id's extra keys in etc/wan/peer-keys.list."""
    keys: dict[str, set[str]] = {}
    for conf in (root / "etc/ipsec.d").glob("*.conf"):
        text = conf.read_text()
        keys.setdefault(_conf_field(text, "rightid"), set()).add(_conf_field(text, "rightrsasigkey"))
    listed = root / "etc/wan/peer-keys.list"
    for line in (listed.read_text().splitlines() if listed.exists() else []):
        ike_id, _ckaid, key = line.split()
        keys.setdefault(ike_id, set()).add(key)
    return keys


def static_peer(directory: Path, tree: dict) -> Path:
    """A stand-in peer that has loaded every tunnel of `tree` (a rendered router tree) and added the
    extra keys of its peer-keys.list, as its reconcile would have."""
    for d in ("loaded", "conns", "keys"):
        (directory / d).mkdir(parents=True, exist_ok=True)
    for p, f in tree.items():
        if p.startswith("etc/ipsec.d/") and p.endswith(".conf"):
            pluto_load(directory, p, f.content)
    listed = tree.get("etc/wan/peer-keys.list")
    for line in (listed.content.decode().splitlines() if listed else []):
        ike_id, _ckaid, key = line.split()
        with open(directory / "keys" / ike_id, "a") as k:
            k.write(key + "\n")
    return directory


class Server:
    """release/server.py on 127.0.0.1 (a free port); restartable (a test makes it die)."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log, self.proc = root, log, None
        self.start()

    def start(self) -> None:
        import subprocess
        import sys
        import time
        portfile = self.root.parent / "port"
        portfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "release.server", str(self.root), "127.0.0.1", "0", str(portfile)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        end = time.monotonic() + 20
        while not portfile.exists():
            assert self.proc.poll() is None and time.monotonic() < end, self.log.read_text()
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{portfile.read_text().split()[0]}/releases"

    def stop(self) -> None:
        import os
        import signal
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        if self.proc:
            self.proc.wait(timeout=10)


class HostileServer:
    """A release server (GitHub's layout, like release/server.py) in a thread of the test, that
    misbehaves on request: `behave[name] = ("huge", n)` answers `name` with n bytes of junk,
    ("drip", seconds) sends one byte every `seconds` for as long as the client listens,
    ("slow", seconds) waits that long, then answers normally."""

    def __init__(self, root: Path):
        import http.server
        import threading
        import time
        self.root, self.behave = root, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if parts[:3] == ["releases", "latest", "download"] and len(parts) == 4:
                    tag = (outer.root / "latest").read_text().strip()
                    parts = ["releases", "download", tag, parts[3]]
                if parts[:2] != ["releases", "download"] or len(parts) != 4 or "/" in parts[3] or parts[3].startswith("."):
                    return self.send_error(404)
                how, arg = outer.behave.get(parts[3], (None, None))
                try:
                    if how == "huge":
                        self.send_response(200)
                        self.end_headers()
                        chunk = b"0" * 65536
                        for _ in range(arg // len(chunk)):
                            self.wfile.write(chunk)
                        return
                    if how == "drip":
                        self.send_response(200)
                        self.end_headers()
                        while True:
                            self.wfile.write(b"0")
                            self.wfile.flush()
                            time.sleep(arg)
                    if how == "slow":
                        time.sleep(arg)
                    data = (outer.root / parts[2] / parts[3]).read_bytes()
                except (BrokenPipeError, ConnectionResetError):
                    return
                except OSError:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def enrol_programs(root: Path) -> Path:
    """A router root as `enrol --install` and its first reconcile leave it: every program of the
    program release in /etc/wan (render/paths.py PROGRAMS) and OpenWrt's hooks (OPENWRT_HOOKS)."""
    from render import paths
    repo = Path(__file__).resolve().parents[1]
    for path, name in paths.PROGRAMS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / "router" / name, root / path)
    for hook, program in paths.OPENWRT_HOOKS.items():
        (root / hook).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / program, root / hook)
    return root


def program_kit(tmp: Path):
    """A program release of this checkout's programs, signed by a throw-away program key:
    (its dist directory, the program key, the release key)."""
    import shutil

    from release import programs, signify
    repo = tmp / "repo"
    (repo / "release").mkdir(parents=True)
    shutil.copytree(REPO / "router", repo / "router")
    pkey, rkey = signify.generate(), signify.generate()
    (repo / programs.PUBLIC_KEY).write_text(pkey.public.text("p"))
    (repo / "release/wan-release.pub").write_text(rkey.public.text("r"))
    return programs.build(repo, 3, tmp / "dist", pkey, "abc"), pkey, rkey
