"""Raw RSA host keys as Libreswan writes and reads them: `leftrsasigkey=0s<base64>` and the CKAID.

Each router makes its own key pair in its NSS database (`ipsec newhostkey`, router/enrol); only
the public half and its CKAID enter the site file. Why raw RSA and not raw ECDSA (both exist in
Libreswan 4.10 to 5.2, lib/libipsecconf/keywords.c v4.10:435-437, v5.2:403-405): a key rollover
without a flag day needs a peer to hold two keys for one IKE id, and the only way to give pluto a
second key is `ipsec whack --keyid ID --addkey --pubkeyrsa KEY`; whack's option table has
`pubkeyrsa` but no `pubkeyecdsa` entry (programs/whack/whack.c v4.10:587, v5.2:685: the
`case OPT_PUBKEYECDSA` at v4.10:1341 / v5.2:1267 is unreachable), so an ECDSA key cannot be added
beside another from the command line in any of these versions.

The text form is RFC 3110 in base64 behind `0s`: one byte exponent length (or 0 and two bytes),
the exponent, the modulus (lib/libswan/pubkey_rsa.c). The CKAID is what NSS files the private key
under: SHA-1 of the modulus (PK11_MakeIDFromPubKey, lib/libswan/pubkey_rsa.c v4.10:216), shown by
`ipsec showhostkey --list`; it is also the key's fingerprint in the plan.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

MIN_BITS = 2048  # FIPS 186-4's floor; `ipsec newhostkey` makes 3072 to 3824 bits (rsasigkey.c v4.10:206-209)
MAX_BITS = 8192
CKAID = re.compile(r"[0-9a-f]{40}\Z")


@dataclass(frozen=True)
class HostKey:
    """One router's public key: the `rsasigkey=` value and the CKAID of its private half."""

    rsasigkey: str  # "0s" + base64 (RFC 3110)
    ckaid: str  # 40 lower-case hex digits

    @property
    def fingerprint(self) -> str:
        """How the plan and the docs name a key: its CKAID, as `ipsec showhostkey --list` prints it."""
        return self.ckaid


def parse_rsasigkey(text: str) -> tuple[bytes, bytes] | str:
    """(exponent, modulus) of a `0s...` raw RSA key, or a sentence saying what is wrong with it."""
    if not text.startswith("0s"):
        return "does not start with 0s (the base64 form `ipsec showhostkey --left --ckaid CKAID` prints)"
    body = text[2:]
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", body) or len(body) % 4:
        return "is not valid base64 after 0s (copy the whole value from `ipsec showhostkey`, on one line)"
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64 after 0s"
    if not raw:
        return "is empty"
    n = raw[0]
    start = 1
    if n == 0:
        if len(raw) < 3:
            return "is cut short (no exponent)"
        n = int.from_bytes(raw[1:3], "big")
        start = 3
    exponent, modulus = raw[start:start + n], raw[start + n:]
    if n == 0 or len(exponent) < n or not modulus:
        return "is cut short: it holds no RSA modulus (copy the whole value)"
    if exponent[0] == 0 or modulus[0] == 0:
        return "is not a raw RSA key (leading zero bytes)"
    e = int.from_bytes(exponent, "big")
    if e < 3 or e % 2 == 0:
        return f"has the exponent {e}, which no RSA key has (a damaged value?)"
    bits = int.from_bytes(modulus, "big").bit_length()
    if bits < MIN_BITS:
        return f"is a {bits}-bit RSA key; use at least {MIN_BITS} bits (`ipsec newhostkey` makes 3072 or more)"
    if bits > MAX_BITS:
        return f"is a {bits}-bit RSA key; more than {MAX_BITS} bits is not supported"
    return exponent, modulus


def ckaid_of(rsasigkey: str) -> str:
    """The CKAID NSS gives the private half of a (well-formed) raw RSA key: SHA-1 of its modulus."""
    parsed = parse_rsasigkey(rsasigkey)
    if isinstance(parsed, str):
        raise ValueError(parsed)
    return hashlib.sha1(parsed[1]).hexdigest()


def rsasigkey_from_numbers(e: int, n: int) -> str:
    """The `0s...` text of the RSA public key (e, n): for the lab's and the tests' own keys."""
    eb = e.to_bytes((e.bit_length() + 7) // 8, "big")
    nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
    head = bytes([len(eb)]) if len(eb) < 256 else b"\0" + len(eb).to_bytes(2, "big")
    return "0s" + base64.b64encode(head + eb + nb).decode()
