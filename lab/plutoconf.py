"""Did pluto take every keyword of our rendering? (a `pluto_config` check per router)

A keyword pluto's config parser drops is not an error for it: the conn loads and the tunnel comes
up, with pluto's default in place of what the WAN declares. Libreswan 5.2 logs
'FILE:LINE: warning: invalid, keyword ignored: KEY=VALUE' (v5.2 lib/libipsecconf/parser.y:246-263
parser_kw_warning, called from parser_kw_sparse_name :568-585 and the other kinds), 4.10
"Warning: ignored obsolete keyword 'K'" / "Warning: obsolete keyword 'K' ignored"
(v4.10 lib/libipsecconf/confread.c:381-388, 949-957). A router whose pluto dropped a keyword of the
rendering fails this check: what it ran is NOT what the WAN declares.

Seen in the lab until session 6, and why (a lab artefact, not a Libreswan bug): under User-Mode
Linux a 5.2 pluto logged `acme-berlin.conf:19: warning: invalid, keyword ignored:
encapsulation=aes_gcm256` for the line `esp=aes_gcm256` (8 of 8 runs) and proposed its default ESP
list. The keyword `esp` had been looked up as `encapsulation` (the entry before it in v5.2
lib/libipsecconf/keywords.c:522/541; parser.lex:329-373 parser_find_keyword compares with
strcaseeq). pluto loads the conns by fork+exec of `addconn` with an EMPTY environment (v5.2
programs/pluto/server.c:1057-1066, `char *newenv[] = { NULL }`; v4.10 server.c:1058 too), so
addconn ran without the GLIBC_TUNABLES that keep glibc's string functions on SSE2 under UML (lab/
uml_xstate.py: UML on this AVX-512 host carries no vector state beyond the FXSAVE area), and its
AVX-512 (EVEX) string functions ran on registers UML had not kept (measured in the guest: 5 of 5
runs of `addconn --checkconfig` with an empty environment, 0 of 5 with the tunables or with only
AVX-512 masked; docs/platforms.md). lab/router-setup.sh now wraps
addconn in each router's mount namespace so it gets the tunables; a real router (no UML) has its
whole vector state and is not concerned. It reads each router's pluto log (no process)."""
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
    """One `pluto_config` check per router: its pluto (and the addconn it ran) took every keyword
    of the rendering; evidence: the Libreswan major and the lines that say what was dropped."""
    for name in lab.view.names:
        router = lab.routers[name]
        lines = ignored(router.logs().get("pluto.log", ""))
        yield Check("pluto_config", name, name, not lines,
                    {"libreswan": router.site.libreswan, "ignored": lines[:5]})
