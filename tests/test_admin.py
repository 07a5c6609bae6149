"""The admin site: separation, authentication, CSRF, every /admin/api route, audit."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.bus.module import RouteSpec
from aico.gateway import config as configuration
from aico.gateway.service import StartupError
from aico.gateway.testing.harness import start_gateway
from aico.gateway.testing.memory import ADMIN_PASSWORD, MEMORY_CONFIG, MemoryGateway, MemoryResponse
from tests.memmodules import raw_module

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def form_login(gw: MemoryGateway, username: str = "admin",
               password: str = ADMIN_PASSWORD) -> MemoryResponse:
    return gw.admin_request("POST", "/admin/login", data=urlencode(
        {"username": username, "password": password}).encode(), headers=FORM)


def cookie_of(response: MemoryResponse) -> str:
    header = response.header("set-cookie") or ""
    return header.split(";", 1)[0]


def csrf_of(gw: MemoryGateway, cookie: str) -> str:
    r = gw.admin_request("GET", "/admin/api/session", headers={"Cookie": cookie})
    assert r.code == 200, r.body
    return str(r.json()["csrf_token"])


class SeparationTests(SynchronousTestCase):
    def test_admin_paths_are_not_found_on_http(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        for path in ("/admin/", "/admin/login", "/admin/api/config", "/admin/api/version"):
            self.assertEqual(gw.get(path, token=token).code, 404, path)

    def test_the_admin_site_routes_through_klein_and_the_api_listeners_do_not(self) -> None:
        from klein.resource import KleinResource

        gw = MemoryGateway(test=self)
        self.assertIsInstance(gw.parts.admin.adapter.router, KleinResource)
        self.assertIsNone(gw.parts.rest.router)
        calls: list[str] = []
        router = gw.parts.admin.adapter.router
        render = router.render
        self.patch(router, "render", lambda request: calls.append("klein") or render(request))
        r = gw.admin_request("GET", "/admin/api/version", token=gw.token())
        self.assertEqual((r.code, calls), (200, ["klein"]))
        weird = gw.admin_request("GET", "/admin/%0Anope")  # a path Werkzeug cannot match
        self.assertEqual(weird.code, 404)
        self.assertEqual(weird.headers.getRawHeaders("content-type"), ["application/problem+json"])

    def test_a_non_loopback_admin_host_is_refused_by_the_config(self) -> None:
        with self.assertRaises(configuration.ConfigError) as e:
            configuration.from_string('[admin]\nhost = "192.0.2.1"\n')
        self.assertEqual(e.exception.key, "admin.host")

    def test_allow_remote_without_the_device_ca_refuses_to_start(self) -> None:
        gw = MemoryGateway(test=self)
        gw.parts.config = gw.parts.config.replace(admin=configuration.GuardedListenerSection(
            host="192.0.2.1", port=0, allow_remote=True))
        with self.assertRaises(StartupError) as e:
            gw.parts.admin_listener()
        self.assertIn("mutual TLS", e.exception.message)


class RealAdminListenerTests(TestCase):
    async def test_the_admin_listener_is_bound_to_loopback_only(self) -> None:
        gw = await start_gateway(self)
        admin = gw.ports["admin"]
        self.assertEqual(admin["host"], "127.0.0.1")
        r = await treq.get(f"http://127.0.0.1:{admin['port']}/admin/login", persistent=False)
        self.assertEqual(r.code, 200)
        await r.content()
        # Not reachable on another address of this machine.
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None,
                                                         socket.AF_INET)} - {"127.0.0.1"}
        for address in addresses:
            if address.startswith("127."):
                continue
            with socket.socket() as s:
                s.settimeout(1)
                self.assertNotEqual(s.connect_ex((address, admin["port"])), 0)
        r = await treq.get(f"http://127.0.0.1:{admin['port']}/admin/login",
                           headers={"Host": "evil.example"}, persistent=False)
        self.assertEqual(r.code, 403)
        await r.content()


def _admin_setup(gw: MemoryGateway, test: SynchronousTestCase) -> dict[str, Any]:
    """Objects the table's routes act on: a device, a rate-limited client, a user, a module."""
    from aico.gateway.devices import ca
    from aico.gateway.store import sync_result
    from tests.test_device_registry import client_cert_pem

    device = sync_result(gw.parts.devices.add(client_cert_pem(ca.DeviceCA.create(), "phone"),
                                              "phone"))
    gw.parts.limiter.check("addr:192.0.2.9", "public")
    gw.add_user("bob", "bob-password-123")
    gw.add_module(raw_module([RouteSpec("GET", "/api/v1/raw/x", "raw/x", capability="users:self")]))
    gw.parts.device_gate.remember(device)
    return {"device": device.device_id}


def routes_table(objs: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/admin/api/session", None),
        ("GET", "/admin/api/config", None),
        ("PATCH", "/admin/api/config", {"logging": {"access": True}}),
        ("POST", "/admin/api/config/reload", None),
        ("GET", "/admin/api/logs?limit=5&level=info", None),
        ("GET", "/admin/api/logs/tail?limit=1", None),
        ("GET", "/admin/api/devices", None),
        ("POST", "/admin/api/devices/pairing", {"minutes": 1}),
        ("GET", "/admin/api/users", None),
        ("POST", "/admin/api/users", {"username": "carol", "password": "carol-password-1",
                                      "roles": ["user"]}),
        ("PATCH", "/admin/api/users/bob", {"disabled": True}),
        ("GET", "/admin/api/modules", None),
        ("POST", "/admin/api/modules/raw/disable", None),
        ("POST", "/admin/api/modules/raw/enable", None),
        ("GET", "/admin/api/audit?limit=5", None),
        ("GET", "/admin/api/audit/verify", None),
        ("GET", "/admin/api/connections", None),
        ("GET", "/admin/api/ratelimits", None),
        ("GET", "/admin/api/version", None),
        ("GET", "/admin/api/sync", None),
        ("DELETE", f"/admin/api/devices/{objs['device']}", None),
        ("DELETE", "/admin/api/ratelimits/addr:192.0.2.9", None),
        ("DELETE", "/admin/api/users/bob", None),
    ]


class AuthenticationTests(SynchronousTestCase):
    def test_every_api_route_401_without_credentials_403_for_a_user_2xx_for_an_admin(self) -> None:
        path = Path(self.mktemp())
        path.write_text(MEMORY_CONFIG)
        gw = MemoryGateway(test=self, config_path=str(path))
        objs = _admin_setup(gw, self)
        gw.add_user("ursula", "ursula-password-1")
        user = gw.token("ursula", "ursula-password-1")
        admin = gw.token()
        table = routes_table(objs)
        api_paths = {(e.method, e.path) for e in gw.parts.admin.own_routes
                     if e.path.startswith("/admin/api/")}
        self.assertEqual(len(api_paths), len(table), "the table covers every API route")
        for method, path, body in table:
            self.assertEqual(gw.admin_request(method, path, json_body=body).code, 401, path)
            self.assertEqual(gw.admin_request(method, path, json_body=body, token=user).code,
                             403, path)
        for method, path, body in table:
            if path.endswith("/logs/tail?limit=1"):
                d = gw.send(method, path, token=admin, admin=True)
                gw.parts.log_buffer.__call__({"log_format": "hello", "log_level": None})
                gw.settle()
                r = self.successResultOf(d)
                self.assertEqual(r.code, 200)
                self.assertEqual(r.header("content-type"), "text/event-stream")
                self.assertIn(b"data: {", r.body)
                continue
            r = gw.admin_request(method, path, json_body=body, token=admin)
            self.assertIn(r.code, (200, 201, 204), f"{method} {path}: {r.code} {r.body!r}")


class SessionTests(SynchronousTestCase):
    def test_form_login_sets_a_strict_httponly_cookie_with_an_expiry(self) -> None:
        gw = MemoryGateway(test=self)
        r = form_login(gw)
        self.assertEqual(r.code, 303)
        self.assertEqual(r.header("location"), "/admin/")
        header = r.header("set-cookie") or ""
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age="):
            self.assertIn(flag, header)
        home = gw.admin_request("GET", "/admin/", headers={"Cookie": cookie_of(r)})
        self.assertEqual(home.code, 200)
        self.assertIn(b"admin", home.body)
        self.assertRegex(home.body.decode(), r'<meta name="csrf-token" content="[^"]+"')

    def test_each_login_gets_a_new_session_id(self) -> None:
        gw = MemoryGateway(test=self)
        first = cookie_of(form_login(gw))
        second = gw.admin_request("POST", "/admin/login", data=urlencode(
            {"username": "admin", "password": ADMIN_PASSWORD}).encode(),
            headers={**FORM, "Cookie": first})
        self.assertNotEqual(first, cookie_of(second))
        # The old session is gone.
        self.assertEqual(gw.admin_request("GET", "/admin/api/session",
                                          headers={"Cookie": first}).code, 401)

    def test_csrf_token_is_needed_for_state_changing_cookie_requests(self) -> None:
        gw = MemoryGateway(test=self)
        cookie = cookie_of(form_login(gw))
        gw.add_module(raw_module([RouteSpec("GET", "/api/v1/raw/x", "raw/x",
                                            capability="users:self")]))
        path = "/admin/api/modules/raw/disable"
        self.assertEqual(gw.admin_request("POST", path, headers={"Cookie": cookie}).code, 403)
        self.assertEqual(gw.admin_request("POST", path, headers={
            "Cookie": cookie, "X-CSRF-Token": "wrong"}).code, 403)
        csrf = csrf_of(gw, cookie)
        self.assertEqual(gw.admin_request("POST", path, headers={
            "Cookie": cookie, "X-CSRF-Token": csrf}).code, 200)
        # A bearer token needs none.
        self.assertEqual(gw.admin_request("POST", "/admin/api/modules/raw/enable",
                                          token=gw.token()).code, 200)

    def test_logout_ends_the_session(self) -> None:
        gw = MemoryGateway(test=self)
        cookie = cookie_of(form_login(gw))
        csrf = csrf_of(gw, cookie)
        r = gw.admin_request("POST", "/admin/logout", data=urlencode({"csrf_token": csrf}).encode(),
                             headers={**FORM, "Cookie": cookie})
        self.assertEqual(r.code, 303)
        self.assertIn("Max-Age=0", r.header("set-cookie") or "")
        self.assertEqual(gw.admin_request("GET", "/admin/api/session",
                                          headers={"Cookie": cookie}).code, 401)

    def test_failed_form_logins_count_toward_the_account_lockout(self) -> None:
        gw = MemoryGateway("[auth]\nlockout_threshold = 3\n", test=self)
        for _ in range(3):
            self.assertEqual(form_login(gw, password="wrong-password").code, 401)
        # Locked now: the right password is refused on the API too.
        r = gw.post("/api/v1/users/authenticate", {"username": "admin", "password": ADMIN_PASSWORD})
        self.assertEqual(r.code, 401)
        self.assertEqual(form_login(gw).code, 401)

    def test_a_user_without_admin_capabilities_gets_no_session(self) -> None:
        gw = MemoryGateway(test=self)
        gw.add_user("ursula", "ursula-password-1")
        r = form_login(gw, "ursula", "ursula-password-1")
        self.assertEqual(r.code, 403)
        self.assertIsNone(r.header("set-cookie"))


class ConfigTests(SynchronousTestCase):
    def gateway(self) -> tuple[MemoryGateway, Path]:
        path = Path(self.mktemp())
        path.write_text(MEMORY_CONFIG)
        return MemoryGateway(test=self, config_path=str(path)), path

    def test_a_valid_patch_applies_live_and_updates_the_file(self) -> None:
        gw, path = self.gateway()
        r = gw.admin_request("PATCH", "/admin/api/config", token=gw.token(), json_body={
            "auth": {"lockout_threshold": 7}, "http": {"port": 9999}})
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.json()["live"], ["auth.lockout_threshold"])
        self.assertEqual(r.json()["restart"], ["http.port"])
        self.assertEqual(gw.parts.config.auth.lockout_threshold, 7)
        on_disk = configuration.load(path)
        self.assertEqual(on_disk.auth.lockout_threshold, 7)
        self.assertEqual(on_disk.http.port, 9999)
        self.assertEqual(gw.admin_request("GET", "/admin/api/config", token=gw.token()).json()[
            "config"]["auth"]["lockout_threshold"], 7)

    def test_an_invalid_patch_is_400_and_changes_nothing(self) -> None:
        gw, path = self.gateway()
        before = path.read_bytes()
        stat = os.stat(path)
        for patch in ({"auth": {"lockout_threshold": 0}}, {"nope": {"x": 1}},
                      {"auth": {"leeway": "soon"}}):
            r = gw.admin_request("PATCH", "/admin/api/config", token=gw.token(), json_body=patch)
            self.assertEqual(r.code, 400, patch)
            self.assertEqual(r.header("content-type"), "application/problem+json")
        self.assertEqual(path.read_bytes(), before)
        self.assertEqual(os.stat(path).st_mtime_ns, stat.st_mtime_ns)
        self.assertEqual(gw.parts.config.auth.lockout_threshold, 5)

    def test_without_a_config_file_a_patch_is_409(self) -> None:
        gw = MemoryGateway(test=self)
        r = gw.admin_request("PATCH", "/admin/api/config", token=gw.token(),
                             json_body={"auth": {"lockout_threshold": 7}})
        self.assertEqual(r.code, 409)

    def test_reload_rereads_the_file(self) -> None:
        gw, path = self.gateway()
        path.write_text(MEMORY_CONFIG + "[logging]\naccess = false\n")
        r = gw.admin_request("POST", "/admin/api/config/reload", token=gw.token())
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["live"], ["logging.access"])
        self.assertFalse(gw.parts.config.logging.access)

    def test_secrets_are_redacted(self) -> None:
        from aico.gateway.admin.configedit import REDACTED, redact

        self.assertEqual(redact({"a": {"db_password": "x", "port": 1}}),
                         {"a": {"db_password": REDACTED, "port": 1}})


class ModuleTests(SynchronousTestCase):
    def test_a_modules_admin_route_appears_on_the_admin_site_once_it_registers(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        path = "/admin/api/modules/raw/stats"
        self.assertEqual(gw.admin_request("GET", path, token=token).code, 404)
        gw.add_module(raw_module([
            RouteSpec("GET", "/stats", "raw/stats", admin=True),
            RouteSpec("GET", "/admin/more", "raw/more"),
            RouteSpec("GET", "/api/v1/raw/x", "raw/x", capability="users:self")]))
        r = gw.admin_request("GET", path, token=token)
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(gw.admin_request("GET", "/admin/api/modules/raw/more",
                                          token=token).code, 200)
        # Never on http, and a user token is not enough.
        self.assertEqual(gw.get("/admin/more", token=token).code, 404)
        self.assertEqual(gw.get(path, token=token).code, 404)
        gw.add_user("ursula", "ursula-password-1")
        self.assertEqual(gw.admin_request("GET", path,
                                          token=gw.token("ursula", "ursula-password-1")).code, 403)
        listed = gw.admin_request("GET", "/admin/api/modules", token=token).json()["modules"]
        raw = next(m for m in listed if m["name"] == "raw")
        self.assertEqual(raw["version"], "9.9")
        self.assertIn(path, [a["path"] for a in raw["admin_routes"]])

    def test_a_disabled_module_answers_503_until_enabled(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        gw.add_module(raw_module([RouteSpec("GET", "/api/v1/raw/x", "raw/x",
                                            capability="users:self")]))
        self.assertEqual(gw.get("/api/v1/raw/x", token=token).code, 200)
        self.assertEqual(gw.admin_request("POST", "/admin/api/modules/raw/disable",
                                          token=token).code, 200)
        r = gw.get("/api/v1/raw/x", token=token)
        self.assertEqual(r.code, 503)
        self.assertEqual(r.json()["code"], "backend_unavailable")
        self.assertEqual(gw.admin_request("POST", "/admin/api/modules/raw/enable",
                                          token=token).code, 200)
        self.assertEqual(gw.get("/api/v1/raw/x", token=token).code, 200)
        self.assertEqual(gw.admin_request("POST", "/admin/api/modules/nope/disable",
                                          token=token).code, 404)


class OperationsTests(SynchronousTestCase):
    def test_unblock_frees_a_blocked_client(self) -> None:
        gw = MemoryGateway("[ratelimit]\nblock_after = 1\n[ratelimit.tiers.public]\n"
                           "requests = 1\nper_seconds = 60\nburst = 1\n", test=self)
        limiter = gw.parts.limiter
        key = "addr:192.0.2.9"
        limiter.check(key, "public")
        limiter.check(key, "public")
        self.assertTrue(limiter.check(key, "public").blocked)
        state = gw.admin_request("GET", "/admin/api/ratelimits", token=gw.token()).json()
        self.assertTrue(next(c for c in state["clients"] if c["client"] == key)["blocked"])
        r = gw.admin_request("DELETE", "/admin/api/ratelimits/" + key, token=gw.token())
        self.assertEqual(r.code, 204)
        self.assertTrue(limiter.check(key, "public").allowed)
        self.assertEqual(gw.admin_request("DELETE", "/admin/api/ratelimits/addr:nobody",
                                          token=gw.token()).code, 404)

    def test_audit_verify_and_paging(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        r = gw.admin_request("GET", "/admin/api/audit/verify", token=token)
        self.assertEqual(r.code, 200)
        self.assertTrue(r.json()["ok"])
        first = gw.admin_request("GET", "/admin/api/audit?after=0&limit=1", token=token).json()
        self.assertEqual(len(first["entries"]), 1)
        self.assertEqual(first["next_after"], first["entries"][0]["seq"])

    def test_logs_filter_by_level_and_include_the_access_log(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        gw.get("/api/v1/health")
        entries = gw.admin_request("GET", "/admin/api/logs?limit=500", token=token).json()["entries"]
        self.assertTrue(any(e["namespace"] == "aico.access" for e in entries))
        warn = gw.admin_request("GET", "/admin/api/logs?level=error", token=token).json()["entries"]
        self.assertTrue(all(e["level"] in ("error", "critical") for e in warn))
        self.assertFalse(any(re.search(r"eyJ[\w-]+\.[\w-]+\.", e["text"]) for e in entries))
        self.assertEqual(gw.admin_request("GET", "/admin/api/logs?level=loud",
                                          token=token).code, 400)

    def test_version_and_sync(self) -> None:
        gw = MemoryGateway(test=self)
        v = gw.admin_request("GET", "/admin/api/version", token=gw.token()).json()
        self.assertEqual(v["protocols"]["websocket_subprotocols"], ["aico.v1.json", "aico.v1.proto"])
        self.assertIn("conversation", v["modules"])
        self.assertEqual(v["protocols"]["sync"], "1.0")
        sync = gw.admin_request("GET", "/admin/api/sync", token=gw.token()).json()
        self.assertEqual((sync["enabled"], sync["peers"], sync["collections"], sync["listener"]),
                         (False, [], {}, None))
        self.assertEqual(sync["node_id"], gw.parts.sync.node_id)

    def test_sync_lists_each_collection_with_policy_items_and_merkle_root(self) -> None:
        gw = MemoryGateway('[sync.collections.notes]\nstrategy = "keep-both"\n'
                           '[sync.collections.local]\nsync = false\n', test=self)
        token = gw.token()
        empty = gw.admin_request("GET", "/admin/api/sync", token=token).json()["collections"]
        self.assertEqual(empty["notes"], {"sync": True, "strategy": "keep-both", "peers": "all",
                                          "items": 0, "root": "00" * 32})
        self.assertEqual(empty["local"]["sync"], False)
        r = gw.request("PUT", "/api/v1/sync/collections/notes/items/a", json_body={"value": 1},
                       token=token)
        self.assertEqual(r.code, 200, r.body)
        notes = gw.admin_request("GET", "/admin/api/sync", token=token).json()["collections"]["notes"]
        self.assertEqual(notes["items"], 1)
        self.assertEqual(notes["root"], gw.parts.sync.root("notes").hex())
        self.assertNotEqual(notes["root"], "00" * 32)

    def test_every_admin_action_is_audited_with_who_where_what(self) -> None:
        gw = MemoryGateway(test=self)
        objs = _admin_setup(gw, self)
        token = gw.token()
        changing = [(m, p, b) for m, p, b in routes_table(objs) if m != "GET"]
        for method, path, body in changing:
            gw.admin_request(method, path, json_body=body, token=token)
        gw.admin_request("POST", "/admin/api/modules/raw/disable")  # refused: audited too
        entries = self.successResultOf(gw.parts.audit.list(1000))
        actions = [e for e in entries if e.event == "admin_action"]
        seen = [(e.actor, e.detail["path"], e.detail["peer"], e.detail["transport"])
                for e in actions]
        for method, path, _ in changing:
            self.assertIn(("admin", path.split("?")[0], "127.0.0.1", "admin"), seen, path)
        self.assertIn(("anonymous", "/admin/api/modules/raw/disable", "127.0.0.1", "admin"), seen)
        self.assertTrue(all(e.detail["route"].split(" ")[0] in ("POST", "PATCH", "DELETE")
                            for e in actions))
        self.assertTrue(json.dumps([e.detail for e in actions]))
