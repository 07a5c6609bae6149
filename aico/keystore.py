"""Private keys at rest: sealed with a key-encryption key derived from a master secret.

Every private key aico keeps on disk (the device CA's, the server's, the JWT signing keys,
the CurveZMQ secret keys, a client's device key) is stored *sealed*: AES-256-GCM under a
key-encryption key (KEK) that Argon2id derives from a master secret. The master secret
comes from, in this order:

1. the platform keyring (the ``keyring`` package), when a usable backend exists (not the
   fail/null backend; looked up in a thread that may take at most a few seconds, so a
   locked or absent keyring daemon never hangs a start). The entry is service
   ``aico-gateway`` (``aico-client`` for a client directory), user = the directory's
   absolute path. ``AICO_NO_KEYRING=1`` skips the keyring;
2. the environment variable ``AICO_MASTER_PASSWORD``;
3. the file ``master-key`` (0600) in the directory itself, made with 32 random bytes when
   the directory is set up and nothing else is available. That keeps unattended starts
   working, but the secret lies beside the keys it protects: every start logs a warning.

The three sources hold the same kind of value (text), so moving the secret from the file
to the environment variable or the keyring is moving the text: nothing is re-encrypted.

``keystore.json`` (0600) in the directory holds the KDF parameters and salt, the source
used when it was made (a hint for error messages) and a sealed check value, so a wrong
master secret is told apart from a damaged key file::

    {"version": 1, "kdf": "argon2id", "salt": "<b64>", "t": 3, "m": 65536, "p": 4,
     "source": "file", "check": "<sealed>"}

A sealed file is text::

    -----BEGIN AICO ENCRYPTED KEY-----
    base64 of {"v": 1, "alg": "A256GCM", "role": ROLE, "nonce": b64, "ct": b64}
    -----END AICO ENCRYPTED KEY-----

with a random 96-bit nonce and ``aico-key:ROLE`` as associated data: a file sealed for
one role (``ca/ca.key``) does not open as another (``tls/server.key``).

A file that still holds a plain PEM private key or a plain ZeroMQ secret certificate (a
directory from before keys were sealed) is sealed in place the first time it is read.

Deriving the KEK costs about a quarter of a second and 64 MiB (RFC 9106's second
recommended parameter set, :data:`STRONG_KDF`), once per process start; everything here
blocks, so it runs before the reactor, in the CLI, or in a thread. Tests make their
directories with :data:`TEST_KDF`, which costs nothing; the parameters are read back from
``keystore.json``, so a production directory always keeps the strong ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.logger import Logger

from aico.files import write_atomic

__all__ = [
    "ENV_MASTER_PASSWORD",
    "ENV_NO_KEYRING",
    "KEYSTORE_FILE",
    "MASTER_KEY_FILE",
    "STRONG_KDF",
    "TEST_KDF",
    "KdfParams",
    "Keystore",
    "KeystoreError",
    "MasterSecret",
    "client_keystore",
    "derive_kek",
    "is_sealed",
    "keyring_backend",
    "move_master_to_keyring",
    "open_keystore",
    "resolve_master_secret",
    "state_keystore",
]

#: The environment variable holding the master secret (source 2).
ENV_MASTER_PASSWORD = "AICO_MASTER_PASSWORD"  # noqa: S105 - a variable name
#: Set to 1 to never consult the platform keyring.
ENV_NO_KEYRING = "AICO_NO_KEYRING"
#: KDF parameters, salt and check value, in the protected directory.
KEYSTORE_FILE = "keystore.json"
#: The master secret when neither the keyring nor the environment has one (source 3).
MASTER_KEY_FILE = "master-key"
#: Keyring service names.
STATE_SERVICE = "aico-gateway"
CLIENT_SERVICE = "aico-client"

BEGIN = "-----BEGIN AICO ENCRYPTED KEY-----"
END = "-----END AICO ENCRYPTED KEY-----"
_VERSION = 1
_CHECK = b"aico keystore check v1"
_CHECK_ROLE = "keystore-check"
#: The longest a keyring lookup may take before it counts as unusable.
KEYRING_TIMEOUT = 5.0

_log = Logger(namespace="aico.keystore")

T = TypeVar("T")


class KeystoreError(ValueError):
    """A key file or the master secret cannot be used; the message names the file."""


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters: *t* passes over *m* KiB with *p* lanes."""

    t: int
    m: int
    p: int


#: RFC 9106 §4, second recommended option: t=3, m=64 MiB, p=4.
STRONG_KDF = KdfParams(t=3, m=65536, p=4)
#: For tests only: as cheap as Argon2id allows.
TEST_KDF = KdfParams(t=1, m=8, p=1)


def derive_kek(secret: bytes, salt: bytes, params: KdfParams) -> bytes:
    """The 32-byte key-encryption key: Argon2id(secret, salt) with *params*."""
    return hash_secret_raw(secret, salt, params.t, params.m, params.p, 32, Type.ID)


@dataclass(frozen=True)
class MasterSecret:
    """A master secret and where it came from."""

    secret: bytes
    #: "keyring", "env" or "file".
    source: str
    #: Human description of the source (keyring entry, variable name, file path).
    where: str

    def __repr__(self) -> str:  # never show the secret
        return f"MasterSecret(source={self.source!r}, where={self.where!r})"


# --------------------------------------------------------------------------- keyring


def _with_timeout(fn: Callable[[], T], timeout: float) -> T | None:
    """*fn()* in a daemon thread; None if it raised or did not finish within *timeout*."""
    box: list[T] = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # any failure means "no usable keyring"
            _log.debug("keyring: {error}", error=type(e).__name__)

    thread = threading.Thread(target=run, name="aico-keyring", daemon=True)
    thread.start()
    thread.join(timeout)
    return box[0] if box else None


def keyring_backend(env: Mapping[str, str] | None = None) -> Any | None:
    """The platform keyring backend if one is usable, else None (never hangs).

    Unusable: ``AICO_NO_KEYRING=1``, the ``keyring`` package missing, its fail or null
    backend, a chainer with no backends, or a backend that does not answer in time.
    """
    env = os.environ if env is None else env
    if env.get(ENV_NO_KEYRING, "") not in ("", "0"):
        return None
    try:
        import keyring
        from keyring.backends import chainer, fail, null
    except ImportError:
        return None
    backend = _with_timeout(keyring.get_keyring, KEYRING_TIMEOUT)
    if backend is None or isinstance(backend, fail.Keyring | null.Keyring):
        return None
    if isinstance(backend, chainer.ChainerBackend) and not backend.backends:
        return None
    return backend


def _keyring_get(backend: Any, service: str, user: str) -> str | None:
    value = _with_timeout(lambda: backend.get_password(service, user), KEYRING_TIMEOUT)
    return value if isinstance(value, str) and value else None


def _keyring_set(backend: Any, service: str, user: str, value: str) -> bool:
    def put() -> bool:
        backend.set_password(service, user, value)
        return bool(backend.get_password(service, user) == value)

    return bool(_with_timeout(put, KEYRING_TIMEOUT))


# --------------------------------------------------------------------------- master secret


def _new_secret_text() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")


def _read_master_file(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        _log.warn("{path} had mode {mode}; set to 0600", path=str(path), mode=f"{mode:04o}")
    secret = path.read_text(encoding="ascii").strip().encode("ascii")
    if not secret:
        raise KeystoreError(f"{path} is empty")
    return secret


def resolve_master_secret(
    directory: Path,
    *,
    service: str = STATE_SERVICE,
    create: bool = False,
    env: Mapping[str, str] | None = None,
) -> MasterSecret | None:
    """The master secret for *directory*: keyring entry, else env var, else master-key file.

    With *create*, a missing secret is made: a new random one in the keyring when it is
    usable, else the environment variable's value is taken, else a new ``master-key``
    file (0600). Without *create*, None when no source has one.
    """
    env = os.environ if env is None else env
    user = str(directory.absolute())
    backend = keyring_backend(env)
    where_keyring = f"the platform keyring (service {service!r}, user {user!r})"
    if backend is not None:
        value = _keyring_get(backend, service, user)
        if value:
            return MasterSecret(value.encode("utf-8"), "keyring", where_keyring)
    value = env.get(ENV_MASTER_PASSWORD, "")
    if value:
        return MasterSecret(value.encode("utf-8"), "env", f"${ENV_MASTER_PASSWORD}")
    path = directory / MASTER_KEY_FILE
    if path.exists():
        return MasterSecret(_read_master_file(path), "file", str(path))
    if not create:
        return None
    text = _new_secret_text()
    if backend is not None and _keyring_set(backend, service, user, text):
        return MasterSecret(text.encode("ascii"), "keyring", where_keyring)
    try:
        write_atomic(path, f"{text}\n".encode("ascii"), 0o600, overwrite=False)
    except FileExistsError:  # made meanwhile by another process: use that one
        pass
    return MasterSecret(_read_master_file(path), "file", str(path))


# --------------------------------------------------------------------------- sealing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    return base64.b64decode(text, validate=True)


def is_sealed(data: bytes) -> bool:
    """Whether *data* is in the sealed text format."""
    return data.lstrip().startswith(BEGIN.encode("ascii"))


_ZMQ_SECRET = re.compile(rb'^\s*secret-key\s*=\s*"[^"]{40}"\s*$', re.MULTILINE)


def _is_legacy_plain(data: bytes) -> bool:
    """A readable plain PEM private key, or a plain ZeroMQ certificate with a secret key
    (what a directory from before keys were sealed holds); a damaged file is neither."""
    if data.lstrip().startswith(b"-----BEGIN ") and b"PRIVATE KEY-----" in data:
        try:
            serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            return False
        return True
    return _ZMQ_SECRET.search(data) is not None


class Keystore:
    """Seals and opens key bytes with one key-encryption key."""

    def __init__(self, kek: bytes, source: str = "memory", where: str = "memory") -> None:
        if len(kek) != 32:
            raise ValueError("a key-encryption key is 32 bytes")
        self._aead = AESGCM(kek)
        #: Where the master secret came from ("keyring", "env", "file", or "memory").
        self.source = source
        self.where = where

    def __repr__(self) -> str:
        return f"Keystore(source={self.source!r})"

    @classmethod
    def ephemeral(cls) -> Keystore:
        """A keystore with a random KEK that lives in memory only (tests)."""
        return cls(secrets.token_bytes(32))

    @staticmethod
    def _aad(role: str) -> bytes:
        return f"aico-key:{role}".encode()

    def seal(self, data: bytes, role: str) -> bytes:
        """*data* encrypted for *role*, in the sealed text format."""
        nonce = secrets.token_bytes(12)
        ct = self._aead.encrypt(nonce, data, self._aad(role))
        envelope = json.dumps(
            {"v": _VERSION, "alg": "A256GCM", "role": role, "nonce": _b64(nonce), "ct": _b64(ct)},
            separators=(",", ":"),
        ).encode("utf-8")
        body = _b64(envelope)
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return ("\n".join([BEGIN, *lines, END]) + "\n").encode("ascii")

    def open(self, blob: bytes, role: str, name: str = "sealed data") -> bytes:
        """The bytes sealed in *blob* for *role*; :class:`KeystoreError` naming *name*."""
        text = blob.decode("ascii", "replace").strip()
        if not (text.startswith(BEGIN) and text.endswith(END)):
            raise KeystoreError(f"{name} is not an encrypted aico key")
        try:
            envelope = json.loads(_unb64("".join(text[len(BEGIN) : -len(END)].split())))
            if not isinstance(envelope, dict) or envelope.get("v") != _VERSION:
                raise ValueError("unknown version")
            sealed_role = envelope.get("role")
            nonce, ct = _unb64(envelope["nonce"]), _unb64(envelope["ct"])
        except (ValueError, KeyError, binascii.Error) as e:
            raise KeystoreError(f"{name} is a damaged encrypted key ({e})") from None
        if sealed_role != role:
            raise KeystoreError(
                f"{name} was sealed as {sealed_role!r}, not {role!r}: a key file was moved or "
                "swapped; restore the right file from a backup"
            )
        try:
            return self._aead.decrypt(nonce, ct, self._aad(role))
        except InvalidTag:
            raise KeystoreError(
                f"{name} cannot be decrypted with the master secret from {self.where}: "
                "wrong master secret, or the file was altered"
            ) from None

    # ------------------------------------------------------------------ files

    def write_sealed(self, path: Path, data: bytes, role: str, *, overwrite: bool = True) -> None:
        """Seal *data* for *role* and write it to *path*, 0600, atomically."""
        write_atomic(path, self.seal(data, role), 0o600, overwrite=overwrite)

    def read_sealed(self, path: Path, role: str) -> bytes:
        """The key bytes in *path*, sealed for *role*.

        A file that still holds a plain PEM private key or plain ZeroMQ secret certificate
        (from before keys were sealed) is sealed in place, and its bytes returned.
        """
        data = path.read_bytes()
        if not is_sealed(data) and _is_legacy_plain(data):
            self.write_sealed(path, data, role)
            _log.warn("{path} held a plain private key; it is now encrypted", path=str(path))
            return data
        return self.open(data, role, str(path))

    def migrate(self, path: Path, role: str) -> bool:
        """Seal *path* in place if it is a plain key; True if it was."""
        if not path.is_file():
            return False
        data = path.read_bytes()
        if is_sealed(data) or not _is_legacy_plain(data):
            return False
        self.read_sealed(path, role)
        return True


# --------------------------------------------------------------------------- opening


def _read_keystore_file(path: Path) -> dict[str, Any]:
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise ValueError("unknown version")
        if raw.get("kdf") != "argon2id":
            raise ValueError(f"unknown kdf {raw.get('kdf')!r}")
        for k in ("t", "m", "p"):
            if not isinstance(raw.get(k), int) or isinstance(raw.get(k), bool) or raw[k] < 1:
                raise ValueError(f"bad {k}")
        _unb64(raw.get("salt"))
        return raw
    except (OSError, ValueError, binascii.Error) as e:
        raise KeystoreError(f"{path} is unreadable ({e}); restore it from a backup") from None


def open_keystore(
    directory: Path,
    *,
    service: str = STATE_SERVICE,
    create: bool = False,
    kdf: KdfParams | None = None,
    env: Mapping[str, str] | None = None,
    warn_file: bool = True,
) -> Keystore:
    """The keystore of *directory* (a state directory or a client certificate directory).

    With *create*, a missing ``keystore.json`` (and master secret) is made, with *kdf*
    (default :data:`STRONG_KDF`). Logs a warning when the master secret is the
    ``master-key`` file (unless *warn_file* is False). Raises :class:`KeystoreError`
    with one line naming the file or the source when it cannot be opened.
    """
    path = directory / KEYSTORE_FILE
    if path.exists():
        meta = _read_keystore_file(path)
        master = resolve_master_secret(directory, service=service, create=False, env=env)
        if master is None:
            raise KeystoreError(
                f"no master secret for {directory}: it was set up with the master secret in "
                f"{meta.get('source', '?')}; provide it in the platform keyring, in "
                f"${ENV_MASTER_PASSWORD}, or in {directory / MASTER_KEY_FILE}"
            )
        params = KdfParams(meta["t"], meta["m"], meta["p"])
        kek = derive_kek(master.secret, _unb64(meta["salt"]), params)
        store = Keystore(kek, master.source, master.where)
        try:
            store.open(str(meta.get("check", "")).encode("ascii"), _CHECK_ROLE, str(path))
        except KeystoreError:
            raise KeystoreError(
                f"the master secret from {master.where} does not open {path} (it was set up "
                f"with the one in {meta.get('source', '?')}): wrong master secret"
            ) from None
    elif not create:
        raise KeystoreError(f"{path} does not exist: initialise {directory} first")
    else:
        master = resolve_master_secret(directory, service=service, create=True, env=env)
        assert master is not None
        params = kdf or STRONG_KDF
        salt = secrets.token_bytes(16)
        store = Keystore(derive_kek(master.secret, salt, params), master.source, master.where)
        meta = {
            "version": _VERSION,
            "kdf": "argon2id",
            "salt": _b64(salt),
            "t": params.t,
            "m": params.m,
            "p": params.p,
            "source": master.source,
            "check": store.seal(_CHECK, _CHECK_ROLE).decode("ascii"),
        }
        data = json.dumps(meta, indent=2).encode("utf-8") + b"\n"
        try:
            write_atomic(path, data, 0o600, overwrite=False)
        except FileExistsError:  # another process made it meanwhile: use theirs
            return open_keystore(directory, service=service, env=env, warn_file=warn_file)
        _log.info("{path}: keys sealed with the master secret from {where}",
                  path=str(path), where=master.where)
    if store.source == "file" and warn_file:
        _log.warn(
            "the master key {where} lies beside the keys it protects: anyone who can read "
            "{directory} can decrypt them. Move it to the platform keyring (aico-gateway keys "
            "master --to-keyring) or to the {env} environment variable "
            "(export {env}=\"$(cat {where})\", then delete the file); see docs/security.md",
            where=store.where,
            directory=str(directory),
            env=ENV_MASTER_PASSWORD,
        )
    return store


def move_master_to_keyring(
    directory: Path, *, service: str = STATE_SERVICE, env: Mapping[str, str] | None = None
) -> MasterSecret:
    """Put the master secret of *directory* into the platform keyring.

    The current secret (environment variable or ``master-key`` file) must open
    ``keystore.json``; it is stored as the keyring entry, read back, and then the
    ``master-key`` file is deleted. Nothing is re-encrypted: the secret stays the same.
    Returns where it was before. Raises :class:`KeystoreError`.
    """
    open_keystore(directory, service=service, env=env, warn_file=False)  # the secret works
    master = resolve_master_secret(directory, service=service, env=env)
    assert master is not None
    if master.source == "keyring":
        return master
    backend = keyring_backend(env)
    if backend is None:
        raise KeystoreError("no usable platform keyring here (see docs/security.md)")
    user = str(directory.absolute())
    if not _keyring_set(backend, service, user, master.secret.decode("utf-8")):
        raise KeystoreError(f"the platform keyring did not keep the entry {service!r}/{user!r}")
    if master.source == "file":
        (directory / MASTER_KEY_FILE).unlink()
    _log.info("the master secret of {directory} moved from {where} to the platform keyring",
              directory=str(directory), where=master.where)
    return master


def state_keystore(root: Path, *, create: bool = False, kdf: KdfParams | None = None,
                   env: Mapping[str, str] | None = None) -> Keystore:
    """The keystore of the gateway state directory *root* (keyring service aico-gateway)."""
    return open_keystore(root, service=STATE_SERVICE, create=create, kdf=kdf, env=env)


def client_keystore(cert_dir: Path, *, create: bool = True, kdf: KdfParams | None = None,
                    env: Mapping[str, str] | None = None) -> Keystore:
    """The keystore of a client's certificate directory (keyring service aico-client).

    The master secret: the keyring entry (service ``aico-client``, user = the directory's
    absolute path), else ``$AICO_MASTER_PASSWORD``, else ``cert_dir/master-key`` (0600).
    With *create* (the default) a directory without ``keystore.json`` gets one; the
    directory itself must exist. Use ``write_sealed(cert_dir / "device.key", pem,
    "device.key")`` and ``read_sealed(cert_dir / "device.key", "device.key")``.
    """
    return open_keystore(cert_dir, service=CLIENT_SERVICE, create=create, kdf=kdf, env=env)
