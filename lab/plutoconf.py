"""Did pluto take every keyword of our rendering? (a verdict note per router whose pluto did not)

A keyword pluto's config parser drops is not an error for it: the conn loads and the tunnel comes
up, with pluto's default in place of what the WAN declares. Libreswan 5.2 logs
'FILE:LINE: warning: invalid, keyword ignored: KEY=VALUE' (v5.2 lib/libipsecconf/parser.y:246-263
parser_kw_warning, called from parser_kw_sparse_name :568-585 and the other kinds), 4.10
"Warning: ignored obsolete keyword 'K'" / "Warning: obsolete keyword 'K' ignored"
(v4.10 lib/libipsecconf/confread.c:381-388, 949-957). Seen in the lab: a 5.2 pluto logged
`acme-berlin.conf:19: warning: invalid, keyword ignored: encapsulation=aes_gcm256` for the line
`esp=aes_gcm256` and proposed its default ESP list instead of the profile's (docs/platforms.md).
It reads each router's pluto log (no process)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Lab

IGNORED_RE = re.compile(r"^.*(?:keyword ignored|ignored obsolete keyword|obsolete keyword '[^']*' ignored).*$", re.M)


def ignored(log: str) -> list[str]:
    """The lines of a pluto log that say a config keyword was dropped (timestamps cut)."""
    return [re.sub(r"^\w{3} +\d+ [\d:.]+: ", "", m.group(0)).strip() for m in IGNORED_RE.finditer(log)]


def notes(lab: Lab) -> list[str]:
    """A verdict note per router whose pluto dropped keywords of the rendering: what it ran with is
    NOT what the WAN declares, so that part (its crypto, say) is not proven there. A note and not a
    failing check for now: Libreswan 5.2 in User-Mode Linux drops the first included conn's `esp=`
    on every run (8 of 8 here, mixed and generated WANs), the same files on the host never (4 of 4),
    cause not found (docs/platforms.md); failing on it would fail every lab with a 5.x router."""
    out = []
    for name in lab.view.names:
        router = lab.routers[name]
        lines = ignored(router.logs().get("pluto.log", ""))
        if lines:
            out.append(f"NOT PROVEN on {name} (Libreswan {router.site.libreswan}.x): its pluto ignored keywords of the "
                       f"rendering and used its own defaults for them: " + "; ".join(lines[:3]))
    return out
