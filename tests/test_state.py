"""The state directory: paths, resolution order, bootstrap and its idempotence."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
from pathlib import Path

import argon2
import platformdirs
import zmq.auth
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.trial.unittest import SynchronousTestCase

from aico.bus.curve import load_pair
from aico.gateway import state as state_module
from aico.gateway.devices.ca import load_certificate, load_private_key, save_certificate
from aico.gateway.security.keys import KeyRing, thumbprint
from aico.gateway.security.passwords import PARAMETERS, hash_password, verify_password
from aico.gateway.state import (
    BootstrapReport,
    StateDirError,
    StatePaths,
    bootstrap,
    resolve_state_dir,
)
from aico.gateway.store import SyncDatabase, sync_result
from aico.gateway.testing.memory import CHEAP_HASHER
from aico.gateway.users import UserStore
from aico.keystore import TEST_KDF, Keystore, state_keystore

MODULES = ("conversation", "health")
#: No platform keyring, no AICO_MASTER_PASSWORD: the master-key file (hermetic tests).
ENV = {"AICO_NO_KEYRING": "1"}

# RFC 8037 appendix A.2/A.3: the Ed25519 example key and its RFC 7638 thumbprint.
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every entry under *root*: (content or None for directories, mtime_ns, mode)."""
    result: dict[str, tuple[bytes | None, int, int]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        content = None if path.is_dir() else path.read_bytes()
        result[str(path.relative_to(root))] = (content, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return result


def cheap_hash(password: str) -> str:
    """Argon2id at its cheapest: these tests are about files, not about hashing cost."""
    return hash_password(password, CHEAP_HASHER)


class _StateTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()) / "state"
        self.patch(state_module, "hash_password", cheap_hash)

    def _bootstrap(self) -> BootstrapReport:
        return bootstrap(self.root, MODULES, kdf=TEST_KDF, env=ENV)

    def _keystore(self) -> Keystore:
        return state_keystore(self.root, env=ENV)


class BootstrapCreatesTests(_StateTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.report = self._bootstrap()
        self.paths = self.report.paths

    def test_report_lists_every_item(self) -> None:
        self.assertEqual(
            self.report.created,
            (
                "state_dir",
                "keystore",
                "ca",
                "server_cert",
                "jwt_key",
                "curve/broker",
                "curve/gateway",
                "curve/client/gateway",
                "curve/client/conversation",
                "curve/client/health",
                "registry_db",
                "admin_user",
            ),
        )
        self.assertEqual(self.report.admin_password_file, self.paths.admin_password)

    def test_directory_is_0700(self) -> None:
        self.assertEqual(_mode(self.root), 0o700)
        for sub in ("ca", "tls", "jwt", "curve", "curve/private"):
            self.assertEqual(_mode(self.root / sub), 0o700, sub)

    def test_every_secret_file_is_0600(self) -> None:
        p = self.paths
        secrets = [
            p.ca_key,
            p.server_key,
            p.jwt_key(KeyRing.load(p.jwt_dir, p.sealer).current_kid),
            p.jwt_current,
            p.keystore_file,
            p.root / "master-key",
            p.registry_db,
            p.admin_password,
            p.curve.broker_secret,
            p.curve.gateway_secret,
            *(p.curve.client_secret(n) for n in ("gateway", *MODULES)),
        ]
        for path in secrets:
            self.assertEqual(_mode(path), 0o600, str(path))

    def test_no_file_under_the_directory_is_readable_by_others(self) -> None:
        for path in self.root.rglob("*"):
            if path.is_file() and path.suffix not in (".pem", ".key") and path.name != "current":
                self.assertEqual(_mode(path) & 0o077, 0, str(path))

    def test_ca_verifies_server_certificate_chain(self) -> None:
        ca = load_certificate(self.paths.ca_cert)
        server = load_certificate(self.paths.server_cert)
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertTrue(bc.ca)
        self.assertEqual(bc.path_length, 0)
        self.assertIsInstance(ca.public_key(), ec.EllipticCurvePublicKey)
        verifier = (
            PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
        )
        chain = verifier.verify(server, [])
        self.assertEqual(chain[-1], ca)
        for ip in ("127.0.0.1", "::1"):
            import ipaddress

            ip_verifier = (
                PolicyBuilder()
                .store(Store([ca]))
                .build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip)))
            )
            ip_verifier.verify(server, [])
        key = load_private_key(self.paths.server_key, self.paths.sealer)
        self.assertEqual(key.public_key(), server.public_key())

    def test_jwt_key_is_named_by_its_thumbprint_and_current(self) -> None:
        kid = self.paths.jwt_current.read_text().strip()
        key = serialization.load_pem_private_key(
            self.paths.sealer.read_sealed(self.paths.jwt_key(kid), f"jwt/{kid}.pem"), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        self.assertEqual(thumbprint(key.public_key()), kid)
        self.assertEqual(self.paths.jwt_current.read_text(), kid + "\n")

    def test_curve_keys_are_pairs_whose_public_halves_load_with_zmq(self) -> None:
        c = self.paths.curve
        public, secret = load_pair(c.broker_secret, c.keystore)
        self.assertEqual(zmq.auth.load_certificate(c.broker_public)[0], public)
        self.assertEqual(zmq.curve_public(secret), public)
        self.assertEqual(zmq.auth.load_certificate(c.gateway_public)[0],
                         load_pair(c.gateway_secret, c.keystore)[0])
        for name in ("gateway", *MODULES):
            self.assertEqual(
                zmq.auth.load_certificate(c.client_public(name))[0],
                load_pair(c.client_secret(name), c.keystore)[0],
            )

    def test_admin_user_has_argon2id_hash_matching_password_file(self) -> None:
        password = self.paths.admin_password.read_text().strip()
        self.assertGreaterEqual(len(password), 24)
        conn = sqlite3.connect(self.paths.registry_db)
        try:
            rows = conn.execute(
                "SELECT username, password_hash, roles, disabled FROM users"
            ).fetchall()
        finally:
            conn.close()
        self.assertEqual(len(rows), 1)
        username, password_hash, roles, disabled = rows[0]
        self.assertEqual((username, json.loads(roles), disabled), ("admin", ["admin"], 0))
        self.assertEqual(argon2.extract_parameters(password_hash).type, argon2.Type.ID)
        self.assertTrue(verify_password(password_hash, password))
        self.assertFalse(verify_password(password_hash, password + "x"))

    def test_admin_user_reads_back_through_the_user_store(self) -> None:
        db = SyncDatabase(self.paths.registry_db)
        self.addCleanup(db.close)
        users = sync_result(UserStore(db).list())
        self.assertEqual([(u.username, u.roles, u.disabled) for u in users], [("admin", ("admin",), False)])
        password = self.paths.admin_password.read_text().strip()
        self.assertTrue(verify_password(users[0].password_hash, password))

    def test_no_temporary_files_left(self) -> None:
        leftovers = [p for p in self.root.rglob("*.tmp")]
        self.assertEqual(leftovers, [])


class ProductionParametersTests(SynchronousTestCase):
    def test_the_bootstrap_uses_the_production_kdf_and_password_hash_parameters(self) -> None:
        root = Path(self.mktemp()) / "state"
        bootstrap(root, MODULES, env=ENV)
        meta = json.loads((root / "keystore.json").read_text())
        self.assertEqual((meta["kdf"], meta["t"], meta["m"], meta["p"]), ("argon2id", 3, 65536, 4))
        conn = sqlite3.connect(StatePaths(root).registry_db)
        try:
            (password_hash,) = conn.execute("SELECT password_hash FROM users").fetchone()
        finally:
            conn.close()
        self.assertEqual(argon2.extract_parameters(password_hash), PARAMETERS)


class IdempotenceTests(_StateTestCase):
    def test_second_run_changes_nothing_and_reports_nothing(self) -> None:
        self._bootstrap()
        before = _snapshot(self.root)
        report = self._bootstrap()
        self.assertEqual(report.created, ())
        self.assertFalse(report.created_anything)
        self.assertEqual(_snapshot(self.root), before)

    def test_missing_item_is_recreated_alone(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        paths.curve.client_secret("health").unlink()
        paths.curve.client_public("health").unlink()
        ca_before = paths.ca_cert.read_bytes()
        report = self._bootstrap()
        self.assertEqual(report.created, ("curve/client/health",))
        self.assertEqual(paths.ca_cert.read_bytes(), ca_before)

    def test_new_module_gets_its_client_key(self) -> None:
        self._bootstrap()
        report = bootstrap(self.root, (*MODULES, "extra"), env=ENV)
        self.assertEqual(report.created, ("curve/client/extra",))

    def test_deleted_password_file_is_not_recreated(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        paths.admin_password.unlink()
        report = self._bootstrap()
        self.assertEqual(report.created, ())
        self.assertFalse(paths.admin_password.exists())
        self.assertIsNone(report.admin_password_file)

    def test_lost_registry_reuses_password_file(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        password_before = paths.admin_password.read_bytes()
        paths.registry_db.unlink()
        report = self._bootstrap()
        self.assertEqual(report.created, ("registry_db", "admin_user"))
        self.assertEqual(paths.admin_password.read_bytes(), password_before)
        conn = sqlite3.connect(paths.registry_db)
        try:
            (password_hash,) = conn.execute("SELECT password_hash FROM users").fetchone()
        finally:
            conn.close()
        self.assertTrue(verify_password(password_hash, password_before.decode().strip()))


class RefusalTests(_StateTestCase):
    def test_nonempty_directory_open_to_others_is_refused(self) -> None:
        self._bootstrap()
        os.chmod(self.root, 0o755)
        with self.assertRaises(StateDirError) as cm:
            self._bootstrap()
        self.assertIn("chmod 700", str(cm.exception))

    def test_empty_directory_open_to_others_is_tightened(self) -> None:
        self.root.mkdir(parents=True)
        os.chmod(self.root, 0o755)
        report = self._bootstrap()
        self.assertEqual(_mode(self.root), 0o700)
        self.assertNotIn("state_dir", report.created)
        self.assertIn("ca", report.created)

    def test_key_without_certificate_is_refused_not_replaced(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        key_before = paths.ca_key.read_bytes()
        paths.ca_cert.unlink()
        self.assertRaises(StateDirError, self._bootstrap)
        self.assertEqual(paths.ca_key.read_bytes(), key_before)
        self.assertFalse(paths.ca_cert.exists())

    def test_server_certificate_from_another_ca_is_refused(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        for p in (paths.ca_cert, paths.ca_key):
            p.unlink()
        with self.assertRaises(StateDirError) as cm:
            self._bootstrap()
        self.assertIn("not issued by the device CA", str(cm.exception))

    def test_mismatched_server_key_is_refused(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        from aico.gateway.devices.ca import DeviceCA

        other_cert, _ = DeviceCA.create().issue_server_cert()
        paths.server_cert.unlink()
        save_certificate(paths.server_cert, other_cert)
        self.assertRaises(StateDirError, self._bootstrap)

    def test_wide_private_file_is_tightened(self) -> None:
        self._bootstrap()
        paths = StatePaths(self.root)
        os.chmod(paths.ca_key, 0o644)
        self._bootstrap()
        self.assertEqual(_mode(paths.ca_key), 0o600)

    def test_path_that_is_a_file_is_refused(self) -> None:
        self.root.parent.mkdir(parents=True)
        self.root.write_text("x")
        self.assertRaises(StateDirError, self._bootstrap)


class JWTKeyTests(_StateTestCase):
    def test_thumbprint_matches_rfc8037_vector(self) -> None:
        raw = base64.urlsafe_b64decode(RFC8037_X + "=")
        key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        self.assertEqual(thumbprint(key), RFC8037_THUMBPRINT)

    def test_bootstrap_key_is_the_keyrings_own(self) -> None:
        self._bootstrap()
        jwt_dir = StatePaths(self.root).jwt_dir
        ring = KeyRing.load(jwt_dir, self._keystore())
        self.assertEqual(ring.kids(), [ring.current_kid])
        self.assertEqual(_mode(jwt_dir / "current"), 0o600)

    def test_deleted_current_makes_a_new_key_and_keeps_old_keys(self) -> None:
        jwt_dir = StatePaths(self.root).jwt_dir
        self._bootstrap()
        first = (jwt_dir / "current").read_text().strip()
        (jwt_dir / "current").unlink()
        self.assertEqual(self._bootstrap().created, ("jwt_key",))
        second = (jwt_dir / "current").read_text().strip()
        self.assertNotEqual(first, second)
        self.assertEqual(KeyRing.load(jwt_dir, self._keystore()).current_kid, second)
        self.assertTrue((jwt_dir / f"{first}.pem").exists())
        self.assertEqual(_mode(jwt_dir), 0o700)
        self.assertEqual(_mode(jwt_dir / f"{second}.pem"), 0o600)
        self.assertEqual(
            sorted(p.name for p in jwt_dir.iterdir()),
            sorted([f"{first}.pem", f"{second}.pem", "current"]),
        )

    def test_current_naming_a_missing_key_is_refused(self) -> None:
        self._bootstrap()
        jwt_dir = StatePaths(self.root).jwt_dir
        kid = KeyRing.load(jwt_dir, self._keystore()).current_kid
        (jwt_dir / f"{kid}.pem").unlink()
        with self.assertRaises(StateDirError) as cm:
            self._bootstrap()
        self.assertIn(f"{kid}.pem is missing", str(cm.exception))
        self.assertFalse((jwt_dir / f"{kid}.pem").exists())
        self.assertEqual((jwt_dir / "current").read_text(), kid + "\n")

    def test_current_with_path_characters_is_refused(self) -> None:
        self._bootstrap()
        jwt_dir = StatePaths(self.root).jwt_dir
        (jwt_dir / "current").write_text("../../etc/passwd\n")
        self.assertRaises(StateDirError, self._bootstrap)


class PathsTests(SynchronousTestCase):
    def test_layout(self) -> None:
        p = StatePaths(Path("/s"))
        self.assertEqual(
            [
                p.ca_cert,
                p.ca_key,
                p.server_cert,
                p.server_key,
                p.jwt_dir,
                p.registry_db,
                p.admin_password,
                p.ports_json,
                p.ipc_socket,
                p.curve.root,
            ],
            [
                Path("/s/ca/ca.pem"),
                Path("/s/ca/ca.key"),
                Path("/s/tls/server.pem"),
                Path("/s/tls/server.key"),
                Path("/s/jwt"),
                Path("/s/registry.db"),
                Path("/s/initial-admin-password"),
                Path("/s/ports.json"),
                Path("/s/gateway.ipc"),
                Path("/s/curve"),
            ],
        )


class ResolveStateDirTests(SynchronousTestCase):
    def test_cli_wins(self) -> None:
        got = resolve_state_dir("/cli", {"AICO_STATE_DIR": "/env"}, "/config")
        self.assertEqual(got, Path("/cli"))

    def test_env_before_config(self) -> None:
        self.assertEqual(
            resolve_state_dir(None, {"AICO_STATE_DIR": "/env"}, "/config"), Path("/env")
        )

    def test_config_before_platform_default(self) -> None:
        self.assertEqual(resolve_state_dir(None, {}, "/config"), Path("/config"))

    def test_empty_values_count_as_unset(self) -> None:
        self.assertEqual(resolve_state_dir("", {"AICO_STATE_DIR": ""}, "/config"), Path("/config"))

    def test_platform_default_last(self) -> None:
        expected = Path(platformdirs.user_data_dir("aico-gateway", appauthor=False))
        self.assertEqual(resolve_state_dir(None, {}, ""), expected)

    def test_relative_path_made_absolute(self) -> None:
        got = resolve_state_dir("./var", {}, "")
        self.assertTrue(got.is_absolute())
        self.assertEqual(got, Path.cwd() / "var")
