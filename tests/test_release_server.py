"""release/server.py answers as GitHub does: the download addresses of a public repository (or a
static mirror), and for a private one the REST API (release by tag, latest release, asset with
`Accept: application/octet-stream` redirected to a storage host that must not get the token)."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest

from support import REPO

TOKEN = "ghp_test0123456789abcdef"  # a made-up token: the server's test of who may read


@pytest.fixture
def server(tmp_path):
    dist = tmp_path / "dist"
    (dist / "v1.0.0").mkdir(parents=True)
    (dist / "v1.0.0" / "SHA256SUMS").write_text("sums\n")
    (dist / "v1.0.0" / "acme.tar.gz").write_bytes(b"\x1f\x8b bundle bytes")
    (dist / "latest").write_text("v1.0.0\n")
    log = tmp_path / "server.log"
    port = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "release.server", str(dist), "127.0.0.1", "0", str(port)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    end = time.monotonic() + 20
    while not port.exists():
        assert p.poll() is None and time.monotonic() < end, log.read_text()
        time.sleep(0.02)
    api, storage = (int(x) for x in port.read_text().split())
    yield dist, api, storage, log
    p.terminate()
    p.wait(timeout=10)


def get(port: int, path: str, **headers) -> http.client.HTTPResponse:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    r.body = r.read()
    return r


def test_public_downloads_and_latest_redirect(server):
    dist, port, _, _ = server
    assert get(port, "/releases/download/v1.0.0/SHA256SUMS").body == b"sums\n"
    r = get(port, "/releases/latest/download/acme.tar.gz")
    assert r.status == 302 and r.headers["Location"] == "/releases/download/v1.0.0/acme.tar.gz"
    assert get(port, "/releases/download/v1.0.0/..%2flatest").status == 404


def test_private_repository_needs_a_token_and_the_asset_api(server):
    dist, port, storage, log = server
    (dist / ".private").write_text(TOKEN + "\n")
    assert get(port, "/releases/download/v1.0.0/SHA256SUMS").status == 404  # no browser session
    assert get(port, "/repos/o/r/releases/tags/v1.0.0").status == 404  # GitHub hides a private repo
    assert get(port, "/repos/o/r/releases/tags/v1.0.0", Authorization="Bearer nope").status == 401
    r = get(port, "/repos/o/r/releases/tags/v1.0.0", Authorization=f"Bearer {TOKEN}")
    assert r.status == 200
    doc = json.loads(r.body)
    assert doc["tag_name"] == "v1.0.0" and {a["name"] for a in doc["assets"]} == {"SHA256SUMS", "acme.tar.gz"}
    latest = json.loads(get(port, "/repos/o/r/releases/latest", Authorization=f"token {TOKEN}").body)
    assert latest["assets"] == doc["assets"]
    asset = next(a for a in doc["assets"] if a["name"] == "acme.tar.gz")
    assert asset["url"].endswith(f"/repos/o/r/releases/assets/{asset['id']}") and asset["size"] == len(b"\x1f\x8b bundle bytes")
    # without Accept: octet-stream, the asset's JSON; with it, a redirect to the storage host
    meta = get(port, f"/repos/o/r/releases/assets/{asset['id']}", Authorization=f"Bearer {TOKEN}")
    assert json.loads(meta.body)["name"] == "acme.tar.gz"
    r = get(port, f"/repos/o/r/releases/assets/{asset['id']}", Authorization=f"Bearer {TOKEN}", Accept="application/octet-stream")
    assert r.status == 302
    where = r.headers["Location"]
    assert where.startswith(f"http://127.0.0.1:{storage}/storage/v1.0.0/acme.tar.gz?") and storage != port
    path = where.split(str(storage), 1)[1]
    # the storage host refuses the token (and says so in its log); without it, the bytes
    assert get(storage, path, Authorization=f"Bearer {TOKEN}").status == 400
    assert "REFUSED a request carrying an Authorization header" in log.read_text()
    assert get(storage, path).body == (dist / "v1.0.0/acme.tar.gz").read_bytes()
    assert get(storage, path.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status == 403  # forged
    assert get(storage, "/storage/v1.0.0/acme.tar.gz").status == 403  # unsigned
    assert TOKEN not in log.read_text()


def test_unknown_tags_and_assets_are_404(server):
    dist, port, _, _ = server
    assert get(port, "/repos/o/r/releases/tags/v9.9.9").status == 404
    assert get(port, "/repos/o/r/releases/assets/1", Accept="application/octet-stream").status == 404
