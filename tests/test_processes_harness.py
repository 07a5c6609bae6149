"""The multi-process test harness: whole gateways as twistd processes (issue 13's tests)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import http_client
from aico.gateway.testing.processes import GatewayProcess, _toml


class TomlWriterTests(TestCase):
    def test_nested_tables_and_quoted_names_read_back_as_written(self) -> None:
        import tomllib

        value = {"http": {"port": 0, "allowed_hosts": ["a", "b"]},
                 "sync": {"enabled": True, "collections": {"notes.v1": {"strategy": "lww"}}}}
        self.assertEqual(tomllib.loads(_toml(value)), value)


class GatewayProcessTests(TestCase):
    timeout = 90

    async def test_start_serve_stop_restart_on_the_same_state_and_kill(self) -> None:
        gw = GatewayProcess(self, "a")
        ports = await gw.start()
        http = http_client(self)
        r = await http.get(gw.url() + "/api/v1/health")
        self.assertEqual(r.code, 200, await r.content())
        self.assertEqual(await gw.stop(), 0)
        await gw.start()  # the same state directory: the same admin password works
        r = await http.post(gw.url() + "/api/v1/users/authenticate",
                            json={"username": "admin", "password": gw.admin_password})
        self.assertEqual(r.code, 200, await r.content())
        self.assertNotEqual(await gw.kill(), 0)
        self.assertFalse(gw.running)
        code, out, err = await gw.cli("user", "list")
        self.assertEqual(code, 0, err)
        self.assertIn("admin", out)
        self.assertIn("http", ports)
