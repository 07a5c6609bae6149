"""The security chain end to end over HTTP on the in-memory gateway: hostile tokens,
roles, limits, lockout, rate limiting, and no secret in the logs.

The production composition on a memory reactor (``aico.gateway.testing.memory``): time
moves only when a test advances it; raw bytes reach the gateway's own site through
``MemoryGateway.raw_http``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from aico.gateway import config as configuration
from aico.gateway.routing.messages import Request
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.chain import SecurityChain
from aico.gateway.security.ratelimit import GcraLimiter
from aico.gateway.testing.harness import login
from aico.gateway.testing.memory import ADMIN_PASSWORD, MemoryGateway
from tests.memmodules import send


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class GatewayCase(TestCase):
    extra = ""

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.extra, test=self)
        self.base = ""
        self.admin_password = ADMIN_PASSWORD
        self.anon = self.gw.client()
        self.tokens = self.gw.login("admin", self.admin_password)
        self.admin = self.gw.client(token=self.tokens["access_token"])

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        kw: dict[str, Any] = {"headers": h}
        if body is not None:
            kw["json"] = body
        r = await self.anon.request(method, self.base + path, **kw)
        content = await r.content()
        return r.code, (json.loads(content) if content else None), r.headers

    def call_later(self, method: str, path: str, token: str | None = None,
                   body: Any = None) -> Deferred[tuple[int, Any, Any]]:
        """Like :meth:`call`, without waiting for the answer (fires as the gateway settles)."""
        d = send(self.gw, method, path, token=token, json_body=body)
        return d.addCallback(lambda r: (r.code, (json.loads(r.body) if r.body else None), r.headers))

    async def make_user(self, name: str, roles: list[str], password: str = "a-long-password-1") -> str:
        status, body, _ = await self.call("POST", "/api/v1/users", self.tokens["access_token"],
                                          {"username": name, "password": password, "roles": roles})
        self.assertEqual(status, 201, body)
        return password


class HostileTokenTests(GatewayCase):
    """Every refused token, one test each, through the whole HTTP stack."""

    def key(self) -> tuple[str, Any]:
        keyring = self.gw.parts.tokens.keyring
        return keyring.current_kid, keyring.signing_key

    def now(self) -> int:
        return int(self.gw.clock.seconds())

    def claims(self, **over: Any) -> dict[str, Any]:
        now = self.now()
        base = {"sub": "admin", "iss": "aico-gateway", "aud": "aico", "iat": now, "nbf": now,
                "exp": now + 600, "jti": "j-" + str(now), "roles": ["admin"], "caps": ["*"],
                "typ": "access", "fam": "f1"}
        base.update(over)
        return {k: v for k, v in base.items() if v is not None}

    def forge(self, headers: dict[str, Any] | None = None, **over: Any) -> str:
        kid, key = self.key()
        return jwt.encode(self.claims(**over), key, algorithm="EdDSA",
                          headers={"kid": kid, **(headers or {})})

    async def refused(self, token: str | None, code: str) -> None:
        status, body, headers = await self.call("GET", "/api/v1/users/me", token)
        self.assertEqual((status, body["code"]), (401, code), body)
        self.assertTrue(headers.getRawHeaders("www-authenticate")[0].startswith("Bearer"))

    async def test_forged_token_with_the_real_key_is_accepted(self) -> None:
        status, body, _ = await self.call("GET", "/api/v1/users/me", self.forge())
        self.assertEqual((status, body["username"]), (200, "admin"))

    def test_no_token(self) -> Any:
        return ensureDeferred(self.refused(None, "unauthenticated"))

    async def test_not_a_bearer_header(self) -> None:
        status, body, _ = await self.call("GET", "/api/v1/users/me",
                                          headers={"Authorization": "Basic YWRtaW46eA=="})
        self.assertEqual((status, body["code"]), (401, "token_invalid"))

    def test_alg_none(self) -> Any:
        header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(self.claims()).encode())}."
        return ensureDeferred(self.refused(token, "token_invalid"))

    def test_other_algorithm_es256(self) -> Any:
        kid, _ = self.key()
        token = jwt.encode(self.claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                           headers={"kid": kid})
        return ensureDeferred(self.refused(token, "token_invalid"))

    def test_hs256_signed_with_the_public_key(self) -> Any:
        kid, key = self.key()
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = b64(json.dumps(self.claims()).encode())
        sig = b64(hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        return ensureDeferred(self.refused(f"{header}.{payload}.{sig}", "token_invalid"))

    def test_jku_header(self) -> Any:
        return ensureDeferred(self.refused(self.forge({"jku": "https://evil.example/jwks"}), "token_invalid"))

    def test_x5u_header(self) -> Any:
        return ensureDeferred(self.refused(self.forge({"x5u": "https://evil.example/cert"}), "token_invalid"))

    def test_jwk_header(self) -> Any:
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(b"\0" * 32)}
        return ensureDeferred(self.refused(self.forge({"jwk": jwk}), "token_invalid"))

    def test_unknown_kid(self) -> Any:
        _, key = self.key()
        token = jwt.encode(self.claims(), key, algorithm="EdDSA", headers={"kid": "nope"})
        return ensureDeferred(self.refused(token, "token_invalid"))

    def test_token_over_8_kib(self) -> Any:
        return ensureDeferred(self.refused(self.forge(pad="x" * 9000), "token_invalid"))

    def test_expired(self) -> Any:
        now = self.now()
        return ensureDeferred(self.refused(self.forge(iat=now - 1000, nbf=now - 1000, exp=now - 100),
                                           "token_expired"))

    def test_not_yet_valid(self) -> Any:
        now = self.now()
        return ensureDeferred(self.refused(self.forge(nbf=now + 300, iat=now), "token_invalid"))

    def test_wrong_issuer(self) -> Any:
        return ensureDeferred(self.refused(self.forge(iss="someone-else"), "token_invalid"))

    def test_wrong_audience(self) -> Any:
        return ensureDeferred(self.refused(self.forge(aud="other-app"), "token_invalid"))

    def test_tampered_header(self) -> Any:
        token = self.forge()
        header, payload, sig = token.split(".")
        new_header = b64(json.dumps({**json.loads(base64.urlsafe_b64decode(header + "==")),
                                     "typ": "JOSE"}).encode())
        return ensureDeferred(self.refused(f"{new_header}.{payload}.{sig}", "token_invalid"))

    def test_tampered_payload(self) -> Any:
        token = self.forge(roles=["user"], caps=["users:self"])
        header, _, sig = token.split(".")
        payload = b64(json.dumps(self.claims()).encode())  # escalate to admin
        return ensureDeferred(self.refused(f"{header}.{payload}.{sig}", "token_invalid"))

    def test_tampered_signature(self) -> Any:
        header, payload, sig = self.forge().split(".")
        flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
        return ensureDeferred(self.refused(f"{header}.{payload}.{flipped}", "token_invalid"))

    def test_refresh_token_as_access_token(self) -> Any:
        return ensureDeferred(self.refused(self.tokens["refresh_token"], "token_invalid"))

    async def test_access_token_as_refresh_token(self) -> None:
        status, body, _ = await self.call("POST", "/api/v1/users/refresh",
                                          body={"refresh_token": self.tokens["access_token"]})
        self.assertEqual((status, body["code"]), (401, "token_invalid"))

    async def test_revoked_jti_after_logout(self) -> None:
        tokens = await login(self.anon, self.base, "admin", self.admin_password)
        status, _, _ = await self.call("GET", "/api/v1/users/me", tokens["access_token"])
        self.assertEqual(status, 200)  # and now it is in the verified-token cache
        status, _, _ = await self.call("POST", "/api/v1/users/logout", tokens["access_token"],
                                       body={"refresh_token": tokens["refresh_token"]})
        self.assertEqual(status, 204)
        await self.refused(tokens["access_token"], "token_revoked")
        status, body, _ = await self.call("POST", "/api/v1/users/refresh",
                                          body={"refresh_token": tokens["refresh_token"]})
        self.assertEqual((status, body["code"]), (401, "token_revoked"))


class TokenLifecycleTests(GatewayCase):
    async def test_issued_tokens_verify_with_pyjwt_against_jwks(self) -> None:
        status, jwks, _ = await self.call("GET", "/.well-known/jwks.json")
        self.assertEqual(status, 200)
        token = self.tokens["access_token"]
        kid = jwt.get_unverified_header(token)["kid"]
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
        key = jwt.PyJWK(jwk)
        claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="aico",
                            issuer="aico-gateway")
        self.assertEqual((claims["sub"], claims["typ"], claims["roles"]), ("admin", "access", ["admin"]))
        for name in ("sub", "iss", "aud", "iat", "nbf", "exp", "jti", "roles", "caps", "typ"):
            self.assertIn(name, claims)

    async def test_refresh_rotates_and_reuse_revokes_the_family(self) -> None:
        first = await login(self.anon, self.base, "admin", self.admin_password)
        status, second, _ = await self.call("POST", "/api/v1/users/refresh",
                                            body={"refresh_token": first["refresh_token"]})
        self.assertEqual(status, 200)
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])
        status, _, _ = await self.call("GET", "/api/v1/users/me", second["access_token"])
        self.assertEqual(status, 200)
        # The old refresh token again: the whole family goes.
        status, body, _ = await self.call("POST", "/api/v1/users/refresh",
                                          body={"refresh_token": first["refresh_token"]})
        self.assertEqual((status, body["code"]), (401, "token_revoked"))
        status, body, _ = await self.call("GET", "/api/v1/users/me", second["access_token"])
        self.assertEqual((status, body["code"]), (401, "token_revoked"))
        status, body, _ = await self.call("POST", "/api/v1/users/refresh",
                                          body={"refresh_token": second["refresh_token"]})
        self.assertEqual(status, 401)


class RoleTests(GatewayCase):
    async def test_user_token_refused_on_admin_routes_accepted_on_its_own(self) -> None:
        password = await self.make_user("carol", ["user"])
        tokens = await login(self.anon, self.base, "carol", password)
        t = tokens["access_token"]
        status, body, _ = await self.call("GET", "/api/v1/users/me", t)
        self.assertEqual((status, body["username"], body["roles"]), (200, "carol", ["user"]))
        self.assertNotIn("admin:users", body["capabilities"])
        for method, path, payload in [("GET", "/api/v1/users", None),
                                      ("POST", "/api/v1/users", {"username": "x", "password": "0123456789", "roles": []}),
                                      ("PATCH", "/api/v1/users/admin", {"disabled": True}),
                                      ("DELETE", "/api/v1/users/admin", None)]:
            status, body, _ = await self.call(method, path, t, payload)
            self.assertEqual((status, body["code"]), (403, "forbidden"), (method, path))
        status, body, _ = await self.call("POST", "/api/v1/conversations/messages", t, {"message": "hi"})
        self.assertEqual((status, body["reply"]), (200, "hi"))

    async def test_admin_manages_users(self) -> None:
        admin = self.tokens["access_token"]
        await self.make_user("dave", ["user"])
        status, body, _ = await self.call("POST", "/api/v1/users", admin,
                                          {"username": "dave", "password": "0123456789ab", "roles": ["user"]})
        self.assertEqual((status, body["code"]), (409, "conflict"))
        status, body, _ = await self.call("POST", "/api/v1/users", admin,
                                          {"username": "eve", "password": "short", "roles": ["user"]})
        self.assertEqual((status, body["errors"][0]["pointer"]), (400, "/password"))
        for dots in (".", ".."):
            status, body, _ = await self.call("POST", "/api/v1/users", admin,
                                              {"username": dots, "password": "0123456789ab", "roles": []})
            self.assertEqual((status, body["errors"][0]["pointer"]), (400, "/username"))
        status, body, _ = await self.call("GET", "/api/v1/users", admin)
        self.assertEqual(sorted(u["username"] for u in body["users"]), ["admin", "dave"])
        self.assertNotIn("password_hash", json.dumps(body))
        status, body, _ = await self.call("PATCH", "/api/v1/users/dave", admin, {"roles": ["user", "device"]})
        self.assertEqual((status, body["roles"]), (200, ["user", "device"]))
        status, body, headers = await self.call("DELETE", "/api/v1/users/dave", admin)
        self.assertEqual((status, body), (204, None))
        self.assertIsNone(headers.getRawHeaders("content-type"))
        status, body, _ = await self.call("DELETE", "/api/v1/users/dave", admin)
        self.assertEqual((status, body["code"]), (404, "not_found"))
        status, body, _ = await self.call("DELETE", "/api/v1/users/admin", admin)
        self.assertEqual((status, body["code"]), (409, "conflict"))  # the last admin stays


class SessionEndTests(GatewayCase):
    async def test_password_change_disable_or_delete_ends_the_users_sessions_at_once(self) -> None:
        admin = self.tokens["access_token"]
        for change in ({"password": "another-long-password"}, {"disabled": True}, {"roles": ["device"]}, None):
            password = await self.make_user("gina", ["user"])
            tokens = await login(self.anon, self.base, "gina", password)
            status, _, _ = await self.call("GET", "/api/v1/users/me", tokens["access_token"])
            self.assertEqual(status, 200)  # verified, and now in the token cache
            if change is None:
                status, _, _ = await self.call("DELETE", "/api/v1/users/gina", admin)
            else:
                status, _, _ = await self.call("PATCH", "/api/v1/users/gina", admin, change)
            self.assertIn(status, (200, 204))
            status, body, _ = await self.call("GET", "/api/v1/users/me", tokens["access_token"])
            self.assertEqual((status, body["code"]), (401, "token_revoked"), change)
            status, body, _ = await self.call("POST", "/api/v1/users/refresh",
                                              body={"refresh_token": tokens["refresh_token"]})
            self.assertEqual(status, 401, change)
            if change is not None:
                await self.call("DELETE", "/api/v1/users/gina", admin)
        # the admin's own session is untouched
        status, _, _ = await self.call("GET", "/api/v1/users/me", admin)
        self.assertEqual(status, 200)


class ContextTests(TestCase):
    """Admin capabilities are narrowed by context (unit level: a non-loopback peer)."""

    def test_admin_capability_refused_off_loopback_unless_device_trusted(self) -> None:
        class Tokens:
            pass

        chain = SecurityChain(Tokens(), GcraLimiter(reactor, {}, 1, 1, 1), lambda: configuration.Config())  # type: ignore[arg-type]
        from aico.gateway.routing.messages import Principal

        entry = RouteEntry("GET", "/admin-thing", lambda r: None, capability="admin:users")  # type: ignore[arg-type,return-value]
        admin = Principal("admin", ("admin",), frozenset({"*"}))
        for loopback, trusted, allowed in [(True, False, True), (False, False, False), (False, True, True)]:
            req = Request("GET", "/admin-thing", "r", "tls", loopback=loopback, route=entry,
                          principal=admin, device_admin=trusted)
            if allowed:
                chain.authorize(req)
            else:
                self.assertRaises(Exception, chain.authorize, req)


class LockoutTests(GatewayCase):
    extra = "[auth]\nlockout_threshold = 3\nlockout_base = 1.0\n"

    async def test_failed_logins_lock_the_account_for_a_growing_time_without_revealing_users(self) -> None:
        password = await self.make_user("frank", ["user"])

        async def attempt(user: str, pw: str) -> tuple[int, Any]:
            status, body, _ = await self.call("POST", "/api/v1/users/authenticate",
                                              body={"username": user, "password": pw})
            return status, body

        for _ in range(3):
            status, body = await attempt("frank", "wrong-password")
            self.assertEqual((status, body["code"]), (401, "invalid_credentials"))
        # Locked: even the right password gets the very same answer.
        status, locked = await attempt("frank", password)
        status2, unknown = await attempt("nobody-here", "whatever")
        self.assertEqual((status, status2), (401, 401))
        for key in ("type", "title", "detail", "code"):
            self.assertEqual(locked[key], unknown[key])
        self.gw.advance(0.9)
        status, _ = await attempt("frank", password)
        self.assertEqual(status, 401)  # lockout_base is 1 s: still locked
        self.gw.advance(0.2)
        status, _ = await attempt("frank", password)
        self.assertEqual(status, 200)


class LimitTests(GatewayCase):
    async def test_refusals_are_clear_4xx(self) -> None:
        admin = self.tokens["access_token"]
        deep: Any = "x"
        for _ in range(40):
            deep = {"message": deep}
        cases = [
            (deep, 400, "validation_failed"),
            ({"message": "x" * 70000}, 400, "validation_failed"),
            ({"message": "bell\u0007"}, 400, "validation_failed"),
        ]
        for body, status, code in cases:
            got, problem, _ = await self.call("POST", "/api/v1/conversations/messages", admin, body)
            self.assertEqual((got, problem["code"]), (status, code))

    async def test_hostile_json_is_refused_with_4xx_never_500(self) -> None:
        admin = self.tokens["access_token"]
        cases = [
            (b"[" * 100_000 + b"]" * 100_000, 400, "validation_failed"),  # RecursionError inside json
            (b'{"message": "a\\ud800b"}', 400, "validation_failed"),  # a lone surrogate
            (b'{"message": "x", "message": "y"}', 400, "malformed_json"),  # duplicate member
            (b'{"message": NaN}', 400, "malformed_json"),
            (b'{"message": 1e999}', 400, "malformed_json"),
            (b'{"message": ' + b"1" * 5000 + b"}", 400, "malformed_json"),  # int digits limit
        ]
        for raw, status, code in cases:
            r = await self.anon.post(self.base + "/api/v1/conversations/messages", data=raw,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {admin}"})
            problem = json.loads(await r.content())
            self.assertEqual((r.code, problem["code"]), (status, code), raw[:40])
            self.assertNotIn("sys.", problem["detail"])

    async def test_utf16_utf32_and_bom_bodies_are_malformed_json(self) -> None:
        # The docs say bodies are UTF-8 JSON; json.loads(bytes) would guess other encodings.
        admin = self.tokens["access_token"]
        text = '{"message": "hi"}'
        bodies = [text.encode(encoding) for encoding in
                  ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")]
        bodies.append(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 byte order mark
        for raw in bodies:
            r = await self.anon.post(self.base + "/api/v1/conversations/messages", data=raw,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {admin}"})
            problem = json.loads(await r.content())
            self.assertEqual((r.code, problem.get("code")), (400, "malformed_json"), raw[:8])
        r = await self.anon.post(self.base + "/api/v1/conversations/messages",
                                 data=text.encode(), headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {admin}"})
        self.assertEqual(r.code, 200)

    async def test_strings_are_nfc_normalised(self) -> None:
        status, body, _ = await self.call("POST", "/api/v1/conversations/messages",
                                          self.tokens["access_token"], {"message": "cafe\u0301"})
        self.assertEqual((status, body["reply"]), (200, "caf\u00e9"))

    async def test_too_many_or_too_large_header_fields_are_400_problems(self) -> None:
        for headers in ["".join(f"X-H{i}: v\r\n" for i in range(150)), f"X-Big: {'v' * 17000}\r\n"]:
            data, closed = self.gw.raw_http(
                f"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n".encode())
            self.assertTrue(closed)
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400"), head)
            self.assertIn(b"application/problem+json", head)
            self.assertEqual(json.loads(body)["code"], "bad_request")
            self.assertIn(b"X-Request-ID: " + json.loads(body)["request_id"].encode(), head)
        # A declared body over the limit is refused at once, before any of it is sent.
        data, closed = self.gw.raw_http(b"POST /api/v1/conversations/messages HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n")
        self.assertTrue(closed)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)
        self.assertEqual(json.loads(body)["code"], "payload_too_large")


class LoginRaceTests(GatewayCase):
    extra = "[auth]\nlockout_threshold = 3\nlockout_base = 60.0\n"

    async def test_concurrent_wrong_passwords_cannot_clear_the_lock(self) -> None:
        from twisted.internet.defer import gatherResults

        password = await self.make_user("ivy", ["user"])
        passwords = self.gw.parts.passwords
        real_verify = passwords.verify
        # Every guess is held in its password check until all twelve are in flight (they
        # all read the account before any failure is counted), then all go on at once.
        gate: Deferred[None] = Deferred()
        entered: list[None] = []

        def held_verify(encoded: Any, pw: str) -> Any:
            d = real_verify(encoded, pw)
            entered.append(None)
            return gate.addCallback(lambda _: d)

        self.patch(passwords, "verify", held_verify)
        guesses = gatherResults([self.call_later("POST", "/api/v1/users/authenticate",
                                                 body={"username": "ivy", "password": "wrong-guess"})
                                 for _ in range(12)])
        self.gw.settle()
        self.assertEqual(len(entered), 12)
        self.assertNoResult(guesses)
        self.patch(passwords, "verify", real_verify)
        gate.callback(None)
        self.gw.settle()
        statuses = [status for status, _, _ in self.successResultOf(guesses)]
        self.assertEqual(set(statuses), {401})
        status, _, _ = await self.call("POST", "/api/v1/users/authenticate",
                                       body={"username": "ivy", "password": password})
        self.assertEqual(status, 401)  # still locked

    async def test_password_changed_during_a_login_refuses_that_login(self) -> None:
        password = await self.make_user("jack", ["user"])
        passwords = self.gw.parts.passwords
        real_verify = passwords.verify
        # The login's password check is held on an explicit gate, released only once
        # the password change has been answered: no race against the wall clock.
        gate: Deferred[None] = Deferred()
        entered: Deferred[None] = Deferred()

        def held_verify(encoded: Any, pw: str) -> Any:
            d = real_verify(encoded, pw)
            entered.callback(None)
            return gate.addCallback(lambda _: d)

        self.patch(passwords, "verify", held_verify)
        login_d = self.call_later("POST", "/api/v1/users/authenticate",
                                  body={"username": "jack", "password": password})
        self.gw.settle()
        await entered
        self.patch(passwords, "verify", real_verify)
        status, _, _ = await self.call("PATCH", "/api/v1/users/jack", self.tokens["access_token"],
                                       {"password": "a-brand-new-password"})
        self.assertEqual(status, 200)
        gate.callback(None)
        self.gw.settle()
        status, body, _ = self.successResultOf(login_d)
        self.assertEqual((status, body["code"]), (401, "invalid_credentials"))


class RateLimitTests(GatewayCase):
    extra = """
[ratelimit]
block_after = 3
block_base = 30
[ratelimit.tiers.auth]
requests = 2
per_seconds = 60
burst = 2
[ratelimit.tiers.standard]
requests = 3
per_seconds = 60
burst = 3
"""

    async def test_limit_headers_429_then_temporarily_blocked_and_audited(self) -> None:
        status, _, headers = await self.call("POST", "/api/v1/users/authenticate",
                                             body={"username": "admin", "password": "nope"})
        self.assertEqual(status, 401)
        self.assertEqual(headers.getRawHeaders("ratelimit-policy"), ['"auth";q=2;w=60'])
        self.assertTrue(headers.getRawHeaders("ratelimit")[0].startswith('"auth";r=0'))
        status, body, headers = await self.call("POST", "/api/v1/users/authenticate",
                                                body={"username": "admin", "password": "nope"})
        self.assertEqual((status, body["code"]), (429, "rate_limited"))
        retry = int(headers.getRawHeaders("retry-after")[0])
        self.assertTrue(1 <= retry <= 30, retry)
        codes = []
        for _ in range(4):
            status, body, _ = await self.call("POST", "/api/v1/users/authenticate",
                                              body={"username": "admin", "password": "nope"})
            codes.append(body["code"])
        self.assertEqual(codes[-1], "temporarily_blocked")
        rows = await self.gw.parts.audit.list(limit=100)
        self.assertIn("client_blocked", [e.event for e in rows])

    async def test_refused_requests_count_against_the_limit(self) -> None:
        codes = []
        for _ in range(4):
            status, body, headers = await self.call("GET", "/api/v1/users/me", "not-a-token")
            codes.append((status, body["code"]))
            self.assertTrue(headers.getRawHeaders("ratelimit-policy"))
        self.assertEqual(codes, [(401, "token_invalid")] * 3 + [(429, "rate_limited")])

    async def test_one_client_never_affects_another(self) -> None:
        admin = self.tokens["access_token"]
        for _ in range(3):
            status, _, _ = await self.call("GET", "/api/v1/users/me", admin)
            self.assertEqual(status, 200)
        status, body, _ = await self.call("GET", "/api/v1/users/me", admin)
        self.assertEqual((status, body["code"]), (429, "rate_limited"))
        # Another user from the same address has a budget of their own.
        token = self.gw.parts.tokens.issue_pair("other", ["user"], ["users:self"]).access_token
        status, _, _ = await self.call("GET", "/api/v1/users/me", token)
        self.assertEqual(status, 200)


class NoSecretsInLogsTests(GatewayCase):
    async def test_login_refresh_logout_session_logs_no_password_token_or_key(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        password = self.admin_password
        tokens = await login(self.anon, self.base, "admin", password)
        _, second, _ = await self.call("POST", "/api/v1/users/refresh",
                                       body={"refresh_token": tokens["refresh_token"]})
        await self.call("POST", "/api/v1/users/authenticate", body={"username": "admin", "password": "wrong-guess-123"})
        # Reusing the first refresh token revokes the family (and logs a warning).
        await self.call("POST", "/api/v1/users/refresh", body={"refresh_token": tokens["refresh_token"]})
        tokens2 = await login(self.anon, self.base, "admin", password)
        _, second, _ = await self.call("POST", "/api/v1/users/refresh",
                                       body={"refresh_token": tokens2["refresh_token"]})
        await self.call("GET", "/api/v1/users/me", "garbage." + tokens["access_token"])
        await self.call("POST", "/api/v1/users/logout", second["access_token"],
                        body={"refresh_token": second["refresh_token"]})
        await self.call("GET", "/api/v1/users/me", second["access_token"])
        secrets = [password, "wrong-guess-123", tokens["access_token"], tokens["refresh_token"],
                   tokens2["access_token"], tokens2["refresh_token"],
                   second["access_token"], second["refresh_token"]]
        pem = self.gw.parts.tokens.keyring.signing_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        secrets.append(pem.splitlines()[1])
        for part in tokens["access_token"].split("."):
            secrets.append(part)
        text = "\n".join(formatEvent(e) + " " + repr(e) for e in events)
        logged = "\n".join(formatEvent(e) for e in events)
        self.assertIn("login for admin", logged)
        self.assertIn("logout for admin", logged)
        self.assertIn("refresh token reuse", logged)
        for secret in secrets:
            self.assertNotIn(secret, text)


class SlowlorisTests(GatewayCase):
    extra = "[limits]\nhead_timeout = 0.5\n"

    async def test_a_request_head_sent_too_slowly_is_dropped_but_websockets_live_on(self) -> None:
        # One header line every 0.2 s of gateway time: never a complete head.
        start = self.gw.clock.seconds()
        data, closed = self.gw.raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n",
                                        *[b"X-Slow: 1\r\n"] * 10, gap=0.2)
        elapsed = self.gw.clock.seconds() - start
        self.assertEqual(data, b"", "the server answered a head that never completed")
        self.assertTrue(closed)
        self.assertGreaterEqual(elapsed, 0.5)  # not before head_timeout …
        self.assertLess(elapsed, 1.0)  # … and not long after it (the trickle lasts 1.8 s)

        ws = self.gw.websocket("/ws", headers={"Authorization": f"Bearer {self.tokens['access_token']}"})
        ws.recv()
        ws.recv()
        self.gw.advance(1.2)  # longer than head_timeout
        self.assertFalse(ws.closed)
        ws.send({"type": "heartbeat", "id": "alive"})
        self.assertEqual(ws.recv()["type"], "heartbeat_ack")
