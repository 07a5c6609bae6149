"""The state directory: where it is, what it holds, and how a fresh one is made.

Layout (``docs/state.md`` has the whole story, with modes and how to back up and rotate)::

    STATE_DIR/                      0700
      keystore.json                 KDF parameters and salt of the key-encryption key, 0600
      master-key                    the master secret, only when neither the platform
                                    keyring nor AICO_MASTER_PASSWORD has it, 0600
      ca/ca.pem, ca/ca.key          device CA (ECDSA P-256), key sealed, 0600
      tls/server.pem, server.key    server certificate signed by the CA, key sealed, 0600
      jwt/<kid>.pem, jwt/current    Ed25519 signing keys (sealed, 0600), the active kid
      curve/…                       CurveZMQ key pairs, secrets sealed (see aico.bus.curve)
      registry.db                   SQLite registry, 0600
      initial-admin-password        the bootstrap admin's password, 0600
      ports.json                    written once every listener is up
      gateway.ipc                   the ZeroMQ ipc:// socket

:func:`bootstrap` is synchronous: it runs before the reactor starts (from ``makeService``)
and from ``aico-gateway init``. It is idempotent: each item is made only if it is missing,
and nothing that exists is ever overwritten, except that a private key still stored as
plain text (a directory from before keys were sealed) is sealed in place.

Every private key is sealed with :mod:`aico.keystore`: the key-encryption key comes from
a master secret in the platform keyring, ``$AICO_MASTER_PASSWORD`` or ``master-key``.

Permissions policy: a missing state directory is created 0700. An existing directory that
group or others can reach is tightened to 0700 if it is empty, and refused
(:class:`StateDirError`) if it is not, since its secrets may already have been read; the
operator checks it and runs ``chmod 700``. A directory owned by another user is refused.
Inside a 0700 directory a private file with a wider mode was never reachable by others,
so it is quietly tightened to 0600 (with a warning in the log).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from twisted.logger import Logger

from aico.bus.curve import CurveLayout, create_keypair, ensure_client, migrate_secrets
from aico.files import write_atomic
from aico.gateway.devices.ca import DeviceCA, load_certificate, load_private_key
from aico.gateway.devices.ca import save_certificate as _save_certificate
from aico.gateway.devices.ca import save_private_key as _save_private_key
from aico.gateway.security.keys import KeyRing, KeyRingError, read_current_kid
from aico.gateway.security.passwords import hash_password
from aico.gateway.store import SCHEMA_VERSION, SyncDatabase, schema_version, sync_result
from aico.gateway.users import UserStore
from aico.keystore import KEYSTORE_FILE, KdfParams, Keystore, is_sealed, state_keystore

__all__ = [
    "ADMIN_USERNAME",
    "ENV_STATE_DIR",
    "BootstrapReport",
    "StateDirError",
    "StatePaths",
    "bootstrap",
    "resolve_state_dir",
]

#: Environment variable naming the state directory (after ``--state-dir``).
ENV_STATE_DIR = "AICO_STATE_DIR"
#: platformdirs application name for the default state directory.
APP_NAME = "aico-gateway"
#: The bootstrap administrator.
ADMIN_USERNAME = "admin"
#: Host names and addresses in the server certificate.
SERVER_HOSTNAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")

_log = Logger()


class StateDirError(RuntimeError):
    """The state directory cannot be used as it is; the message says why and what to do."""


@dataclass(frozen=True)
class StatePaths:
    """Every path in one state directory (and, once opened, its keystore)."""

    root: Path
    #: Seals and opens the private keys; set by :func:`bootstrap`.
    keystore: Keystore | None = field(default=None, compare=False, repr=False)

    @property
    def keystore_file(self) -> Path:
        return self.root / KEYSTORE_FILE

    @property
    def sealer(self) -> Keystore:
        """The keystore; ValueError if this StatePaths has none."""
        if self.keystore is None:
            raise ValueError(f"the keystore of {self.root} is not open")
        return self.keystore

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def server_cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def jwt_dir(self) -> Path:
        return self.root / "jwt"

    @property
    def jwt_current(self) -> Path:
        return self.jwt_dir / "current"

    def jwt_key(self, kid: str) -> Path:
        return self.jwt_dir / f"{kid}.pem"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.db"

    @property
    def admin_password(self) -> Path:
        return self.root / "initial-admin-password"

    @property
    def ports_json(self) -> Path:
        return self.root / "ports.json"

    @property
    def ipc_socket(self) -> Path:
        return self.root / "gateway.ipc"

    @property
    def bootstrap_lock(self) -> Path:
        return self.root / ".bootstrap.lock"

    @property
    def curve(self) -> CurveLayout:
        return CurveLayout(self.root, self.keystore)


def resolve_state_dir(cli: str | None, env: Mapping[str, str], config_value: str) -> Path:
    """The state directory: ``--state-dir``, else ``$AICO_STATE_DIR``, else
    ``[gateway] state_dir``, else the platform's user data directory for aico-gateway.

    Empty values count as unset. ``~`` is expanded and a relative path is made absolute
    against the current directory (so ``ipc://`` endpoints built from it are absolute).
    """
    for value in (cli, env.get(ENV_STATE_DIR), config_value):
        if value:
            return Path(value).expanduser().absolute()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapReport:
    """What :func:`bootstrap` did."""

    paths: StatePaths
    #: The items created (or migrated) by this run, in order; empty when all existed.
    created: tuple[str, ...]

    @property
    def keystore(self) -> Keystore:
        """The state directory's keystore (opened by the bootstrap)."""
        return self.paths.sealer

    @property
    def created_anything(self) -> bool:
        return bool(self.created)

    @property
    def admin_password_file(self) -> Path | None:
        """The password file, if it (still) exists."""
        p = self.paths.admin_password
        return p if p.exists() else None


def _ensure_dir(path: Path) -> bool:
    """Create *path* with mode 0700 unless it exists; True if created."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise StateDirError(f"{path} exists and is not a directory") from None
        return False
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return True


def _prepare_root(root: Path) -> bool:
    """Create the state directory, or check an existing one (see the module docstring)."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        return _ensure_dir(root)
    if not root.is_dir():
        raise StateDirError(f"state directory {root} exists and is not a directory")
    st = root.stat()
    if st.st_uid != os.getuid():
        raise StateDirError(f"state directory {root} belongs to another user (uid {st.st_uid})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        if any(root.iterdir()):
            raise StateDirError(
                f"state directory {root} has mode {mode:04o}: group or others can reach the "
                f"secrets in it. Check who could have read them, then run 'chmod 700 {root}'"
            )
        os.chmod(root, 0o700)
        _log.warn(
            "state directory {root} was empty with mode {mode}; set to 0700",
            root=str(root),
            mode=f"{mode:04o}",
        )
    return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on *path* (two bootstraps never interleave)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _tighten(path: Path) -> None:
    """Private files are 0600; tighten a wider one (inside the 0700 directory)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        _log.warn("{path} had mode {mode}; set to 0600", path=str(path), mode=f"{mode:04o}")


def _pair_state(first: Path, second: Path, what: str, remedy: str) -> bool:
    """True if both exist, False if neither; a half pair is refused."""
    a, b = first.exists(), second.exists()
    if a != b:
        present, missing = (first, second) if a else (second, first)
        raise StateDirError(f"{what}: {present} exists but {missing} is missing; {remedy}")
    return a


def _ensure_ca(paths: StatePaths) -> tuple[DeviceCA, bool]:
    remedy = (
        "restore both from a backup, or delete ca/ and tls/ to make a new CA "
        "(every paired device must then pair again)"
    )
    if _pair_state(paths.ca_cert, paths.ca_key, "device CA", remedy):
        _tighten(paths.ca_key)
        try:
            return DeviceCA.load(paths.ca_cert, paths.ca_key, paths.sealer), False
        except ValueError as e:
            raise StateDirError(f"device CA in {paths.ca_dir}: {e}") from e
    _ensure_dir(paths.ca_dir)
    ca = DeviceCA.create()
    ca.save(paths.ca_cert, paths.ca_key, paths.sealer)
    return ca, True


def _ensure_server_cert(paths: StatePaths, ca: DeviceCA) -> bool:
    remedy = "delete tls/server.pem and tls/server.key to issue a new server certificate"
    if _pair_state(paths.server_cert, paths.server_key, "server certificate", remedy):
        _tighten(paths.server_key)
        try:
            cert = load_certificate(paths.server_cert)
            key = load_private_key(paths.server_key, paths.sealer)
        except ValueError as e:
            raise StateDirError(f"server certificate in {paths.tls_dir}: {e}; {remedy}") from e
        if cert.public_key() != key.public_key():
            raise StateDirError(
                f"{paths.server_key} is not the key of {paths.server_cert}; {remedy}"
            )
        if not ca.issued(cert):
            raise StateDirError(f"{paths.server_cert} was not issued by the device CA; {remedy}")
        return False
    _ensure_dir(paths.tls_dir)
    cert, key = ca.issue_server_cert(SERVER_HOSTNAMES, SERVER_IPS)
    _save_private_key(paths.server_key, key, paths.sealer)
    _save_certificate(paths.server_cert, cert)
    return True


def _ensure_jwt_key(paths: StatePaths) -> bool:
    """The first signing key (:meth:`KeyRing.generate`), or check the one ``current`` names."""
    if not paths.jwt_current.exists():
        _ensure_dir(paths.jwt_dir)
        KeyRing.generate(paths.jwt_dir, paths.sealer)
        return True
    try:
        kid = read_current_kid(paths.jwt_dir)
    except KeyRingError as e:
        raise StateDirError(
            f"{e}; delete it to make a new key (tokens already issued become invalid)"
        ) from e
    if not paths.jwt_key(kid).is_file():
        raise StateDirError(
            f"{paths.jwt_current} names {kid}, but {kid}.pem is missing; restore it from a "
            "backup, or delete 'current' to make a new key (tokens already issued become invalid)"
        )
    _tighten(paths.jwt_key(kid))
    return False


def _ensure_curve(paths: StatePaths, clients: Sequence[str]) -> list[str]:
    layout = paths.curve
    created: list[str] = []
    for name, secret in (("broker", layout.broker_secret), ("gateway", layout.gateway_secret)):
        if secret.exists():
            _tighten(secret)
        else:
            _ensure_dir(layout.root)
            create_keypair(layout.root, name, paths.sealer)
            created.append(f"curve/{name}")
    for name in dict.fromkeys(clients):
        if ensure_client(layout, name):
            created.append(f"curve/client/{name}")
        else:
            _tighten(layout.client_secret(name))
    return created


def _registry_complete(path: Path) -> bool:
    """Whether the registry exists at the current schema with at least one user.

    Read with ``immutable=1``, which opens no ``-wal``/``-shm`` files, so a state
    directory that needs nothing is not touched at all (not even its own mtime). A
    stale answer (a running gateway's uncheckpointed WAL) only sends us down the slow
    path, which re-checks under SQLite's write lock.
    """
    if not path.exists():
        return False
    uri = f"{path.absolute().as_uri()}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return False
    try:
        if schema_version(conn) != SCHEMA_VERSION:
            return False
        (count,) = conn.execute("SELECT COUNT(*) FROM users").fetchone()
        return bool(count)
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _ensure_registry(paths: StatePaths, db: SyncDatabase) -> list[str]:
    """Report what opening *db* (which migrates) did; the file is 0600."""
    _tighten(paths.registry_db)
    before, after = db.migrated
    if before == after:
        return []
    return ["registry_db"] if before == 0 else [f"registry_db: schema {before} -> {after}"]


def _ensure_admin(paths: StatePaths, users: UserStore) -> bool:
    """Create ``admin`` if the users table is empty (a fresh registry).

    Keyed on the table, not the password file: operators are told to delete the file
    once they have changed the password, and a deleted ``admin`` (with other users left)
    must not come back. If the table is empty but the file exists (the registry was
    deleted), the password in the file is reused, so the file never goes stale. The
    insert itself happens only while the table is still empty
    (:meth:`UserStore.create_first`), so concurrent bootstraps never create two.
    """
    if sync_result(users.count()):
        return False
    if paths.admin_password.exists():
        _tighten(paths.admin_password)
        password = paths.admin_password.read_text(encoding="utf-8").strip()
        if not password:
            raise StateDirError(f"{paths.admin_password} is empty; delete it and start again")
    else:
        password = secrets.token_urlsafe(18)
        # The file first: a crash before the insert leaves a file that the next run
        # reuses, never a user whose password nobody knows.
        write_atomic(paths.admin_password, f"{password}\n".encode(), 0o600, overwrite=False)
    password_hash = hash_password(password)
    del password
    # False: another process got there first.
    return sync_result(users.create_first(ADMIN_USERNAME, password_hash, ("admin",)))


def _open_keystore(paths: StatePaths, kdf: KdfParams | None,
                   env: Mapping[str, str] | None) -> Keystore:
    """The keystore, made if the directory has none (unless sealed keys exist already)."""
    if not paths.keystore_file.exists():
        for key in (paths.ca_key, paths.server_key):
            if key.is_file() and is_sealed(key.read_bytes()):
                raise StateDirError(
                    f"{paths.keystore_file} is missing but {key} is encrypted: restore "
                    "keystore.json from a backup (without it no key can be decrypted)"
                )
    return state_keystore(paths.root, create=True, kdf=kdf, env=env)


def _migrate_plain_keys(paths: StatePaths) -> list[str]:
    """Seal every private key still stored as plain text; the items sealed."""
    keystore = paths.sealer
    done: list[str] = []
    for path in (paths.ca_key, paths.server_key):
        if keystore.migrate(path, path.name):
            done.append(str(path.relative_to(paths.root)))
    if paths.jwt_dir.is_dir():
        for path in sorted(paths.jwt_dir.glob("*.pem")):
            if keystore.migrate(path, f"jwt/{path.name}"):
                done.append(str(path.relative_to(paths.root)))
    done += [str(p.relative_to(paths.root)) for p in migrate_secrets(paths.curve)]
    return [f"sealed {item}" for item in done]


def bootstrap(root: Path, builtin_modules: Sequence[str] = (), *, kdf: KdfParams | None = None,
              env: Mapping[str, str] | None = None) -> BootstrapReport:
    """Make every missing item of the state directory at *root*; never overwrite one.

    Creates, as needed: the directory (0700), the device CA, the server certificate, the
    first JWT signing key, the CurveZMQ key pairs (broker, gateway, and a local client key
    for ``gateway`` and each name in *builtin_modules*), the registry database with its
    schema (or migrates an older one), and the ``admin`` user with its password file.
    First of all it opens the keystore (:mod:`aico.keystore`; made with *kdf*, default the
    strong production parameters, when the directory has none; tests pass
    :data:`~aico.keystore.TEST_KDF`) and seals any private key still stored in plain text.
    The report carries the keystore (``report.keystore``) and paths that know it.
    Blocking; call it before the reactor runs. Raises :class:`StateDirError` when the
    directory is unsafe or inconsistent (a key without its certificate, …).
    """
    paths = StatePaths(root)
    created: list[str] = []
    if _prepare_root(root):
        created.append("state_dir")
    with _locked(paths.bootstrap_lock):
        made_keystore = not paths.keystore_file.exists()
        try:
            paths = StatePaths(root, _open_keystore(paths, kdf, env))
        except ValueError as e:  # KeystoreError: one line naming the file or the source
            raise StateDirError(str(e)) from e
        if made_keystore:
            created.append("keystore")
        created += _migrate_plain_keys(paths)
        ca, made = _ensure_ca(paths)
        if made:
            created.append("ca")
        if _ensure_server_cert(paths, ca):
            created.append("server_cert")
        if _ensure_jwt_key(paths):
            created.append("jwt_key")
        created += _ensure_curve(paths, ["gateway", *builtin_modules])
        if _registry_complete(paths.registry_db):
            _tighten(paths.registry_db)
        else:
            with closing(SyncDatabase(paths.registry_db)) as db:
                created += _ensure_registry(paths, db)
                if _ensure_admin(paths, UserStore(db)):
                    created.append("admin_user")
    for item in created:
        _log.info("state directory {root}: created {item}", root=str(root), item=item)
    return BootstrapReport(paths, tuple(created))
