"""Tokens: hostile inputs, key rotation, JWKS, refresh rotation, revocation, the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aico.gateway.config import AuthSection
from aico.gateway.security.keys import KeyRing, KeyRingError, thumbprint
from aico.gateway.security.tokens import (
    MAX_TOKEN_BYTES,
    IRevocationStore,
    MemoryRevocationStore,
    SessionEnded,
    SqliteRevocationStore,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenPair,
    TokenRevoked,
    TokenService,
)
from aico.gateway.store import SyncDatabase
from aico.keystore import Keystore

T = TypeVar("T")
START = 1_700_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def seg(obj: Any) -> str:
    return b64(json.dumps(obj).encode("utf-8"))


def sign_ed(header: dict[str, Any], payload: dict[str, Any], key: Ed25519PrivateKey) -> str:
    signing_input = f"{seg(header)}.{seg(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode('ascii')))}"


def sign_hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{seg(header)}.{seg(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def decode_unverified(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return result


class TokenTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.jwt_dir = Path(self.mktemp())
        self.keystore = Keystore.ephemeral()
        self.keyring = KeyRing.generate(self.jwt_dir, self.keystore)
        self.clock = Clock()
        self.clock.advance(START)
        self.auth = AuthSection(issuer="aico-gateway", audience="aico", leeway=5)
        self.store = MemoryRevocationStore()
        self.service = TokenService(self.keyring, self.auth, self.clock, self.store)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(self.clock.seconds())
        c: dict[str, Any] = {
            "sub": "alice",
            "iss": "aico-gateway",
            "aud": "aico",
            "iat": now,
            "nbf": now,
            "exp": now + 900,
            "jti": "j-" + str(now),
            "roles": ["user"],
            "caps": ["conversations:write"],
            "typ": "access",
            "fam": "family-1",
        }
        c.update(overrides)
        return c

    def header(self, **overrides: Any) -> dict[str, Any]:
        h: dict[str, Any] = {"alg": "EdDSA", "typ": "JWT", "kid": self.keyring.current_kid}
        h.update(overrides)
        return h

    def good(self, header: dict[str, Any] | None = None, **claims: Any) -> str:
        return sign_ed(header or self.header(), self.claims(**claims), self.keyring.signing_key)

    def assertRefused(
        self, token: str | bytes, exc: type[TokenError] = TokenInvalid, refresh: bool = False
    ) -> TokenError:
        verify = self.service.verify_refresh if refresh else self.service.verify_access
        e = self.assertRaises(exc, verify, token)
        self.assertEqual(e.code, exc.code)
        return e


class HostileTokenTests(TokenTestBase):
    def test_hand_crafted_good_token_is_accepted(self) -> None:
        # The baseline every hostile variant below differs from in exactly one way.
        claims = self.service.verify_access(self.good())
        self.assertEqual(claims.sub, "alice")
        self.assertEqual(claims.roles, ("user",))

    def test_issued_tokens_have_the_spec_header_and_claims(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], ["conversations:write"])
        header = jwt.get_unverified_header(pair.access_token)
        self.assertEqual(header, {"alg": "EdDSA", "typ": "JWT", "kid": self.keyring.current_kid})
        access = decode_unverified(pair.access_token)
        refresh = decode_unverified(pair.refresh_token)
        for key in ("sub", "iss", "aud", "iat", "nbf", "exp", "jti", "roles", "caps", "typ"):
            self.assertIn(key, access)
        self.assertEqual(access["typ"], "access")
        self.assertEqual(refresh["typ"], "refresh")
        self.assertEqual(refresh["fam"], access["fam"])
        self.assertEqual(access["exp"] - access["iat"], self.auth.access_ttl)
        self.assertEqual(refresh["exp"] - refresh["iat"], self.auth.refresh_ttl)
        self.assertEqual(pair.expires_in, self.auth.access_ttl)
        self.assertEqual(self.service.verify_access(pair.access_token).sub, "alice")

    def test_alg_none_is_refused(self) -> None:
        token = f"{seg(self.header(alg='none'))}.{seg(self.claims())}."
        self.assertRefused(token)

    def test_alg_none_with_a_valid_signature_is_refused(self) -> None:
        self.assertRefused(self.good(self.header(alg="none")))

    def test_other_algorithms_are_refused(self) -> None:
        for alg in ("HS256", "RS256", "ES256", "PS256", "Ed25519", "eddsa", "EdDSA ", ""):
            self.assertRefused(self.good(self.header(alg=alg)))

    def test_hs256_signed_with_the_public_key_is_refused(self) -> None:
        public = self.keyring.signing_key.public_key()
        secrets = [
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        ]
        for secret in secrets:
            token = sign_hs256(self.header(alg="HS256"), self.claims(), secret)
            self.assertRefused(token)

    def _refused_header_member(self, name: str, value: Any) -> None:
        e = self.assertRefused(self.good(self.header(**{name: value})))
        self.assertIn(name, e.reason)

    def test_jku_header_is_refused(self) -> None:
        self._refused_header_member("jku", "https://attacker.example/jwks.json")

    def test_x5u_header_is_refused(self) -> None:
        self._refused_header_member("x5u", "https://attacker.example/cert.pem")

    def test_jwk_header_is_refused(self) -> None:
        jwk = self.keyring.jwks()["keys"][0]
        self._refused_header_member("jwk", jwk)

    def test_x5c_header_is_refused(self) -> None:
        self._refused_header_member("x5c", ["MIIB..."])

    def test_crit_header_is_refused(self) -> None:
        self._refused_header_member("crit", ["exp"])

    def test_unknown_kid_is_refused(self) -> None:
        other = Ed25519PrivateKey.generate()
        token = sign_ed(self.header(kid=thumbprint(other.public_key())), self.claims(), other)
        e = self.assertRefused(token)
        self.assertEqual(e.reason, "unknown kid")

    def test_unknown_kid_with_the_real_key_is_refused(self) -> None:
        self.assertRefused(self.good(self.header(kid="no-such-kid")))

    def test_missing_kid_is_refused(self) -> None:
        header = self.header()
        del header["kid"]
        e = self.assertRefused(self.good(header))
        self.assertEqual(e.reason, "no kid")

    def test_non_string_kid_is_refused(self) -> None:
        self.assertRefused(self.good(self.header(kid=["x"])))

    def test_token_over_8_kib_is_refused_before_parsing(self) -> None:
        # Correctly signed, otherwise valid: only the size stops it.
        token = self.good(padding="x" * MAX_TOKEN_BYTES)
        self.assertGreater(len(token), MAX_TOKEN_BYTES)
        self.patch(
            self.service, "_verify_uncached", lambda *a: self.fail("parsed an oversized token")
        )
        e = self.assertRefused(token)
        self.assertEqual(e.reason, "token too large")
        self.assertRefused(b"\xff" * (MAX_TOKEN_BYTES + 1))

    def test_expired_token_is_refused_with_token_expired(self) -> None:
        token = self.good()
        self.clock.advance(900 + self.auth.leeway)
        self.assertRefused(token, TokenExpired)

    def test_expiry_tolerates_the_configured_leeway(self) -> None:
        token = self.good()
        self.clock.advance(900 + self.auth.leeway - 1)
        self.assertEqual(self.service.verify_access(token).sub, "alice")

    def test_not_yet_valid_token_is_refused(self) -> None:
        now = int(self.clock.seconds())
        e = self.assertRefused(self.good(nbf=now + 60))
        self.assertEqual(e.reason, "not yet valid")

    def test_token_issued_in_the_future_is_refused(self) -> None:
        now = int(self.clock.seconds())
        self.assertRefused(self.good(iat=now + 60))

    def test_wrong_issuer_is_refused(self) -> None:
        self.assertRefused(self.good(iss="someone-else"))

    def test_wrong_audience_is_refused(self) -> None:
        self.assertRefused(self.good(aud="other-service"))
        self.assertRefused(self.good(aud=["aico", "other"]))

    def test_tampered_header_is_refused(self) -> None:
        token = self.good()
        _, payload, sig = token.split(".")
        header = seg({"typ": "JWT", "alg": "EdDSA", "kid": self.keyring.current_kid})
        self.assertRefused(f"{header}.{payload}.{sig}")

    def test_tampered_payload_is_refused(self) -> None:
        token = self.good()
        header, _, sig = token.split(".")
        payload = seg(self.claims(roles=["admin"]))
        e = self.assertRefused(f"{header}.{payload}.{sig}")
        self.assertEqual(e.reason, "bad signature")

    def test_tampered_signature_is_refused(self) -> None:
        token = self.good()
        header, payload, sig = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
        raw[10] ^= 0x01
        self.assertRefused(f"{header}.{payload}.{b64(bytes(raw))}")

    def test_non_canonical_base64_signature_is_refused(self) -> None:
        # 64 bytes encode to 86 characters; the last one carries 4 unused bits, so a
        # different final character can decode to the very same signature bytes.
        token = self.good()
        header, payload, sig = token.split(".")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(sig[-1])
        twin = sig[:-1] + alphabet[last ^ 0x1]
        self.assertEqual(
            base64.urlsafe_b64decode(twin + "=="), base64.urlsafe_b64decode(sig + "==")
        )
        self.assertRefused(f"{header}.{payload}.{twin}")

    def test_refresh_token_used_as_access_is_refused(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [])
        e = self.assertRefused(pair.refresh_token)
        self.assertIn("refresh", e.reason)

    def test_access_token_used_as_refresh_is_refused(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [])
        self.assertRefused(pair.access_token, refresh=True)
        self.failureResultOf(self.service.refresh(pair.access_token), TokenInvalid)

    def test_revoked_jti_is_refused(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [])
        claims = self.service.verify_access(pair.access_token)
        self.successResultOf(self.service.revoke(claims.jti, claims.exp))
        self.assertRefused(pair.access_token, TokenRevoked)

    def test_malformed_tokens_are_token_invalid(self) -> None:
        good = self.good()
        h, p, s = good.split(".")
        not_utf8 = b64(b"\xff\xfe")
        cases: list[str | bytes] = [
            "",
            ".",
            "..",
            "abc",
            "a.b",
            "a.b.c.d",
            f"{h}.{p}",
            f"{h}.{p}.{s}.",
            "!!!.###.$$$",
            f"{h}=.{p}.{s}",
            f"{h}.{p}.{s}==",
            f"{b64(b'not json')}.{p}.{s}",
            f"{b64(b'[1,2]')}.{p}.{s}",
            f"{not_utf8}.{p}.{s}",
            f"{h}.{b64(b'{')}.{s}",
            f"{h} .{p}.{s}",
            "é" + good,
            b"\x00\xff.\x80.\x81",
            good.encode("ascii") + b"\xff",
            sign_ed(self.header(), {"sub": "x"}, self.keyring.signing_key),  # no claims
            self.good(exp="tomorrow"),
            self.good(exp=True),
            self.good(roles="admin"),
            self.good(sub=123),
            self.good(jti=""),
            self.good(typ="id"),
        ]
        for token in cases:
            self.assertRefused(token)

    def test_duplicate_json_members_are_refused(self) -> None:
        header = b64(
            b'{"alg":"EdDSA","typ":"JWT","kid":"%s","alg":"none"}'
            % self.keyring.current_kid.encode()
        )
        payload = seg(self.claims())
        sig = b64(self.keyring.signing_key.sign(f"{header}.{payload}".encode()))
        self.assertRefused(f"{header}.{payload}.{sig}")

    def test_non_finite_numbers_are_refused(self) -> None:
        header = seg(self.header())
        body = json.dumps(self.claims()).replace(str(self.claims()["exp"]), "Infinity")
        payload = b64(body.encode())
        sig = b64(self.keyring.signing_key.sign(f"{header}.{payload}".encode()))
        self.assertRefused(f"{header}.{payload}.{sig}")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "insert", "delete"]),
                st.integers(min_value=0, max_value=10_000),
                st.sampled_from(
                    [
                        *"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.= ",
                        "\x00",
                        "é",
                        "+",
                        "/",
                    ]
                ),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def test_no_mutated_token_is_ever_accepted(self, ops: list[tuple[str, int, str]]) -> None:
        token = self._fuzz_token()
        chars = list(token)
        for op, index, char in ops:
            i = index % (len(chars) + 1)
            if op == "insert" or not chars:
                chars.insert(i, char)
            elif op == "delete":
                del chars[min(i, len(chars) - 1)]
            else:
                chars[min(i, len(chars) - 1)] = char
        mutated = "".join(chars)
        assume(mutated != token)
        self.assertRaises(TokenError, self.service.verify_access, mutated)

    def _fuzz_token(self) -> str:
        token: str | None = getattr(self, "_fuzz", None)
        if token is None:
            token = self._fuzz = self.service.issue_pair("alice", ["user"], []).access_token
            self.service.verify_access(token)  # valid, and now in the cache
        return token


class CacheTests(TokenTestBase):
    def _count_signature_checks(self) -> list[int]:
        calls = [0]
        original = self.service._check_signature

        def counting(*args: Any) -> bool:
            calls[0] += 1
            return original(*args)

        self.patch(self.service, "_check_signature", counting)
        return calls

    def test_second_verify_does_not_check_the_signature_again(self) -> None:
        calls = self._count_signature_checks()
        token = self.service.issue_pair("alice", ["user"], []).access_token
        first = self.service.verify_access(token)
        second = self.service.verify_access(token)
        self.assertEqual(first, second)
        self.assertEqual(calls[0], 1)

    def test_cache_hit_still_checks_revocation(self) -> None:
        token = self.service.issue_pair("alice", ["user"], []).access_token
        claims = self.service.verify_access(token)
        self.service.revoke(claims.jti, claims.exp)
        self.assertRefused(token, TokenRevoked)

    def test_cache_hit_still_checks_expiry(self) -> None:
        token = self.service.issue_pair("alice", ["user"], []).access_token
        self.service.verify_access(token)
        self.clock.advance(self.auth.access_ttl + self.auth.leeway)
        self.assertRefused(token, TokenExpired)

    def test_cache_hit_still_checks_the_token_type(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [])
        self.service.verify_refresh(pair.refresh_token)
        self.assertRefused(pair.refresh_token)

    def test_cache_is_bounded(self) -> None:
        service = TokenService(self.keyring, self.auth, self.clock, self.store, cache_size=3)
        tokens = [service.issue_pair(f"u{i}", [], []).access_token for i in range(5)]
        for t in tokens:
            service.verify_access(t)
        self.assertEqual(len(service._cache), 3)
        self.assertNotIn(tokens[0], service._cache)


class KeyRotationTests(TokenTestBase):
    def test_keyring_files_follow_the_layout(self) -> None:
        kid = self.keyring.current_kid
        self.assertEqual((self.jwt_dir / "current").read_text().strip(), kid)
        pem = self.jwt_dir / f"{kid}.pem"
        self.assertEqual(pem.stat().st_mode & 0o777, 0o600)
        self.assertTrue(pem.read_bytes().startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"))
        key = serialization.load_pem_private_key(
            self.keystore.read_sealed(pem, f"jwt/{kid}.pem"), None)
        assert isinstance(key, Ed25519PrivateKey)
        self.assertEqual(thumbprint(key.public_key()), kid)
        self.assertEqual(KeyRing.load(self.jwt_dir, self.keystore).current_kid, kid)

    def test_thumbprint_matches_rfc_8037_example(self) -> None:
        # RFC 8037 Appendix A.3: the thumbprint of the example Ed25519 key.
        x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        public = Ed25519PrivateKey.from_private_bytes(
            base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
        ).public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(b64(raw), x)
        self.assertEqual(thumbprint(public), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k")

    def test_mismatched_kid_file_is_refused(self) -> None:
        other = Ed25519PrivateKey.generate()
        pem = other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (self.jwt_dir / f"{self.keyring.current_kid}.pem").write_bytes(pem)
        self.assertRaises(KeyRingError, KeyRing.load, self.jwt_dir, self.keystore)

    def test_rotation_keeps_old_tokens_valid_until_expiry_then_not(self) -> None:
        old = self.service.issue_pair("alice", ["user"], [])
        old_kid = self.keyring.current_kid
        keep_for = self.auth.access_ttl + self.auth.leeway + 60
        new_kid = self.keyring.rotate(self.jwt_dir, self.clock.seconds(), keep_for)
        self.assertNotEqual(new_kid, old_kid)
        new = self.service.issue_pair("alice", ["user"], [])
        self.assertEqual(jwt.get_unverified_header(new.access_token)["kid"], new_kid)
        # Both verify, also through a keyring reloaded from disk.
        self.assertEqual(self.service.verify_access(old.access_token).kid, old_kid)
        reloaded = KeyRing.load(self.jwt_dir, self.keystore, self.clock.seconds())
        fresh = TokenService(reloaded, self.auth, self.clock, self.store)
        self.assertEqual(fresh.verify_access(old.access_token).kid, old_kid)
        self.assertEqual({k["kid"] for k in fresh.jwks()["keys"]}, {old_kid, new_kid})
        # The old access token lives out its lifetime, then expires as usual...
        self.clock.advance(self.auth.access_ttl + self.auth.leeway - 1)
        self.assertEqual(self.service.verify_access(old.access_token).kid, old_kid)
        self.clock.advance(1)
        self.assertRefused(old.access_token, TokenExpired)
        self.assertEqual(self.service.verify_refresh(old.refresh_token).kid, old_kid)
        # ...and once keep_for has passed the old key is gone: even its long-lived
        # refresh token is refused as signed by an unknown key.
        self.clock.advance(60)
        e = self.assertRefused(old.refresh_token, refresh=True)
        self.assertEqual(e.reason, "unknown kid")
        self.assertEqual([k["kid"] for k in self.service.jwks()["keys"]], [new_kid])
        self.assertEqual(self.service.verify_refresh(new.refresh_token).kid, new_kid)

    def test_prune_deletes_the_retired_key_file(self) -> None:
        old_kid = self.keyring.current_kid
        self.keyring.rotate(self.jwt_dir, START, keep_for=60)
        self.assertTrue((self.jwt_dir / f"{old_kid}.pem").exists())
        self.assertEqual(self.keyring.prune(self.jwt_dir, START + 61), [old_kid])
        self.assertFalse((self.jwt_dir / f"{old_kid}.pem").exists())
        self.assertEqual(KeyRing.load(self.jwt_dir, self.keystore).kids(), [self.keyring.current_kid])

    def test_stray_pem_file_is_not_trusted(self) -> None:
        other = Ed25519PrivateKey.generate()
        kid = thumbprint(other.public_key())
        pem = other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (self.jwt_dir / f"{kid}.pem").write_bytes(pem)
        service = TokenService(KeyRing.load(self.jwt_dir, self.keystore), self.auth, self.clock, self.store)
        token = sign_ed(self.header(kid=kid), self.claims(), other)
        self.assertRaises(TokenInvalid, service.verify_access, token)


class JwksTests(SynchronousTestCase):
    def test_jwks_verifies_issued_tokens_with_plain_pyjwt(self) -> None:
        jwt_dir = Path(self.mktemp())
        keyring = KeyRing.generate(jwt_dir, Keystore.ephemeral())
        clock = Clock()
        clock.advance(time.time())  # PyJWT checks exp against the real clock
        auth = AuthSection()
        service = TokenService(keyring, auth, clock, MemoryRevocationStore())
        before = service.issue_pair("alice", ["user"], ["x:read"])
        keyring.rotate(jwt_dir, clock.seconds(), keep_for=3600)
        after = service.issue_pair("bob", ["admin"], [])
        jwks = service.jwks()
        self.assertEqual(len(jwks["keys"]), 2)
        for member in jwks["keys"]:
            self.assertEqual(member["kty"], "OKP")
            self.assertEqual(member["crv"], "Ed25519")
            self.assertEqual(member["alg"], "EdDSA")
            self.assertEqual(member["use"], "sig")
        keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
        for pair, sub in ((before, "alice"), (after, "bob")):
            kid = jwt.get_unverified_header(pair.access_token)["kid"]
            claims = jwt.decode(
                pair.access_token,
                keys[kid].key,
                algorithms=["EdDSA"],
                audience=auth.audience,
                issuer=auth.issuer,
            )
            self.assertEqual(claims["sub"], sub)
        self.assertEqual(jwt.PyJWKSet.from_dict(jwks).keys[0].key_id, keyring.current_kid)


class RefreshTests(TokenTestBase):
    def _refresh(self, token: str) -> TokenPair:
        return self.successResultOf(self.service.refresh(token))

    def test_refresh_issues_a_new_pair_in_the_same_family(self) -> None:
        first = self.service.issue_pair("alice", ["user"], ["c"], extra={"device_id": "d1"})
        self.clock.advance(10)
        second = self._refresh(first.refresh_token)
        old = self.service.verify_refresh(first.refresh_token)
        new = self.service.verify_refresh(second.refresh_token)
        self.assertEqual(new.fam, old.fam)
        self.assertNotEqual(new.jti, old.jti)
        access = self.service.verify_access(second.access_token)
        self.assertEqual((access.sub, access.roles, access.caps), ("alice", ("user",), ("c",)))
        self.assertEqual(access.extra, {"device_id": "d1"})
        third = self._refresh(second.refresh_token)
        self.assertEqual(self.service.verify_access(third.access_token).fam, old.fam)

    def test_refresh_can_replace_roles(self) -> None:
        first = self.service.issue_pair("alice", ["admin"], ["admin:config:write"])
        second = self.successResultOf(self.service.refresh(first.refresh_token, ["user"], []))
        claims = self.service.verify_access(second.access_token)
        self.assertEqual((claims.roles, claims.caps), (("user",), ()))

    def test_reuse_revokes_the_whole_family(self) -> None:
        first = self.service.issue_pair("alice", ["user"], [])
        other = self.service.issue_pair("alice", ["user"], [])  # another session
        second = self._refresh(first.refresh_token)
        # The attacker (or the victim) replays the first refresh token.
        self.failureResultOf(self.service.refresh(first.refresh_token), TokenRevoked)
        self.assertRefused(first.access_token, TokenRevoked)
        self.assertRefused(second.access_token, TokenRevoked)
        self.assertRefused(second.refresh_token, TokenRevoked, refresh=True)
        self.failureResultOf(self.service.refresh(second.refresh_token), TokenRevoked)
        # The other session is untouched.
        self.assertEqual(self.service.verify_access(other.access_token).sub, "alice")
        self._refresh(other.refresh_token)

    def test_unregistered_refresh_token_is_refused(self) -> None:
        token = self.good(typ="refresh", exp=int(self.clock.seconds()) + 3600)
        self.failureResultOf(self.service.refresh(token), TokenRevoked)

    def test_logout_revokes_the_session(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [])
        claims = self.service.verify_access(pair.access_token)
        self.successResultOf(self.service.logout(claims, pair.refresh_token))
        self.assertRefused(pair.access_token, TokenRevoked)
        self.failureResultOf(self.service.refresh(pair.refresh_token), TokenRevoked)

    def test_extra_may_not_override_reserved_claims(self) -> None:
        self.assertRaises(ValueError, self.service.issue_pair, "a", [], [], {"sub": "root"})
        self.assertRaises(ValueError, self.service.issue_pair, "a", [], [], {"typ": "access"})

    def test_extra_may_not_set_the_session_generation(self) -> None:
        self.assertRaises(ValueError, self.service.issue_pair, "a", [], [], {"gen": 99})

    def test_stores_provide_the_interface(self) -> None:
        verifyObject(IRevocationStore, MemoryRevocationStore())
        db = SyncDatabase(":memory:")
        self.addCleanup(db.close)
        verifyObject(IRevocationStore, SqliteRevocationStore(db, self.clock))

    def test_sqlite_store_relies_on_the_migrated_schema(self) -> None:
        # The tables come from aico.gateway.store.MIGRATIONS only; the store makes none.
        db = SyncDatabase(":memory:")
        self.addCleanup(db.close)
        db.conn.execute("DROP TABLE revoked_tokens")
        self.failureResultOf(SqliteRevocationStore(db, self.clock).load(), sqlite3.OperationalError)


class PersistenceTests(TokenTestBase):
    def _start(self, path: str) -> tuple[TokenService, SqliteRevocationStore, SyncDatabase]:
        db = SyncDatabase(path)
        self.addCleanup(db.close)
        store = SqliteRevocationStore(db, self.clock)
        self.successResultOf(store.load())
        keyring = KeyRing.load(self.jwt_dir, self.keystore, self.clock.seconds())
        return TokenService(keyring, self.auth, self.clock, store), store, db

    def test_revocations_survive_a_restart(self) -> None:
        path = self.mktemp()
        service, _, db = self._start(path)
        revoked = service.issue_pair("alice", ["user"], [])
        kept = service.issue_pair("bob", ["user"], [])
        claims = service.verify_access(revoked.access_token)
        self.successResultOf(service.revoke(claims.jti, claims.exp))
        db.close()

        service2, _, _ = self._start(path)
        self.assertRaises(TokenRevoked, service2.verify_access, revoked.access_token)
        self.assertEqual(service2.verify_access(kept.access_token).sub, "bob")

    def test_refresh_reuse_is_caught_after_a_restart(self) -> None:
        path = self.mktemp()
        service, _, db = self._start(path)
        first = service.issue_pair("alice", ["user"], [])
        second = self.successResultOf(service.refresh(first.refresh_token))
        db.close()

        service2, _, db2 = self._start(path)
        self.failureResultOf(service2.refresh(first.refresh_token), TokenRevoked)
        self.assertRaises(TokenRevoked, service2.verify_access, second.access_token)
        db2.close()

        # ...and the family revocation itself survives the next restart.
        service3, _, _ = self._start(path)
        self.assertRaises(TokenRevoked, service3.verify_access, second.access_token)
        self.assertRaises(TokenRevoked, service3.verify_refresh, second.refresh_token)

    def test_expired_rows_are_pruned(self) -> None:
        path = self.mktemp()
        service, store, db = self._start(path)
        pair = service.issue_pair("alice", ["user"], [])
        claims = service.verify_access(pair.access_token)
        self.successResultOf(service.revoke(claims.jti, claims.exp))
        self.assertEqual(db.conn.execute("SELECT count(*) FROM revoked_tokens").fetchone()[0], 1)
        self.clock.advance(self.auth.refresh_ttl + 2 * self.auth.leeway + 1)
        self.successResultOf(service.prune())
        self.assertEqual(db.conn.execute("SELECT count(*) FROM revoked_tokens").fetchone()[0], 0)
        self.assertEqual(db.conn.execute("SELECT count(*) FROM refresh_tokens").fetchone()[0], 0)
        self.assertFalse(store.revoked)
        self.assertFalse(store.refresh)


class ManualOperations(SyncDatabase):
    """run_operation waits until the test lets it run, like a busy thread pool."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.pending: list[tuple[str, Any, Deferred[None]]] = []
        self.manual = False

    def run_operation(self, sql: str, params: Any = ()) -> Deferred[None]:
        if not self.manual:
            return super().run_operation(sql, params)
        d: Deferred[None] = Deferred()
        self.pending.append((sql, params, d))
        return d

    def run_next(self, error: Exception | None = None) -> None:
        sql, params, d = self.pending.pop(0)
        if error is not None:
            d.errback(error)
        else:
            super().run_operation(sql, params).chainDeferred(d)


class SqliteStoreOrderingTests(SynchronousTestCase):
    def test_writes_run_one_at_a_time_in_order(self) -> None:
        db = ManualOperations()
        self.addCleanup(db.close)
        store = SqliteRevocationStore(db, Clock())
        self.successResultOf(store.load())
        db.manual = True
        registered = store.register_refresh("r1", "fam", "alice", 100.0)
        store.use_refresh("r1")
        revoked = store.revoke("a1", 50.0)
        flushed = store.flush()
        self.assertEqual(len(db.pending), 1)  # the UPDATE waits for the INSERT
        self.assertIn("INSERT OR REPLACE INTO refresh_tokens", db.pending[0][0])
        db.run_next()
        self.successResultOf(registered)
        self.assertIn("UPDATE refresh_tokens", db.pending[0][0])
        db.run_next(RuntimeError("disk full"))  # a failed write does not stall the rest
        self.assertNoResult(flushed)
        db.run_next()
        self.successResultOf(revoked)
        self.successResultOf(flushed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            db.conn.execute("SELECT jti, used FROM refresh_tokens").fetchall(), [("r1", 0)]
        )


class SessionGenerationTests(TokenTestBase):
    """Tokens carry the subject's session generation; older ones are refused."""

    def test_tokens_carry_the_generation_they_were_issued_under(self) -> None:
        pair = self.service.issue_pair("alice", ["user"], [], generation=3)
        self.assertEqual(decode_unverified(pair.access_token)["gen"], 3)
        self.assertEqual(decode_unverified(pair.refresh_token)["gen"], 3)
        self.assertEqual(self.service.verify_access(pair.access_token).gen, 3)

    def test_a_token_of_an_older_generation_is_refused_even_from_the_cache(self) -> None:
        pair = self.service.issue_pair("alice", ["admin"], ["*"], generation=0)
        self.service.verify_access(pair.access_token)  # now cached
        self.service.verify_refresh(pair.refresh_token)
        self.service.set_generation("alice", 1)
        e = self.assertRefused(pair.access_token, SessionEnded)
        self.assertEqual(e.code, "token_revoked")
        self.assertRefused(pair.refresh_token, SessionEnded, refresh=True)
        self.failureResultOf(self.service.refresh(pair.refresh_token), SessionEnded)
        # Other subjects, and tokens of the current generation, are untouched.
        self.assertEqual(self.service.verify_access(
            self.service.issue_pair("bob", [], []).access_token).sub, "bob")
        self.assertEqual(self.service.verify_access(
            self.service.issue_pair("alice", [], [], generation=1).access_token).gen, 1)

    def test_a_token_without_gen_counts_as_generation_zero(self) -> None:
        token = self.good()
        self.assertEqual(self.service.verify_access(token).gen, 0)
        self.service.set_generation("alice", 1)
        self.assertRefused(token, SessionEnded)

    def test_a_malformed_gen_is_invalid(self) -> None:
        for bad in (-1, 1.5, "1", True, None, [1]):
            self.assertRefused(self.good(gen=bad, jti=f"j{bad!r}"), TokenInvalid)

    def test_generations_only_go_up_and_load_at_start(self) -> None:
        self.service.load_generations({"alice": 2, "bob": 0})
        self.service.set_generation("alice", 1)
        self.assertEqual((self.service.generation_of("alice"), self.service.generation_of("bob"),
                          self.service.generation_of("carol")), (2, 0, 0))

    def test_refresh_issues_the_generation_it_is_given(self) -> None:
        first = self.service.issue_pair("alice", ["user"], [], generation=2)
        self.service.set_generation("alice", 2)
        kept = self.successResultOf(self.service.refresh(first.refresh_token))
        self.assertEqual(self.service.verify_access(kept.access_token).gen, 2)
        given = self.successResultOf(self.service.refresh(kept.refresh_token, generation=5))
        self.assertEqual(self.service.verify_access(given.access_token).gen, 5)
