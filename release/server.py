"""A release server for the lab and the tests, laid out as GitHub's release downloads and, for a
private repository, answering as GitHub's REST API does.

Downloads (a public repository, or a plain static mirror):
  /releases/download/<tag>/<file>   the file ROOT/<tag>/<file> (ROOT is a dist/ directory)
  /releases/latest/download/<file>  a 302 redirect to the tag named in ROOT/latest

The REST API, as GitHub documents it (docs.github.com/en/rest/releases/releases "Get a release by
tag name", "Get the latest release"; docs.github.com/en/rest/releases/assets "Get a release
asset"), under /repos/<owner>/<repo>/ (any owner and repo name):
  GET releases/tags/<tag>, GET releases/latest   the release as JSON with its `assets` list
                                                 (each: id, name, size, url, browser_download_url)
  GET releases/assets/<id>                       with `Accept: application/octet-stream`: a 302 to a
                                                 storage host (another port, a short-lived signed
                                                 address), else the asset's JSON
GitHub answers 404, not 401, to a request without a token for a private repository (it does not
reveal that the repository exists), and 401 "Bad credentials" to a wrong token. The storage host
takes its own signed query string; as S3 does, it refuses a request that also carries an
`Authorization` header (400: "Only one auth mechanism allowed"), and the log says so, so a client
that leaks its token there is seen.

ROOT/.private holding a token makes the repository private: the download addresses answer 404 and
the API wants `Authorization: Bearer <token>` (or `token <token>`). ROOT/.mirror-token makes the
download addresses want `Authorization: Bearer <token>` (a mirror behind a token; 401 without it).
Tokens are never logged.

A download can be made to break off: ROOT/<tag>/.break-off holding "<file> <bytes>" makes the
server send the full Content-Length, then only that many bytes, then stop (the whole process
exits, as a server that dies mid-download would).

    python3 -m release.server ROOT ADDRESS PORT [PORTFILE] [--tls CERT KEY]
PORT 0 picks a free port; it is written to PORTFILE (or printed) once the server listens, with the
storage host's port on a second line. --tls serves HTTPS (both hosts) with that certificate.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
API = re.compile(r"^/repos/([A-Za-z0-9._-]+)/([A-Za-z0-9._-]+)/releases/(tags/([A-Za-z0-9._-]+)|latest|assets/([0-9]+))$")
STORAGE_SECRET = secrets.token_bytes(32)  # signs the storage addresses of this process only
STORAGE_SECONDS = 300  # how long a redirect's address stays valid


def _id(*parts: str) -> int:
    """A stable numeric id for a release or an asset (GitHub's are numbers too)."""
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "big")


def _assets(root: Path, tag: str) -> list[Path]:
    d = root / tag
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and SAFE.match(p.name)) \
        if SAFE.match(tag) and d.is_dir() else []


class _Base(http.server.BaseHTTPRequestHandler):
    root: Path
    name = "release-server"

    def log_message(self, fmt, *args):  # one line per request on stderr (never a header's value)
        sys.stderr.write(f"{self.name}: " + (fmt % args) + "\n")

    def _send(self, code: int, body: bytes, ctype: str = "application/json; charset=utf-8", headers=()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, tag: str, name: str) -> None:
        f = self.root / tag / name
        try:
            data = f.read_bytes()
        except OSError:
            return self.send_error(404)
        cut = None
        try:
            cname, n = (self.root / tag / ".break-off").read_text().split()
            cut = int(n) if cname == name else None
        except (OSError, ValueError):
            pass
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[:cut])
        self.wfile.flush()
        sys.stderr.write(f"{self.name}: stopping after {cut} of {len(data)} bytes of {name} (as asked)\n")
        os._exit(3)


def handler(root: Path, storage_base: str = ""):
    class Handler(_Base):
        def private_token(self) -> str | None:
            try:
                return (self.root / ".private").read_text().strip() or None
            except OSError:
                return None

        def mirror_token(self) -> str | None:
            try:
                return (self.root / ".mirror-token").read_text().strip() or None
            except OSError:
                return None

        def do_GET(self):
            path = self.path.split("?")[0]
            m = API.match(path)
            if m:
                return self.api(m)
            if self.private_token():  # a private repository's downloads need a browser session
                return self.send_error(404)
            mirror = self.mirror_token()
            if mirror and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {mirror}".encode()):
                return self.send_error(401)
            parts = path.strip("/").split("/")
            if parts[:3] == ["releases", "latest", "download"] and len(parts) == 4 and SAFE.match(parts[3]):
                try:
                    tag = (self.root / "latest").read_text().strip()
                except OSError:
                    return self.send_error(404, "no latest release")
                self.send_response(302)
                self.send_header("Location", f"/releases/download/{tag}/{parts[3]}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if parts[:2] != ["releases", "download"] or len(parts) != 4 or not all(SAFE.match(p) for p in parts[2:]) \
                    or parts[3].startswith("."):
                return self.send_error(404)
            return self._file(parts[2], parts[3])

        def api(self, m: re.Match) -> None:
            token = self.private_token()
            if token:
                auth = self.headers.get("Authorization", "")
                scheme, _, given = auth.partition(" ")
                given = given.strip() if scheme.lower() in ("bearer", "token") else ""
                if not given:
                    return self._send(404, b'{"message":"Not Found","documentation_url":"https://docs.github.com/rest","status":"404"}')
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return self._send(401, b'{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest","status":"401"}')
            owner, repo = m.group(1), m.group(2)
            api = f"http://{self.headers.get('Host', 'localhost')}/repos/{owner}/{repo}"
            if m.group(3) == "latest" or m.group(4):
                tag = m.group(4)
                if tag is None:
                    try:
                        tag = (self.root / "latest").read_text().strip()
                    except OSError:
                        tag = ""
                assets = _assets(self.root, tag)
                if not assets:
                    return self._send(404, b'{"message":"Not Found","status":"404"}')
                doc = {"url": f"{api}/releases/{_id(tag)}", "id": _id(tag), "tag_name": tag, "name": tag,
                       "draft": False, "prerelease": False,
                       "assets": [self.asset_doc(api, tag, p) for p in assets]}
                return self._send(200, json.dumps(doc, separators=(",", ":")).encode())
            wanted = int(m.group(5))
            for tag_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for p in _assets(self.root, tag_dir.name):
                    if _id(tag_dir.name, p.name) == wanted:
                        if self.headers.get("Accept", "") != "application/octet-stream":
                            doc = self.asset_doc(api, tag_dir.name, p)
                            return self._send(200, json.dumps(doc, separators=(",", ":")).encode())
                        expires = int(time.time()) + STORAGE_SECONDS
                        where = f"/storage/{tag_dir.name}/{p.name}"
                        sig = hmac.new(STORAGE_SECRET, f"{where} {expires}".encode(), "sha256").hexdigest()
                        location = f"{storage_base}{where}?X-Amz-Expires={expires}&X-Amz-Signature={sig}"
                        return self._send(302, b"", headers=[("Location", location)])
            return self._send(404, b'{"message":"Not Found","status":"404"}')

        def asset_doc(self, api: str, tag: str, p: Path) -> dict:
            return {"url": f"{api}/releases/assets/{_id(tag, p.name)}", "id": _id(tag, p.name), "name": p.name, "label": "",
                    "content_type": "application/octet-stream", "state": "uploaded", "size": p.stat().st_size,
                    "browser_download_url": f"http://{self.headers.get('Host', 'localhost')}/releases/download/{tag}/{p.name}"}

    Handler.root = root
    return Handler


def storage_handler(root: Path):
    """The host GitHub's asset API redirects to: its own signed addresses, no Authorization."""
    class Storage(_Base):
        name = "release-storage"

        def do_GET(self):
            u = urlsplit(self.path)
            parts = u.path.strip("/").split("/")
            q = parse_qs(u.query)
            if self.headers.get("Authorization") is not None:
                sys.stderr.write(f"{self.name}: REFUSED a request carrying an Authorization header "
                                 f"(a leaked token) for {u.path}\n")
                return self._send(400, b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; "
                                       b"only the X-Amz-Algorithm query parameter, Signature query string parameter or the "
                                       b"Authorization header should be specified</Message></Error>", "application/xml")
            if len(parts) != 3 or parts[0] != "storage" or not all(SAFE.match(p) for p in parts[1:]):
                return self.send_error(404)
            try:
                expires = int(q["X-Amz-Expires"][0])
                sig = q["X-Amz-Signature"][0]
            except (KeyError, ValueError):
                return self._send(403, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
            want = hmac.new(STORAGE_SECRET, f"{u.path} {expires}".encode(), "sha256").hexdigest()
            if not hmac.compare_digest(want, sig) or expires < time.time():
                return self._send(403, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
            return self._file(parts[1], parts[2])

    Storage.root = root
    return Storage


def main(argv: list[str]) -> int:
    tls = None
    if "--tls" in argv:
        i = argv.index("--tls")
        tls, argv = (argv[i + 1], argv[i + 2]), argv[:i] + argv[i + 3:]
    root, address, port = Path(argv[0]), argv[1], int(argv[2])
    scheme = "https" if tls else "http"
    storage = http.server.ThreadingHTTPServer((address, 0), storage_handler(root))
    server = http.server.ThreadingHTTPServer((address, port), handler(root, f"{scheme}://{address}:{storage.server_address[1]}"))
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        for s in (server, storage):
            s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    real = f"{server.server_address[1]}\n{storage.server_address[1]}\n"
    if len(argv) > 3:
        tmp = Path(argv[3] + ".tmp")
        tmp.write_text(real)
        tmp.rename(argv[3])
    else:
        print(real, end="", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
