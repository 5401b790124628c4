"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN_KEY = b"golden-tests-only-not-a-real-master-key"


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


# ---- the router side: a stand-in pluto and release servers on loopback ---------------------------
# The stand-in `ipsec` (pluto cannot hold tunnels on this machine's kernel: no ESP). It keeps what
# real pluto keeps, in STUB_STATE: loaded/<conn> (the sha256 of the conf file when it was added:
# a conf changed on disk but not re-added shows), secrets/ (the .secrets files as of the last
# --rereadsecrets: pluto reads secrets only then). A conn is established when both ends have it
# loaded and their last-read PSKs agree; the other end is STUB_PEER (another router's STUB_STATE,
# or a directory made by `static_peer`). `whack --delete` of a conn that is not loaded fails, as
# whack does.
STUB_IPSEC = r"""#!/bin/sh
echo "ipsec $*" >> "$STUB_LOG"
S=$STUB_STATE
mkdir -p "$S/loaded" "$S/secrets"
psk() { sed -n 's/.*PSK "\(.*\)"/\1/p' "$1" 2>/dev/null; }
up() {
    [ -f "$S/loaded/$1" ] && [ -f "$STUB_PEER/loaded/$1" ] || return 1
    a=$(psk "$S/secrets/$1.secrets"); b=$(psk "$STUB_PEER/secrets/$1.secrets")
    [ -n "$a" ] && [ "$a" = "$b" ]
}
case "$1" in
  whack)
    case "$2" in
      --trafficstatus) for f in "$S"/loaded/*; do [ -e "$f" ] || continue; n=${f##*/}
          up "$n" && echo "006 #2: \"$n\", type=ESP, add_time=1, inBytes=0, outBytes=0, id='x'"; done ;;
      --status) for f in "$S"/loaded/*; do [ -e "$f" ] && echo "000 \"${f##*/}\": 10.0.0.1/32===10.0.0.2/32"; done ;;
      --delete) [ -f "$S/loaded/$4" ] || { echo "whack: no connection named \"$4\"" >&2; exit 1; }
          rm -f "$S/loaded/$4" ;;
      --rereadsecrets) rm -f "$S"/secrets/*
          for f in "$STUB_ROOT"/etc/ipsec.d/*.secrets; do [ -e "$f" ] && cp "$f" "$S/secrets/"; done ;;
    esac ;;
  auto|add)
    [ "$1" = auto ] && n=$3 || n=$2
    c="$STUB_ROOT/etc/ipsec.d/$n.conf"
    [ -f "$c" ] || { echo "addconn: cannot load $n: no $c" >&2; exit 1; }
    sha256sum < "$c" | cut -d' ' -f1 > "$S/loaded/$n" ;;
esac
exit 0
"""


def static_peer(directory: Path, tree: dict) -> Path:
    """A stand-in peer that has loaded every tunnel of `tree` (a rendered router tree) with its PSKs."""
    import hashlib
    (directory / "loaded").mkdir(parents=True, exist_ok=True)
    (directory / "secrets").mkdir(exist_ok=True)
    for p, f in tree.items():
        if p.startswith("etc/ipsec.d/") and p.endswith(".secrets"):
            (directory / "secrets" / Path(p).name).write_bytes(f.content)
        if p.startswith("etc/ipsec.d/") and p.endswith(".conf"):
            (directory / "loaded" / Path(p).stem).write_text(hashlib.sha256(f.content).hexdigest() + "\n")
    return directory


class Server:
    """lab/release_server.py on 127.0.0.1 (a free port); restartable (a test makes it die)."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log, self.proc = root, log, None
        self.start()

    def start(self) -> None:
        import subprocess
        import sys
        import time
        portfile = self.root.parent / "port"
        portfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "lab.release_server", str(self.root), "127.0.0.1", "0", str(portfile)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        end = time.monotonic() + 20
        while not portfile.exists():
            assert self.proc.poll() is None and time.monotonic() < end, self.log.read_text()
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{portfile.read_text().strip()}/releases"

    def stop(self) -> None:
        import signal
        import os
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        if self.proc:
            self.proc.wait(timeout=10)


class HostileServer:
    """A release server (GitHub's layout, like lab/release_server.py) in a thread of the test, that
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
