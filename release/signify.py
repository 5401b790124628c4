"""Ed25519 keys and signatures in the signify/usign format (OpenWrt's `usign`, OpenBSD's and
Debian's `signify-openbsd`), so a router verifies a release with the tool it already has.

Files are two lines: `untrusted comment: ...` and the base64 of
  public key  "Ed" + key number (8 bytes) + public key (32 bytes)
  signature   "Ed" + key number (8 bytes) + Ed25519 signature over the file (64 bytes)
  secret key  "Ed" + "BK" + KDF rounds (4, big-endian) + salt (16) + checksum (8: SHA-512 of the
              64-byte secret key, first 8 bytes) + key number (8) + secret key (64: seed + public)
We write secret keys without a passphrase (0 KDF rounds: the key is stored as is), which both
tools read; it lives in the CI secret store or in a git-ignored file, never in the repository.
signify also insists that the key numbers of key and signature match (usign only warns).
"""
from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignifyError(ValueError):
    """A key or signature file that is not what it should be (the message says what to do)."""


_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    keynum: bytes
    key: bytes

    def text(self, comment: str) -> str:
        return _file(comment, b"Ed" + self.keynum + self.key)

    def verify(self, signature: Signature, data: bytes) -> None:
        if signature.keynum != self.keynum:
            raise SignifyError(f"the signature was made by key {signature.keynum.hex()}, "
                               f"not by the trusted key {self.keynum.hex()}")
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature.sig, data)
        except InvalidSignature:
            raise SignifyError("the signature does not match the data (tampered, or signed by another key)") from None


@dataclass(frozen=True)
class Signature:
    keynum: bytes
    sig: bytes

    def text(self, comment: str) -> str:
        return _file(comment, b"Ed" + self.keynum + self.sig)


@dataclass(frozen=True, repr=False)
class SecretKey:
    keynum: bytes
    seed: bytes  # the 32-byte Ed25519 seed

    def __repr__(self) -> str:  # never print the key
        return f"SecretKey(keynum={self.keynum.hex()})"

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.keynum, Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes(**_RAW))

    def sign(self, data: bytes) -> Signature:
        return Signature(self.keynum, Ed25519PrivateKey.from_private_bytes(self.seed).sign(data))

    def text(self, comment: str) -> str:
        sk = self.seed + self.public.key
        body = b"Ed" + b"BK" + (0).to_bytes(4, "big") + bytes(16) + hashlib.sha512(sk).digest()[:8] + self.keynum + sk
        return _file(comment, body)


def generate() -> SecretKey:
    return SecretKey(secrets.token_bytes(8), secrets.token_bytes(32))


def _file(comment: str, body: bytes) -> str:
    if "\n" in comment:
        raise SignifyError("a comment must be one line")
    return f"untrusted comment: {comment}\n{base64.b64encode(body).decode()}\n"


def _body(text: str, what: str, size: int) -> bytes:
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith("untrusted comment: "):
        raise SignifyError(f"not a signify/usign {what} (line 1 must be 'untrusted comment: ...', line 2 base64)")
    try:
        body = base64.b64decode(lines[1].strip(), validate=True)
    except ValueError:
        raise SignifyError(f"the {what} is not valid base64 on its line 2") from None
    if len(body) != size or body[:2] != b"Ed":
        raise SignifyError(f"not an Ed25519 {what} in signify/usign format ({len(body)} bytes; expected {size} starting 'Ed')")
    return body


def read_public(text: str) -> PublicKey:
    b = _body(text, "public key", 42)
    return PublicKey(b[2:10], b[10:])


def read_signature(text: str) -> Signature:
    b = _body(text, "signature", 74)
    return Signature(b[2:10], b[10:])


def read_secret(text: str) -> SecretKey:
    b = _body(text, "secret key", 104)
    if b[2:4] != b"BK":
        raise SignifyError("the secret key uses an unknown KDF (expected 'BK')")
    rounds = int.from_bytes(b[4:8], "big")
    if rounds:
        raise SignifyError("the secret key is protected by a passphrase; make one without (release.keygen, or signify -G -n) "
                           "and keep it in the CI secret store")
    checksum, keynum, sk = b[24:32], b[32:40], b[40:104]
    if hashlib.sha512(sk).digest()[:8] != checksum:
        raise SignifyError("the secret key fails its own checksum (damaged or truncated)")
    key = SecretKey(keynum, sk[:32])
    if key.public.key != sk[32:]:
        raise SignifyError("the secret key's public half does not match its seed (damaged)")
    return key
