"""The lab's stand-in for a router's `dnsmasq reload` after fetch/reconcile changed its DNS files:
runs inside the router's mount namespace, rebuilds the options the platform would give dnsmasq
(EL: the base options with conf-dir=/etc/dnsmasq.d; OpenWrt: the base options plus what its init
script and /etc/wan/openwrt-dns make of the installed /etc/wan/dnsmasq.conf) and restarts the router's dnsmasq.

    python3 dns_reload.py ROUTER_STATE_DIR el|openwrt
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from render.openwrt import dnsmasq_options


def main(state: Path, platform: str) -> int:
    lines = (state / "dnsmasq.base").read_text().splitlines()
    if platform == "openwrt":
        lines += dnsmasq_options(Path("/"))
    (state / "dnsmasq.conf").write_text("\n".join(lines) + "\n")
    try:
        pid = int((state / "dnsmasq.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            os.kill(pid, 0)
            time.sleep(0.02)
    except (OSError, ValueError):
        pass  # not running (or gone now)
    return subprocess.run(["dnsmasq", f"--conf-file={state / 'dnsmasq.conf'}"]).returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
