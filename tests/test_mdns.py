"""mDNS on loopback only (PITFALLS.md): the gateway advertises `_aico-gateway._tcp`, its TXT
follows the pairing window, and `aico-client pair` without --host finds it and pairs."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.client import cli as client_cli
from aico.client.discovery import browse
from aico.gateway import config as configuration
from aico.gateway.devices.ca import device_id
from aico.gateway.devices.mdns import advertised_addresses, should_advertise
from aico.gateway.testing.harness import start_gateway
from aico.gateway.testing.waiting import eventually
from tests.test_pairing_real import free_port, open_window


class AdvertiseWhenTests(SynchronousTestCase):
    def config(self, text: str) -> configuration.Config:
        return configuration.from_string(text)

    def test_loopback_listeners_are_not_advertised_by_default(self) -> None:
        self.assertFalse(should_advertise(self.config("")))

    def test_a_pairing_listener_on_the_lan_is_advertised(self) -> None:
        self.assertTrue(should_advertise(self.config('[pairing]\nhost = "0.0.0.0"\n')))

    def test_a_tls_listener_on_the_lan_is_advertised(self) -> None:
        self.assertTrue(should_advertise(self.config('[tls]\nhost = "192.168.1.10"\n')))

    def test_off_wins_and_on_advertises_loopback(self) -> None:
        self.assertFalse(should_advertise(self.config('[pairing]\nhost = "0.0.0.0"\n'
                                                      '[mdns]\nadvertise = "off"\n')))
        self.assertTrue(should_advertise(self.config('[mdns]\nadvertise = "on"\n')))

    def test_configured_interfaces_are_the_advertised_addresses(self) -> None:
        c = self.config('[mdns]\ninterfaces = ["127.0.0.1"]\n')
        self.assertEqual(advertised_addresses(c), ["127.0.0.1"])


class MdnsRealTests(TestCase):
    timeout = 60

    async def test_the_client_finds_the_gateway_over_mdns_and_pairs_without_host(self) -> None:
        port = free_port()
        name = f"test-{uuid.uuid4().hex[:8]}"
        gw = await start_gateway(self, f'[pairing]\nport = {port}\n'
                                       f'[mdns]\nadvertise = "on"\ninterfaces = ["127.0.0.1"]\n'
                                       f'name = "{name}"\n')
        advertiser = gw.service.getServiceNamed("mdns")
        fingerprint = device_id(gw.parts.materials.server_identity[0])  # type: ignore[index]
        await eventually(lambda: advertiser.published.get("pairing") == "closed", timeout=10)
        found = [g for g in await browse(reactor, 2.0, ["127.0.0.1"], want_pairing=False)
                 if g.name == name]
        self.assertEqual([(g.pairing_open, g.fingerprint_hint) for g in found],
                         [(False, fingerprint)])
        # A window opens: the TXT says so, with the pairing port.
        code = open_window(gw)
        await eventually(lambda: advertiser.published.get("pairing") == "open", timeout=10)
        self.assertEqual(advertiser.published["pairing_port"], str(port))
        out_dir = Path(self.mktemp())
        out, err = io.StringIO(), io.StringIO()
        status = await client_cli.run(reactor, [
            "pair", "--code", code, "--name", "laptop", "--out", str(out_dir),
            "--interface", "127.0.0.1", "--browse-timeout", "8"], out, err)
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn(f"found gateway {name!r}", err.getvalue())
        gateway = json.loads((out_dir / "gateway.json").read_text())
        # What the device pins came through the PAKE, and matches the real certificate.
        self.assertEqual(gateway["fingerprint"], fingerprint)
        self.assertEqual((gateway["host"], gateway["port"]), ("127.0.0.1", port))
        await eventually(lambda: advertiser.published.get("pairing") == "closed", timeout=10)
