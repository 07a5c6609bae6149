"""``aico-gateway backup DIR`` / ``restore DIR``: a consistent copy of the state directory
while a real gateway runs and writes, restored into a new directory on which a new
gateway starts with the same users and devices."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway import backup as backup_module
from aico.gateway.cli import main
from aico.gateway.devices import ca
from aico.gateway.state import bootstrap
from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.keystore import TEST_KDF

PASSWORD = "carol-password-for-tests"
ENV = {"AICO_NO_KEYRING": "1"}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ=ENV)
    return code, out.getvalue(), err.getvalue()


def device_pem(gw: RunningGateway, name: str) -> str:
    authority = gw.parts.materials.device_ca
    assert authority is not None
    cert = authority.issue_client_cert(ca.create_csr(ca.generate_key(), name), name)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class BackupWhileRunningTests(TestCase):
    timeout = 120

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(400):
            if condition():
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("condition never held")

    async def test_a_backup_taken_while_logins_happen_restores_into_a_new_directory_that_starts(
            self) -> None:
        gw = await start_gateway(self)
        http = http_client(self)
        admin = await login(http, gw.base, "admin", gw.admin_password)
        auth = {"Authorization": f"Bearer {admin['access_token']}"}
        r = await http.post(gw.base + "/api/v1/users", headers=auth,
                            json={"username": "carol", "password": PASSWORD, "roles": ["user"]})
        self.assertEqual(r.code, 201, await r.content())
        device = await gw.parts.devices.add(device_pem(gw, "phone"), "phone", paired_for="carol")

        # Logins (each a registry write and audit entries) go on while the backup runs.
        writing = True
        logins = 0

        async def keep_logging_in() -> None:
            nonlocal logins
            while writing:
                await login(http, gw.base, "carol", PASSWORD)
                logins += 1

        writers = [keep_logging_in() for _ in range(2)]
        from twisted.internet.defer import ensureDeferred

        running = DeferredList([ensureDeferred(w) for w in writers], fireOnOneErrback=True,
                               consumeErrors=True)
        await self.until(lambda: logins > 0)
        target = Path(self.mktemp()).absolute()
        started = logins
        code, out, err = await deferToThread(cli, "backup", str(target),
                                             "--state-dir", str(gw.state_dir))
        before = logins
        await self.until(lambda: logins > before)
        writing = False
        await running
        self.assertEqual(code, 0, err)
        self.assertGreater(started, 0)  # writes went on before and after the backup
        self.assertGreater(logins, before)
        manifest = json.loads((target / "backup-manifest.json").read_text())
        self.assertIn("registry.db", manifest["files"])
        self.assertIn("keystore.json", manifest["files"])
        self.assertTrue(manifest["master_key_included"])  # this directory's secret is a file
        self.assertFalse((target / "ports.json").exists())

        restored = Path(self.mktemp()).absolute()
        code, out, err = await deferToThread(cli, "restore", str(target),
                                             "--state-dir", str(restored))
        self.assertEqual(code, 0, err)
        self.assertIn("audit chain", out)

        again = await start_gateway(self, state_dir=restored)
        tokens = await login(http, again.base, "carol", PASSWORD)
        self.assertTrue(tokens["access_token"])
        devices = await again.parts.devices.list()
        self.assertEqual([(d.device_id, d.name, d.paired_for) for d in devices],
                         [(device.device_id, "phone", "carol")])
        verdict = await again.parts.audit.verify()
        self.assertTrue(verdict.ok, verdict)


class BackupCommandTests(SynchronousTestCase):
    def state(self) -> Path:
        root = Path(self.mktemp()).absolute()
        bootstrap(root, (), kdf=TEST_KDF, env=ENV)
        return root

    def test_backup_refuses_an_existing_non_empty_target(self) -> None:
        state = self.state()
        target = Path(self.mktemp()).absolute()
        target.mkdir()
        (target / "precious.txt").write_text("keep me")
        code, _, err = cli("backup", str(target), "--state-dir", str(state))
        self.assertEqual(code, 1)
        self.assertIn("not empty", err)
        self.assertEqual(sorted(os.listdir(target)), ["precious.txt"])

    def test_backup_into_an_existing_empty_directory_works(self) -> None:
        state = self.state()
        target = Path(self.mktemp()).absolute()
        target.mkdir()
        code, out, err = cli("backup", str(target), "--state-dir", str(state))
        self.assertEqual(code, 0, err)
        self.assertIn("master-key", out)

    def test_restore_refuses_a_non_empty_state_directory_unless_forced(self) -> None:
        state = self.state()
        target = Path(self.mktemp()).absolute()
        self.assertEqual(cli("backup", str(target), "--state-dir", str(state))[0], 0)
        other = self.state()
        code, _, err = cli("restore", str(target), "--state-dir", str(other))
        self.assertEqual(code, 1)
        self.assertIn("--force", err)
        code, _, err = cli("restore", str(target), "--state-dir", str(other), "--force")
        self.assertEqual(code, 0, err)
        self.assertEqual((other / "keystore.json").read_bytes(),
                         (state / "keystore.json").read_bytes())

    def test_a_tampered_backup_is_refused(self) -> None:
        state = self.state()
        target = Path(self.mktemp()).absolute()
        self.assertEqual(cli("backup", str(target), "--state-dir", str(state))[0], 0)
        with (target / "registry.db").open("ab") as f:
            f.write(b"x")
        restored = Path(self.mktemp()).absolute()
        code, _, err = cli("restore", str(target), "--state-dir", str(restored))
        self.assertEqual(code, 1)
        self.assertIn("checksum", err)

    def test_a_backup_without_master_key_says_so_and_restore_tells_how_to_open_it(
            self) -> None:
        state = self.state()
        (state / "master-key").unlink()  # as if the secret were in the keyring
        target = Path(self.mktemp()).absolute()
        code, out, _ = cli("backup", str(target), "--state-dir", str(state))
        self.assertEqual(code, 0)
        self.assertIn("not in it", out)
        self.assertFalse((target / "master-key").exists())
        code, out, _ = cli("restore", str(target), "--state-dir",
                           str(Path(self.mktemp()).absolute()))
        self.assertEqual(code, 0)
        self.assertIn("AICO_MASTER_PASSWORD", out)

    def test_side_files_are_left_out(self) -> None:
        state = self.state()
        (state / "ports.json").write_text("{}")
        (state / "registry.db-wal").write_bytes(b"")
        report = backup_module.backup(state, Path(self.mktemp()).absolute())
        self.assertNotIn("ports.json", report.files)
        self.assertNotIn("registry.db-wal", report.files)
