"""The DNS-rebinding guard: a loopback listener answers only loopback (or allowed) Hosts."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.admin.hosts import host_allowed, host_name
from aico.gateway.testing.memory import MemoryGateway


class HostNameTests(SynchronousTestCase):
    def test_loopback_names_with_any_port_are_allowed_and_others_are_not(self) -> None:
        for host in ("localhost", "localhost:8771", "127.0.0.1", "127.0.0.1:1", "[::1]",
                     "[::1]:8773", "LOCALHOST:80", None):
            self.assertTrue(host_allowed(host), host)
        for host in ("evil.example", "evil.example:8771", "127.0.0.1.evil.example", "",
                     "localhost.evil.example", "[fe80::1]:80"):
            self.assertFalse(host_allowed(host), host)

    def test_allowed_hosts_are_compared_without_the_port(self) -> None:
        self.assertTrue(host_allowed("gw.lan:8771", ("gw.lan",)))
        self.assertFalse(host_allowed("other.lan:8771", ("gw.lan",)))
        self.assertEqual(host_name("[::1]:80"), "::1")


class HttpHostGuardTests(SynchronousTestCase):
    def test_a_foreign_host_gets_a_403_problem_on_http(self) -> None:
        gw = MemoryGateway(test=self)
        out, _ = gw.raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: evil.example\r\n"
                             b"Connection: close\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head)
        self.assertIn(b"application/problem+json", head)
        self.assertIn(b'"code":"forbidden"', body)

    def test_a_loopback_host_is_served_on_http(self) -> None:
        gw = MemoryGateway(test=self)
        out, _ = gw.raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost:8771\r\n"
                             b"Connection: close\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out[:80])

    def test_an_allowed_host_is_served_on_http(self) -> None:
        gw = MemoryGateway('[http]\nallowed_hosts = ["gw.lan"]\n', test=self)
        out, _ = gw.raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: gw.lan:8771\r\n"
                             b"Connection: close\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out[:80])

    def test_a_websocket_upgrade_with_a_foreign_host_is_refused(self) -> None:
        gw = MemoryGateway(test=self)
        out, _ = gw.raw_http(b"GET /ws HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 403"), out[:80])
        self.assertNotIn(b"Sec-WebSocket-Accept", out)

    def test_the_memory_clients_send_a_loopback_host(self) -> None:
        gw = MemoryGateway(test=self)
        self.assertEqual(gw.get("/api/v1/health").code, 200)
        gw.websocket().close()

    def test_a_foreign_host_gets_a_403_problem_on_admin(self) -> None:
        gw = MemoryGateway(test=self)
        out, _ = gw.raw_http(b"GET /admin/login HTTP/1.1\r\nHost: evil.example:8773\r\n"
                             b"Connection: close\r\n\r\n", admin=True)
        self.assertTrue(out.startswith(b"HTTP/1.1 403"), out[:80])
        ok, _ = gw.raw_http(b"GET /admin/login HTTP/1.1\r\nHost: 127.0.0.1:8773\r\n"
                            b"Connection: close\r\n\r\n", admin=True)
        self.assertTrue(ok.startswith(b"HTTP/1.1 200"), ok[:80])
