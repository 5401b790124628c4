"""Did pluto take every keyword of our rendering? (the `pluto_config` check)

A keyword pluto's config parser drops is not an error for it: the conn loads and the tunnel comes
up, with pluto's default in place of what the WAN declares. Libreswan 5.2 logs
'FILE:LINE: warning: invalid, keyword ignored: KEY=VALUE' (v5.2 lib/libipsecconf/parser.y:246-263
parser_kw_warning, called from parser_kw_sparse_name :568-585 and the other kinds), 4.10
"Warning: ignored obsolete keyword 'K'" / "Warning: obsolete keyword 'K' ignored"
(v4.10 lib/libipsecconf/confread.c:381-388, 949-957). Seen in the lab: a 5.2 pluto logged
`acme-berlin.conf:19: warning: invalid, keyword ignored: encapsulation=aes_gcm256` for the line
`esp=aes_gcm256` and proposed its default ESP list instead of the profile's (docs/platforms.md).
The proof reads each router's pluto log of this boot (no process)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .contracts import Check

if TYPE_CHECKING:
    from .engine import Lab

IGNORED_RE = re.compile(r"^.*(?:keyword ignored|ignored obsolete keyword|obsolete keyword '[^']*' ignored).*$", re.M)


def ignored(log: str) -> list[str]:
    """The lines of a pluto log that say a config keyword was dropped (timestamps cut)."""
    return [re.sub(r"^\w{3} +\d+ [\d:.]+: ", "", m.group(0)).strip() for m in IGNORED_RE.finditer(log)]


def checks(lab: Lab) -> Iterator[Check]:
    """One `pluto_config` check per router: its pluto dropped none of the rendering's keywords."""
    for name in lab.view.names:
        router = lab.routers[name]
        lines = ignored(router.logs().get("pluto.log", ""))
        yield Check("pluto_config", name, name, not lines, {
            "libreswan": router.site.libreswan, "ignored": lines[:10],
            "why": "" if not lines else "pluto ignored keywords of the rendering and uses its defaults for them: "
                   + "; ".join(lines[:3])})
