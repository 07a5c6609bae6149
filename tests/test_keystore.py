"""Private keys at rest: sealed files, the master secret's sources, migration of old state."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
from cryptography.hazmat.primitives import serialization
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico import keystore as keystore_module
from aico.bus.curve import load_pair, secret_role
from aico.gateway import state as state_module
from aico.gateway.security.passwords import hash_password
from aico.gateway.state import BootstrapReport, StateDirError, StatePaths, bootstrap
from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import CHEAP_HASHER
from aico.keystore import (
    TEST_KDF,
    Keystore,
    KeystoreError,
    client_keystore,
    keyring_backend,
    move_master_to_keyring,
    resolve_master_secret,
    state_keystore,
)

MODULES = ("conversation", "health")
NO_KEYRING = {"AICO_NO_KEYRING": "1"}


class FakeKeyring(keyring.backend.KeyringBackend):
    """A usable in-memory keyring backend (what a desktop session offers)."""

    priority = 10  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


class HangingKeyring(FakeKeyring):
    """A keyring whose daemon never answers (a locked session keyring)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def get_password(self, service: str, username: str) -> str | None:
        self.release.wait(10)
        return None


def use_keyring(case: SynchronousTestCase, backend: Any) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    case.addCleanup(keyring.set_keyring, previous)


def private_files(root: Path) -> list[Path]:
    """Every private key file bootstrap makes (by path), to check none is missed."""
    p = StatePaths(root)
    return [p.ca_key, p.server_key, *sorted(p.jwt_dir.glob("*.pem")),
            *sorted(p.curve.root.glob("*.key_secret")),
            *sorted(p.curve.private_dir.glob("*.key_secret"))]


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()) / "state"
        self.patch(state_module, "hash_password", lambda pw: hash_password(pw, CHEAP_HASHER))
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def boot(self, env: dict[str, str] | None = None) -> BootstrapReport:
        return bootstrap(self.root, MODULES, kdf=TEST_KDF, env=NO_KEYRING if env is None else env)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "aico.keystore" and "lies beside" in formatEvent(e)]


class SealedStateTests(_Base):
    def test_no_private_key_in_a_bootstrapped_state_directory_is_readable_in_plain(self) -> None:
        self.boot()
        sealed = []
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            self.assertNotIn(b"secret-key", data, str(path))
            with self.assertRaises((ValueError, TypeError), msg=str(path)):
                serialization.load_pem_private_key(data, password=None)
            if data.startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"):
                sealed.append(path)
        # CA, server, one JWT key, broker, gateway, and three local bus clients.
        self.assertEqual(sealed, sorted(private_files(self.root)))
        self.assertEqual(len(sealed), 8)
        for path in sealed:
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, str(path))

    def test_keystore_file_holds_the_kdf_parameters_and_salt_only(self) -> None:
        self.boot()
        meta = json.loads((self.root / "keystore.json").read_text())
        self.assertEqual(sorted(meta), ["check", "kdf", "m", "p", "salt", "source", "t", "version"])
        self.assertEqual((meta["kdf"], meta["t"], meta["m"], meta["p"], meta["source"]),
                         ("argon2id", TEST_KDF.t, TEST_KDF.m, TEST_KDF.p, "file"))
        self.assertEqual(stat.S_IMODE((self.root / "keystore.json").stat().st_mode), 0o600)

    def test_a_key_file_swapped_for_another_role_is_refused_naming_it(self) -> None:
        report = self.boot()
        c = report.paths.curve
        shutil.copyfile(c.gateway_secret, c.broker_secret)
        with self.assertRaises(KeystoreError) as cm:
            load_pair(c.broker_secret, c.keystore)
        self.assertIn(str(c.broker_secret), str(cm.exception))
        self.assertIn("swapped", str(cm.exception))
        p = report.paths
        p.ca_key.write_bytes(p.server_key.read_bytes())
        with self.assertRaises(StateDirError) as refused:
            self.boot()
        self.assertIn(str(p.ca_key), str(refused.exception))
        self.assertEqual(len(str(refused.exception).splitlines()), 1)

    def test_a_wrong_master_secret_is_refused_with_one_line_naming_the_keystore(self) -> None:
        self.boot({"AICO_MASTER_PASSWORD": "the right one", **NO_KEYRING})
        with self.assertRaises(StateDirError) as cm:
            self.boot({"AICO_MASTER_PASSWORD": "a wrong one", **NO_KEYRING})
        message = str(cm.exception)
        self.assertIn(str(self.root / "keystore.json"), message)
        self.assertIn("wrong master secret", message)
        self.assertNotIn("a wrong one", message)
        self.assertEqual(len(message.splitlines()), 1)

    def test_a_sealed_file_altered_or_opened_with_another_kek_fails_naming_it(self) -> None:
        report = self.boot()
        path = report.paths.server_key
        with self.assertRaises(KeystoreError) as cm:
            Keystore.ephemeral().read_sealed(path, "server.key")
        self.assertIn(str(path), str(cm.exception))
        self.assertIn("wrong master secret", str(cm.exception))

    def test_a_lost_keystore_file_is_refused_not_replaced(self) -> None:
        self.boot()
        (self.root / "keystore.json").unlink()
        with self.assertRaises(StateDirError) as cm:
            self.boot()
        self.assertIn("keystore.json is missing", str(cm.exception))
        self.assertFalse((self.root / "keystore.json").exists())


class SourceOrderTests(_Base):
    def test_a_usable_keyring_holds_the_master_secret_and_no_file_is_written(self) -> None:
        fake = FakeKeyring()
        use_keyring(self, fake)
        report = self.boot({})
        self.assertEqual(report.keystore.source, "keyring")
        self.assertEqual(list(fake.entries), [("aico-gateway", str(self.root.absolute()))])
        self.assertFalse((self.root / "master-key").exists())
        self.assertEqual(self.warnings(), [])
        # The keyring wins over the environment at every start.
        again = bootstrap(self.root, MODULES, env={"AICO_MASTER_PASSWORD": "from the env"})
        self.assertEqual(again.keystore.source, "keyring")

    def test_the_environment_comes_after_the_keyring(self) -> None:
        use_keyring(self, FakeKeyring())  # usable, but it has no entry for this directory
        self.root.mkdir(parents=True, mode=0o700)
        (self.root / "keystore.json").write_text("{}")
        master = resolve_master_secret(self.root, env={"AICO_MASTER_PASSWORD": "pw"})
        assert master is not None
        self.assertEqual((master.source, master.secret), ("env", b"pw"))
        self.assertNotIn("pw", repr(master))

    def test_without_keyring_the_environment_is_used_and_nothing_is_written(self) -> None:
        report = self.boot({"AICO_MASTER_PASSWORD": "a long passphrase", **NO_KEYRING})
        self.assertEqual((report.keystore.source, report.keystore.where),
                         ("env", "$AICO_MASTER_PASSWORD"))
        self.assertFalse((self.root / "master-key").exists())
        self.assertEqual(self.warnings(), [])

    def test_last_the_master_key_file_with_a_warning_at_every_start(self) -> None:
        report = self.boot()
        master = self.root / "master-key"
        self.assertEqual(report.keystore.source, "file")
        self.assertEqual(stat.S_IMODE(master.stat().st_mode), 0o600)
        self.assertGreaterEqual(len(master.read_text().strip()), 43)  # 32 random bytes
        self.boot()
        warnings = self.warnings()
        self.assertEqual(len(warnings), 2)
        self.assertIn(str(master), warnings[0])
        self.assertIn("AICO_MASTER_PASSWORD", warnings[0])
        self.assertIn("keys master --to-keyring", warnings[0])

    def test_the_files_text_in_the_environment_opens_the_same_keys(self) -> None:
        self.boot()
        text = (self.root / "master-key").read_text().strip()
        (self.root / "master-key").unlink()
        report = self.boot({"AICO_MASTER_PASSWORD": text, **NO_KEYRING})
        self.assertEqual(report.keystore.source, "env")
        self.assertEqual(report.created, ())

    def test_no_source_at_all_is_refused_naming_them(self) -> None:
        self.boot()
        (self.root / "master-key").unlink()
        with self.assertRaises(StateDirError) as cm:
            self.boot()
        self.assertIn("no master secret", str(cm.exception))
        self.assertIn("AICO_MASTER_PASSWORD", str(cm.exception))

    def test_fail_and_hanging_keyrings_count_as_unusable(self) -> None:
        from keyring.backends import fail

        use_keyring(self, fail.Keyring())
        self.assertIsNone(keyring_backend({}))
        hanging = HangingKeyring()
        self.addCleanup(hanging.release.set)
        use_keyring(self, hanging)
        self.patch(keystore_module, "KEYRING_TIMEOUT", 0.05)
        report = self.boot({})
        self.assertEqual(report.keystore.source, "file")
        self.assertEqual(keyring_backend({"AICO_NO_KEYRING": "1"}), None)

    def test_the_master_key_file_moves_into_the_keyring(self) -> None:
        self.boot()
        fake = FakeKeyring()
        use_keyring(self, fake)
        before = move_master_to_keyring(self.root, env={})
        self.assertEqual(before.source, "file")
        self.assertFalse((self.root / "master-key").exists())
        del self.events[:]
        report = bootstrap(self.root, MODULES, env={})
        self.assertEqual((report.keystore.source, report.created), ("keyring", ()))
        self.assertEqual(self.warnings(), [])

    def test_a_client_directory_has_its_own_keystore(self) -> None:
        cert_dir = Path(self.mktemp())
        cert_dir.mkdir(mode=0o700)
        store = client_keystore(cert_dir, kdf=TEST_KDF, env=NO_KEYRING)
        store.write_sealed(cert_dir / "device.key", b"-----BEGIN PRIVATE KEY-----...", "device.key")
        again = client_keystore(cert_dir, env=NO_KEYRING)
        self.assertEqual(again.read_sealed(cert_dir / "device.key", "device.key"),
                         b"-----BEGIN PRIVATE KEY-----...")
        self.assertTrue((cert_dir / "master-key").exists())
        self.assertEqual(stat.S_IMODE((cert_dir / "device.key").stat().st_mode), 0o600)
        fake = FakeKeyring()
        use_keyring(self, fake)
        other = Path(self.mktemp())
        other.mkdir(mode=0o700)
        self.assertEqual(client_keystore(other, kdf=TEST_KDF, env={}).source, "keyring")
        self.assertEqual(list(fake.entries), [("aico-client", str(other.absolute()))])


def make_plain(root: Path) -> list[Path]:
    """Turn a bootstrapped directory into one from before keys were sealed."""
    store = state_keystore(root, env=NO_KEYRING)
    files = private_files(root)
    p = StatePaths(root)
    for path in files:
        if path.suffix == ".key_secret":
            role = secret_role(path)
        elif path.parent == p.jwt_dir:
            role = f"jwt/{path.name}"
        else:
            role = path.name
        data = store.read_sealed(path, role)
        path.write_bytes(data)
        os.chmod(path, 0o600)
    (root / "keystore.json").unlink()
    (root / "master-key").unlink()
    return files


class MigrationTests(_Base):
    def test_an_old_plain_state_directory_is_sealed_in_place_on_start(self) -> None:
        self.boot()
        ca_before = (self.root / "ca" / "ca.pem").read_bytes()
        kid = (self.root / "jwt" / "current").read_text().strip()
        files = make_plain(self.root)
        serialization.load_pem_private_key(files[0].read_bytes(), None)  # really plain now
        report = self.boot()
        self.assertEqual(report.created[0], "keystore")
        self.assertEqual(sorted(report.created[1:]),
                         sorted(f"sealed {f.relative_to(self.root)}" for f in files))
        for path in files:
            self.assertTrue(path.read_bytes().startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"))
        self.assertEqual((self.root / "ca" / "ca.pem").read_bytes(), ca_before)
        self.assertEqual((self.root / "jwt" / "current").read_text().strip(), kid)
        self.assertEqual(self.boot().created, ())


class MigratedGatewayTests(TestCase):
    async def test_a_migrated_state_directory_still_serves_login_and_the_bus(self) -> None:
        root = Path(self.mktemp())
        self.patch(state_module, "hash_password", lambda pw: hash_password(pw, CHEAP_HASHER))
        bootstrap(root, MODULES, kdf=TEST_KDF, env=NO_KEYRING)
        make_plain(root)
        self.assertFalse((root / "keystore.json").exists())
        gw = await start_gateway(self, state_dir=root)
        for path in private_files(root):
            self.assertTrue(path.read_bytes().startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"))
        http = http_client(self)
        tokens = await login(http, gw.base, "admin", gw.admin_password)
        r = await http.post(gw.base + "/api/v1/conversations/messages", json={"message": "hi"},
                            headers={"Authorization": f"Bearer {tokens['access_token']}"})
        body = json.loads(await r.content())
        self.assertEqual((r.code, body.get("reply")), (200, "hi"))
