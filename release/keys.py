"""The release signing key pair: the public half committed (what routers trust), the secret half
in the CI secret store or a git-ignored file, never in git."""
from __future__ import annotations

import os
from pathlib import Path

from render.errors import Problem, WanError

from . import signify

PUBLIC_KEY = "release/wan-release.pub"  # committed: what routers trust
SECRET_ENV = "WAN_RELEASE_KEY"  # the secret key file's text, from the CI secret store
SECRET_FILE = ".wan-release.sec"  # or this git-ignored file at the repository root


def find_signing_key(repo: Path, file: Path | None = None) -> signify.SecretKey:
    """The release signing key: $WAN_RELEASE_KEY (CI secret store) or the ignored local file."""
    text = os.environ.get(SECRET_ENV)
    where = SECRET_ENV
    if file is not None or not text:
        path = file or repo / SECRET_FILE
        where = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise WanError([Problem(SECRET_ENV, 0, "", f"no release signing key: set {SECRET_ENV} to the text of the secret key "
                                                       f"file (CI secret store), or write it to {path} (git-ignored); "
                                                       "`./run release.keygen` makes a pair")]) from None
    try:
        return signify.read_secret(text)
    except signify.SignifyError as e:
        raise WanError([Problem(where, 0, "", f"the release signing key is unusable: {e}")]) from None


def trusted_key(repo: Path) -> signify.PublicKey:
    """The committed public key, release/wan-release.pub."""
    path = repo / PUBLIC_KEY
    try:
        return signify.read_public(path.read_text())
    except FileNotFoundError:
        raise WanError([Problem(PUBLIC_KEY, 0, "", "no trusted release key in the repository; `./run release.keygen` makes "
                                                   "a pair and writes the public half here (commit it)")]) from None
    except signify.SignifyError as e:
        raise WanError([Problem(PUBLIC_KEY, 1, "", f"{e}; restore it from git or make a new pair with release.keygen")]) from None


def keygen(repo: Path, secret_file: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """A new pair: the secret half written 0600 first, then the public half."""
    pub, sec = repo / PUBLIC_KEY, secret_file or repo / SECRET_FILE
    if not force and (pub.exists() or sec.exists()):
        raise WanError([Problem(str(pub if pub.exists() else sec), 0, "", "a release key exists already; routers trust it. "
                                "Use --force to replace it (then every router must be given the new public key)")])
    key = signify.generate()
    sec.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.text("wan release secret key (keep it in the CI secret store, never in git)"))
    pub.parent.mkdir(parents=True, exist_ok=True)
    pub.write_text(key.public.text(f"wan release public key {key.keynum.hex()}"))
    return pub, sec
