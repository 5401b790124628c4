"""Which IKE and ESP proposals a crypto profile may use: an allowlist, not a blocklist.

A proposal is `ENCRYPT[KEYLEN][-INTEG][;DH]` as Libreswan's proposal parser reads it
(libreswan v4.10 lib/libswan/proposals.c:659-790 `proposal_parse_encrypt`: `<ealg>`, `<ealg><eklen>`,
`<ealg>_<eklen>`, `<ealg>-<eklen>`; lib/libswan/v2_proposals.c:166 splits on "-;+"). The names below
are the `.names` of the algorithm tables in lib/libswan/ike_alg_{aes,camellia,sha2,dh,...}.c, which are
the same at v4.10 and v5.2 (checked against both tags), and every allowed form is accepted by
`ipsec algparse -v2` of Debian's 4.10 (tests/test_validate.py runs it). Anything not listed is refused.

Weak algorithms are known by name and refused unless the profile lists them, on purpose, under
`insecure:`; the plan shows that setting. MODP768/MODP1024 and the DH22-24 groups are not built
into Libreswan 4.x/5.x by default (mk/config.mk v4.10:700-717 `USE_DH2 ?= $(ALL_ALGS)`; CHANGES:
"pluto: Disable support for DH2/modp1024 at compile time"), so no setting allows them.
"""
from __future__ import annotations

import re

KEY_LENGTHS = (128, 192, 256)

# name -> (canonical, AEAD?, key lengths allowed (() = none may be given), usable in IKE?)
_AES = ("AES_CBC", False, KEY_LENGTHS, True)
_CTR = ("AES_CTR", False, KEY_LENGTHS, True)
_GCM = ("AES_GCM_16", True, KEY_LENGTHS, True)
_CCM = ("AES_CCM_16", True, KEY_LENGTHS, False)  # algparse: AES_CCM is ESP only
_CHACHA = ("CHACHA20_POLY1305", True, (), True)
_CAMELLIA = ("CAMELLIA_CBC", False, KEY_LENGTHS, True)
_CAMELLIA_CTR = ("CAMELLIA_CTR", False, KEY_LENGTHS, False)
ENCRYPT = {
    "aes": _AES, "aes_cbc": _AES, "aesctr": _CTR, "aes_ctr": _CTR,
    "aes_gcm": _GCM, "aes_gcm_16": _GCM, "aes_gcm_c": _GCM,
    "aes_ccm": _CCM, "aes_ccm_16": _CCM, "aes_ccm_c": _CCM,
    "chacha20_poly1305": _CHACHA, "chacha20poly1305": _CHACHA,
    "camellia": _CAMELLIA, "camellia_cbc": _CAMELLIA, "camellia_ctr": _CAMELLIA_CTR,
}
INTEG = {n: "SHA2_256" for n in ("sha2", "sha256", "sha2_256", "sha2_256_128", "hmac_sha2_256", "hmac_sha2_256_128")}
INTEG |= {n: "SHA2_384" for n in ("sha384", "sha2_384", "sha2_384_192", "hmac_sha2_384", "hmac_sha2_384_192")}
INTEG |= {n: "SHA2_512" for n in ("sha512", "sha2_512", "sha2_512_256", "hmac_sha2_512", "hmac_sha2_512_256")}
DH = {n: "MODP2048" for n in ("modp2048", "dh14")} | {n: "MODP3072" for n in ("modp3072", "dh15")}
DH |= {n: "MODP4096" for n in ("modp4096", "dh16")} | {n: "MODP6144" for n in ("modp6144", "dh17")}
DH |= {n: "MODP8192" for n in ("modp8192", "dh18")} | {n: "DH19" for n in ("dh19", "ecp_256", "ecp256")}
DH |= {n: "DH20" for n in ("dh20", "ecp_384", "ecp384")} | {n: "DH21" for n in ("dh21", "ecp_521", "ecp521")}
DH |= {n: "DH31" for n in ("dh31", "curve25519")}

# The weak ones, by the name `insecure:` uses for them.
WEAK_ENCRYPT = {"3des": "3des", "3des_cbc": "3des", "null": "null", "null_auth_aes_gmac": "null", "aes_gmac": "null"}
WEAK_INTEG = {n: "sha1" for n in ("sha", "sha1", "sha1_96", "hmac_sha1", "hmac_sha1_96")}
WEAK_INTEG |= {n: "md5" for n in ("md5", "hmac_md5", "hmac_md5_96")}
WEAK_DH = {"modp1536": "modp1536", "dh5": "modp1536"}
INSECURE = ("3des", "md5", "modp1536", "null", "sha1")  # what `insecure:` may name
WHY = {"null": "no encryption, no integrity or no key exchange", "3des": "a 64-bit block cipher, open to Sweet32",
       "md5": "a broken hash", "sha1": "deprecated by RFC 8247", "modp1536": "a group below 2048 bits, RFC 8247"}
NOT_BUILT = {"modp768", "dh1", "modp1024", "dh2", "dh22", "dh23", "dh24"}
NONE = {"none", "null"}


def check_proposal(text: str, kind: str, insecure: frozenset[str]) -> tuple[list[str], set[str]]:
    """The problems of one `ike=` or `esp=` proposal (kind "ike"/"esp") and the weak algorithms it
    uses. A weak algorithm named in `insecure` is not a problem, but is still returned."""
    parts = re.split(r"([-;])", text)
    tokens = [(parts[0], "")] + [(parts[i + 1], parts[i]) for i in range(1, len(parts) - 1, 2)]
    problems: list[str] = []
    weak: set[str] = set()
    enc, _ = tokens.pop(0)
    keylen = None
    if tokens and tokens[0][1] == "-" and tokens[0][0].isdigit():
        keylen = tokens.pop(0)[0]
    enc_info, aead = _encrypt(enc, keylen, kind, problems, weak)
    if aead is None:
        return problems, weak
    # [-INTEG] then [(-|;)DH]: Libreswan's v2 parser takes <encr>-<prf|integ> before any DH,
    # and a DH after '-' only once an integrity/PRF came first (algparse: ike=aes256-dh19 fails).
    if tokens and tokens[0][1] == "-":
        name = tokens.pop(0)[0]
        if name in NONE:
            if not aead:
                weak.add("null")  # non-AEAD without integrity (Libreswan refuses it too)
        elif name in INTEG:
            if aead and kind == "esp":
                problems.append(f"{enc} carries its own integrity; drop -{name} "
                                "(Libreswan: 'AEAD ESP encryption algorithm must have NONE as the integrity algorithm')")
        elif name in WEAK_INTEG:
            weak.add(WEAK_INTEG[name])
        else:
            problems.append(f"unknown or unsupported integrity algorithm {name!r}; use one of: sha2_256, sha2_384, sha2_512")
        if tokens and tokens[0][1] == "-":
            _dh(tokens.pop(0)[0], problems, weak)
    if tokens and tokens[0][1] == ";":
        _dh(tokens.pop(0)[0], problems, weak)
    if tokens:
        problems.append("has more parts than ENCRYPT-INTEG;DH; write one proposal per list item")
    return problems, weak


def _encrypt(enc: str, keylen: str | None, kind: str, problems: list[str], weak: set[str]):
    """(canonical, AEAD?) of the encryption part, or (None, None) after adding a problem."""
    name, length = enc, keylen
    if name not in ENCRYPT and name not in WEAK_ENCRYPT and length is None:
        # <ealg><eklen> or <ealg>_<eklen>, as Libreswan tries after the plain lookup fails
        m = re.fullmatch(r"(.*?)_?([0-9]+)", name)
        if m and (m.group(1) in ENCRYPT or m.group(1) in WEAK_ENCRYPT):
            name, length = m.group(1), m.group(2)
    if name in WEAK_ENCRYPT:
        weak.add(WEAK_ENCRYPT[name])
        return WEAK_ENCRYPT[name], name in ("null_auth_aes_gmac", "aes_gmac")  # GMAC: integrity only
    if name not in ENCRYPT:
        problems.append(f"unknown or unsupported encryption algorithm {enc!r}; use one of: aes_gcm256, aes256, "
                        "aes_ctr256, chacha20_poly1305" + (", aes_ccm256" if kind == "esp" else ""))
        return None, None
    canonical, aead, lengths, in_ike = ENCRYPT[name]
    if kind == "ike" and not in_ike:
        problems.append(f"{name} is for ESP only (Libreswan has no IKE {canonical}); use aes_gcm256 or aes256 here")
        return None, None
    if length is not None and int(length) not in lengths:
        allowed = ", ".join(map(str, lengths)) if lengths else "none (it has a fixed key)"
        problems.append(f"{canonical} with a key length of {length}; allowed key lengths: {allowed}")
        return None, None
    return canonical, aead


def _dh(name: str, problems: list[str], weak: set[str]) -> None:
    if name in DH:
        return
    if name in WEAK_DH:
        weak.add(WEAK_DH[name])
    elif name in NONE or name == "dh0":
        weak.add("null")
    elif name in NOT_BUILT:
        problems.append(f"{name} is not built into Libreswan 4.x/5.x (and too weak); use dh19, dh20, dh31 or modp2048 or larger")
    else:
        problems.append(f"unknown key exchange group {name!r}; use one of: dh19, dh20, dh21, dh31, modp2048, modp3072, modp4096")
