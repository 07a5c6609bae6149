"""The JWT signing keyring: Ed25519 keys on disk, named by their RFC 7638 thumbprint.

On-disk layout (``STATE_DIR/jwt/``, made by :meth:`KeyRing.generate`, which the bootstrap
calls, and changed by :meth:`KeyRing.rotate`); every file is mode 0600::

    jwt/<kid>.pem      PKCS#8 PEM sealed with aico.keystore (role jwt/<kid>.pem);
                       kid = RFC 7638 thumbprint
    jwt/current        the kid that signs new tokens
    jwt/retired.json   {"<kid>": <unix time after which it no longer verifies>, ...}

Only the current key and the keys listed in ``retired.json`` are trusted; any other
``.pem`` file in the directory is ignored (a stray file cannot add a trusted key). A
retired key verifies tokens until its recorded time, then :meth:`KeyRing.prune` (called
by :meth:`KeyRing.rotate`, or by the owner on a timer) forgets it and deletes its file.

Every method that touches the disk (:meth:`load`, :meth:`generate`, :meth:`rotate`,
:meth:`prune`) blocks: call it before the reactor runs or in a thread. Nothing here
logs key material.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.logger import Logger

from aico.files import write_atomic
from aico.keystore import Keystore, KeystoreError

CURRENT_FILE = "current"
RETIRED_FILE = "retired.json"


class KeyRingError(Exception):
    """The key directory is missing, inconsistent or unreadable."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def thumbprint(public: Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of an Ed25519 public key."""
    x = b64url_encode(raw_public_bytes(public))
    # RFC 7638 §3: required members only, lexicographic order, no whitespace.
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def _is_kid(kid: str) -> bool:
    # A SHA-256 thumbprint in base64url is 43 characters; this also keeps kids from
    # naming paths outside the directory.
    return len(kid) == 43 and all(c.isascii() and (c.isalnum() or c in "-_") for c in kid)


def _role(kid: str) -> str:
    """The keystore role (associated data) of the key file of *kid*."""
    return f"jwt/{kid}.pem"


def read_current_kid(jwt_dir: str | Path) -> str:
    """The kid that ``jwt_dir/current`` names, checked to be a key id.

    Only the name is checked, not the key file it names (:meth:`KeyRing.load` reads
    that). Raises :class:`KeyRingError` if the file is unreadable or holds no key id.
    """
    path = Path(jwt_dir) / CURRENT_FILE
    try:
        kid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyRingError(f"{path}: cannot read the current key id") from e
    if not _is_kid(kid):
        raise KeyRingError(f"{path} does not hold a key id")
    return kid


@dataclass(frozen=True)
class _Key:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    #: Unix time after which this (retired) key no longer verifies; None while current.
    drop_at: float | None = None


class KeyRing:
    """The current signing key and the retired keys that still verify."""

    log = Logger()

    def __init__(self, current: _Key, retired: Mapping[str, _Key] | None = None,
                 keystore: Keystore | None = None) -> None:
        self._current = current
        #: Seals the keys this keyring writes (:meth:`rotate`); None in memory.
        self._keystore = keystore
        self._retired: dict[str, _Key] = dict(retired or {})

    # ------------------------------------------------------------------ disk

    @classmethod
    def generate(cls, jwt_dir: str | Path, keystore: Keystore) -> KeyRing:
        """Create *jwt_dir* (0700) with one fresh key (sealed by *keystore*) as current;
        refuses to overwrite."""
        d = Path(jwt_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (d / CURRENT_FILE).exists():
            raise KeyRingError(f"{d}: already holds a keyring")
        key = cls._new_key(d, keystore)
        try:
            # Linked into place, so a keyring made meanwhile by another process is kept.
            write_atomic(d / CURRENT_FILE, key.kid.encode("ascii") + b"\n", 0o600, overwrite=False)
        except FileExistsError:
            (d / f"{key.kid}.pem").unlink(missing_ok=True)
            raise KeyRingError(f"{d}: already holds a keyring") from None
        return cls(key, keystore=keystore)

    @classmethod
    def load(cls, jwt_dir: str | Path, keystore: Keystore, now: float | None = None) -> KeyRing:
        """Read the keyring; with *now*, retired keys past their time are left out."""
        d = Path(jwt_dir)
        kid = read_current_kid(d)
        current = cls._read_key(d, kid, keystore)
        retired: dict[str, _Key] = {}
        for rkid, drop_at in cls._read_retired(d).items():
            if rkid == kid or (now is not None and drop_at <= now):
                continue
            try:
                key = cls._read_key(d, rkid, keystore)
            except KeyRingError:
                cls.log.warn("retired JWT key {kid} is unreadable; skipped", kid=rkid)
                continue
            retired[rkid] = _Key(rkid, key.private, key.public, drop_at)
        return cls(current, retired, keystore)

    @classmethod
    def ephemeral(cls) -> KeyRing:
        """A keyring with one fresh key that lives in memory only (the in-memory test
        layer; nothing is written)."""
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        return cls(_Key(thumbprint(public), private, public))

    @staticmethod
    def _new_key(d: Path, keystore: Keystore) -> _Key:
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        kid = thumbprint(public)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        keystore.write_sealed(d / f"{kid}.pem", pem, _role(kid), overwrite=False)
        return _Key(kid, private, public)

    @classmethod
    def _read_key(cls, d: Path, kid: str, keystore: Keystore) -> _Key:
        if not _is_kid(kid):
            raise KeyRingError(f"{d}: {kid!r} is not a key id")
        path = d / f"{kid}.pem"
        try:
            st = path.stat()
            data = keystore.read_sealed(path, _role(kid))
        except KeystoreError as e:
            raise KeyRingError(str(e)) from e
        except OSError as e:
            raise KeyRingError(f"{path}: cannot read ({e.strerror})") from e
        if stat.S_IMODE(st.st_mode) & 0o077:
            cls.log.warn("JWT key file {path} is readable by others; chmod 0600", path=str(path))
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyRingError(f"{path}: not a PKCS#8 PEM key") from e
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyRingError(f"{path}: not an Ed25519 key")
        public = private.public_key()
        if thumbprint(public) != kid:
            raise KeyRingError(f"{path}: file name does not match the key's thumbprint")
        return _Key(kid, private, public)

    @staticmethod
    def _read_retired(d: Path) -> dict[str, float]:
        path = d / RETIRED_FILE
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise KeyRingError(f"{path}: unreadable ({e})") from e
        if not isinstance(raw, dict):
            raise KeyRingError(f"{path}: expected an object")
        out: dict[str, float] = {}
        for kid, when in raw.items():
            if not isinstance(when, int | float) or isinstance(when, bool) or not _is_kid(kid):
                raise KeyRingError(f"{path}: bad entry for {kid!r}")
            out[kid] = float(when)
        return out

    def _write_retired(self, d: Path) -> None:
        data = {k.kid: k.drop_at for k in self._retired.values()}
        write_atomic(d / RETIRED_FILE, json.dumps(data, sort_keys=True).encode("utf-8"), 0o600)

    def rotate(self, jwt_dir: str | Path, now: float, keep_for: float) -> str:
        """Make a fresh key current; the old one verifies for *keep_for* more seconds.

        *keep_for* should be at least the longest token lifetime (``refresh_ttl`` if
        refresh tokens must survive the rotation, else ``access_ttl``) plus the leeway.
        Returns the new kid. Blocking: call it in a thread once the reactor runs.
        """
        d = Path(jwt_dir)
        if self._keystore is None:
            raise KeyRingError("this keyring was not loaded from disk; it cannot rotate there")
        self.prune(d, now)
        new = self._new_key(d, self._keystore)
        old = self._current
        self._retired[old.kid] = _Key(old.kid, old.private, old.public, now + keep_for)
        # retired.json first: a crash between the writes leaves the old key current
        # and the new one unused, never a current key that nobody can verify.
        self._write_retired(d)
        write_atomic(d / CURRENT_FILE, new.kid.encode("ascii") + b"\n", 0o600)
        self._current = new
        self.log.info("JWT signing key rotated; new kid {kid}", kid=new.kid)
        return new.kid

    def prune(self, jwt_dir: str | Path | None, now: float) -> list[str]:
        """Forget retired keys past their time (and delete their files if *jwt_dir*)."""
        gone = [k.kid for k in self._retired.values() if k.drop_at is not None and k.drop_at <= now]
        for kid in gone:
            del self._retired[kid]
        if jwt_dir is not None and gone:
            d = Path(jwt_dir)
            self._write_retired(d)
            for kid in gone:
                (d / f"{kid}.pem").unlink(missing_ok=True)
        return gone

    # ------------------------------------------------------------------ use

    @property
    def current_kid(self) -> str:
        return self._current.kid

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return self._current.private

    def kids(self, now: float | None = None) -> list[str]:
        """The kids that verify at *now* (all loaded ones when *now* is None), current first."""
        return [self._current.kid] + [
            k.kid
            for k in self._retired.values()
            if now is None or k.drop_at is None or k.drop_at > now
        ]

    def public_key(self, kid: str, now: float | None = None) -> Ed25519PublicKey | None:
        """The public key for *kid*, or None if unknown or retired past its time."""
        if kid == self._current.kid:
            return self._current.public
        key = self._retired.get(kid)
        if key is None:
            return None
        if now is not None and key.drop_at is not None and key.drop_at <= now:
            return None
        return key.public

    def jwks(self, now: float | None = None) -> dict[str, list[dict[str, str]]]:
        """The JWK Set of every key that still verifies (``/.well-known/jwks.json``)."""
        keys = []
        for kid in self.kids(now):
            public = self.public_key(kid)
            assert public is not None
            keys.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": b64url_encode(raw_public_bytes(public)),
                    "kid": kid,
                    "use": "sig",
                    "alg": "EdDSA",
                }
            )
        return {"keys": keys}
