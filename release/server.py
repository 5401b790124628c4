"""A release server for the lab and the tests, laid out as GitHub's release downloads:

  /releases/download/<tag>/<file>   the file ROOT/<tag>/<file> (ROOT is a dist/ directory)
  /releases/latest/download/<file>  a 302 redirect to the tag named in ROOT/latest

A download can be made to break off: ROOT/<tag>/.break-off holding "<file> <bytes>" makes the
server send the full Content-Length, then only that many bytes, then stop (the whole process
exits, as a server that dies mid-download would).

    python3 -m release.server ROOT ADDRESS PORT [PORTFILE]
PORT 0 picks a free port; it is written to PORTFILE (or printed) once the server listens.
"""
from __future__ import annotations

import http.server
import os
import re
import sys
from pathlib import Path

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def handler(root: Path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one line per request on stderr
            sys.stderr.write("release-server: " + (fmt % args) + "\n")

        def do_GET(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:3] == ["releases", "latest", "download"] and len(parts) == 4 and SAFE.match(parts[3]):
                try:
                    tag = (root / "latest").read_text().strip()
                except OSError:
                    return self.send_error(404, "no latest release")
                self.send_response(302)
                self.send_header("Location", f"/releases/download/{tag}/{parts[3]}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if parts[:2] != ["releases", "download"] or len(parts) != 4 or not all(SAFE.match(p) for p in parts[2:]) \
                    or parts[3].startswith("."):
                return self.send_error(404)
            f = root / parts[2] / parts[3]
            try:
                data = f.read_bytes()
            except OSError:
                return self.send_error(404)
            cut = None
            try:
                name, n = (root / parts[2] / ".break-off").read_text().split()
                cut = int(n) if name == parts[3] else None
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
            sys.stderr.write(f"release-server: stopping after {cut} of {len(data)} bytes of {parts[3]} (as asked)\n")
            os._exit(3)

    return Handler


def main(argv: list[str]) -> int:
    root, address, port = Path(argv[0]), argv[1], int(argv[2])
    server = http.server.ThreadingHTTPServer((address, port), handler(root))
    real = str(server.server_address[1])
    if len(argv) > 3:
        tmp = Path(argv[3] + ".tmp")
        tmp.write_text(real + "\n")
        tmp.rename(argv[3])
    else:
        print(real, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
