"""The device registry and pairing windows on the production schema (a real SQLite file),
and the change watcher that lets a running gateway see what the CLI wrote."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock
from twisted.trial import unittest

from aico.gateway.devices import ca
from aico.gateway.devices.registry import (
    ChangeWatcher,
    DeviceStore,
    PairingWindowStore,
    new_code,
    normalise_code,
)
from aico.gateway.store import SyncDatabase, sync_result


def client_cert_pem(authority: ca.DeviceCA, name: str) -> str:
    key = ca.generate_key()
    cert = authority.issue_client_cert(ca.create_csr(key, name), name)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class DeviceStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = SyncDatabase(self.path)
        self.addCleanup(self.db.close)
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = DeviceStore(self.db, self.clock)
        self.authority = ca.DeviceCA.create()

    def test_a_device_is_registered_under_its_certificates_id(self) -> None:
        pem = client_cert_pem(self.authority, "phone")
        device = sync_result(self.store.add(pem, "phone", paired_for="alice",
                                            capabilities=("conversations:write",)))
        from cryptography import x509
        self.assertEqual(device.device_id, ca.device_id(x509.load_pem_x509_certificate(pem.encode())))
        self.assertEqual((device.name, device.trust, device.paired_for, device.paired_at),
                         ("phone", "standard", "alice", 1000.0))
        self.assertEqual(device.capabilities, ("conversations:write",))
        self.assertNotIn("cert_pem", device.public())
        self.assertEqual([d.device_id for d in sync_result(self.store.list())], [device.device_id])

    def test_revoke_rename_and_touch(self) -> None:
        device = sync_result(self.store.add(client_cert_pem(self.authority, "laptop"), "laptop"))
        self.clock.advance(5)
        self.assertTrue(sync_result(self.store.revoke(device.device_id)))
        self.assertFalse(sync_result(self.store.revoke(device.device_id)), "revoked once only")
        self.assertFalse(sync_result(self.store.revoke("NO-SUCH")))
        self.assertTrue(sync_result(self.store.rename(device.device_id, "work laptop")))
        sync_result(self.store.touch(device.device_id))
        after = sync_result(self.store.get(device.device_id))
        assert after is not None
        self.assertEqual((after.revoked, after.revoked_at, after.name, after.last_seen),
                         (True, 1005.0, "work laptop", 1005.0))
        self.assertEqual(sync_result(self.store.revoked_ids()), {device.device_id})

    def test_an_unknown_trust_level_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            sync_result(self.store.add(client_cert_pem(self.authority, "x"), "x", trust="root"))


class PairingWindowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.db = SyncDatabase()
        self.addCleanup(self.db.close)
        self.clock = Clock()
        self.clock.advance(1000)
        self.windows = PairingWindowStore(self.db, self.clock)

    def test_codes_are_short_unambiguous_and_compare_without_dashes(self) -> None:
        code = new_code()
        self.assertRegex(code, r"^[2-9A-HJKMNP-Z]{4}-[2-9A-HJKMNP-Z]{4}$")
        self.assertEqual(normalise_code(code.lower()), code.replace("-", ""))

    def test_a_window_is_used_once(self) -> None:
        window = sync_result(self.windows.open(seconds=300, opened_by="cli"))
        self.assertTrue(window.is_open(self.clock.seconds()))
        self.assertTrue(sync_result(self.windows.use(window.window_id, "DEV")))
        self.assertFalse(sync_result(self.windows.use(window.window_id, "DEV2")))
        self.assertEqual(sync_result(self.windows.active()), [])

    def test_three_failures_close_the_window(self) -> None:
        window = sync_result(self.windows.open(seconds=300, opened_by="cli"))
        states = [sync_result(self.windows.record_failure(window.window_id, 3)) for _ in range(3)]
        self.assertEqual([w.state if w else None for w in states], ["open", "open", "closed"])
        self.assertIsNone(sync_result(self.windows.record_failure(window.window_id, 3)))
        self.assertFalse(sync_result(self.windows.use(window.window_id, "DEV")))

    def test_an_expired_window_is_not_active_and_cannot_be_used(self) -> None:
        window = sync_result(self.windows.open(seconds=60, opened_by="cli"))
        self.clock.advance(60)
        self.assertFalse(sync_result(self.windows.use(window.window_id, "DEV")))
        self.assertEqual(sync_result(self.windows.active()), [])
        after = sync_result(self.windows.get(window.window_id))
        assert after is not None
        self.assertEqual(after.state, "expired")


class ChangeWatcherTests(unittest.TestCase):
    def two_connections(self) -> tuple[SyncDatabase, SyncDatabase]:
        """The gateway's and the CLI's connections to one registry file."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        gateway, cli = SyncDatabase(path), SyncDatabase(path)
        self.addCleanup(gateway.close)
        self.addCleanup(cli.close)
        return gateway, cli

    def test_a_commit_by_another_connection_is_seen_and_its_own_are_not(self) -> None:
        gateway, cli = self.two_connections()
        watcher = ChangeWatcher(gateway)
        seen: list[int] = []
        watcher.add_listener(lambda: seen.append(1))
        sync_result(watcher.check())
        sync_result(PairingWindowStore(gateway).open(seconds=60, opened_by="self"))
        sync_result(watcher.check())
        self.assertEqual(seen, [], "its own commit is not another process's change")
        sync_result(PairingWindowStore(cli).open(seconds=60, opened_by="cli"))
        sync_result(watcher.check())
        self.assertEqual(seen, [1])
        sync_result(watcher.check())
        self.assertEqual(seen, [1], "nothing new")

    def test_a_failing_listener_does_not_stop_the_others(self) -> None:
        gateway, cli = self.two_connections()
        watcher = ChangeWatcher(gateway)
        seen: list[str] = []

        def boom() -> None:
            raise RuntimeError("boom")

        watcher.add_listener(boom)
        watcher.add_listener(lambda: seen.append("second"))
        sync_result(watcher.check())
        sync_result(DeviceStore(cli).revoked_ids())
        sync_result(PairingWindowStore(cli).open(seconds=60, opened_by="cli"))
        sync_result(watcher.check())
        self.assertEqual(seen, ["second"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
