"""Access and refresh tokens: EdDSA JWTs, strict verification, rotation, revocation.

Verification is done here by hand, in a fixed order, rather than by a general JWT
library, so that nothing in a token can choose how it is checked:

1. size (8 KiB) before any parsing;
2. three base64url segments, canonical encoding (so a flipped padding bit is refused);
3. header: a JSON object with exactly ``alg`` = ``EdDSA``, ``kid``, optional ``typ`` =
   ``JWT`` — any other member (``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit``, …) is
   refused; ``kid`` must name a key of the keyring that still verifies;
4. the Ed25519 signature with that key (an HMAC or ``none`` token never reaches here);
5. claims: types, ``iss``, ``aud``, ``exp``/``nbf``/``iat`` against the injected clock
   with ``auth.leeway`` seconds of skew, ``typ`` (access vs refresh);
6. revocation of the ``jti`` and of the token's family (``fam``), on every call.

Steps 1 to 5 are cached per token string (bounded LRU, entries expire with the token),
step 6 never is. Tokens are issued with PyJWT.

Both token kinds carry ``fam``, the id of the login session ("family"): refreshing keeps
it, and revoking a family (refresh-token reuse, logout) revokes every token of the
session, access tokens included, with one entry in the revocation store. Nothing here
logs a token.

Both also carry ``gen``, the subject's session generation when the token was issued
(:mod:`aico.gateway.users`: a new password, disabling, other roles or deletion raise
it). The service keeps every subject's current generation in memory
(:meth:`TokenService.load_generations` at start, :meth:`TokenService.set_generation`
when a change is made) and refuses, with :class:`SessionEnded`, a token whose ``gen`` is
lower — on every call, cached or not. A token without ``gen`` counts as generation 0.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from aico.gateway.config import AuthSection
from aico.gateway.security.keys import KeyRing
from aico.gateway.store import DatabaseLike

T = TypeVar("T")

MAX_TOKEN_BYTES = 8192
ALGORITHM = "EdDSA"
ACCESS = "access"
REFRESH = "refresh"
#: Claims that ``issue_pair(extra=…)`` may not set.
RESERVED_CLAIMS = frozenset(
    {"sub", "iss", "aud", "iat", "nbf", "exp", "jti", "roles", "caps", "typ", "fam", "gen"}
)
_HEADER_ALLOWED = frozenset({"alg", "typ", "kid"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: Prefix of the revocation-store key that revokes a whole family.
FAMILY_PREFIX = "fam:"

# --------------------------------------------------------------------------- errors


class TokenError(Exception):
    """A token was refused. ``code`` is the error code of docs/rest.md; ``reason`` is for logs only."""

    code = "token_invalid"
    title = "Invalid token"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.title)
        self.reason = reason


class TokenInvalid(TokenError):
    code = "token_invalid"
    title = "Invalid token"


class TokenExpired(TokenError):
    code = "token_expired"
    title = "Token expired"


class TokenRevoked(TokenError):
    code = "token_revoked"
    title = "Token revoked"


class SessionEnded(TokenRevoked):
    """The token was issued under an older session generation of its subject: the
    account changed (password, disabled, roles, deleted) after the token was issued.
    ``claims`` are the token's verified claims (e.g. to revoke its family)."""

    def __init__(self, reason: str = "", claims: Claims | None = None) -> None:
        super().__init__(reason)
        self.claims = claims


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Claims:
    """The verified claims of a token."""

    sub: str
    iss: str
    aud: str
    iat: float
    nbf: float
    exp: float
    jti: str
    typ: str
    roles: tuple[str, ...]
    caps: tuple[str, ...]
    fam: str
    kid: str
    #: The subject's session generation the token was issued under (0 when absent).
    gen: int = 0
    #: Any further claims (from ``issue_pair(extra=…)``).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    #: Lifetime of the access token in seconds.
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret
    #: The session family both tokens belong to.
    family: str = ""

    def as_json(self) -> dict[str, Any]:
        """The body of ``/users/authenticate`` and ``/users/refresh`` (docs/rest.md § Users and login)."""
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
        }


class RefreshUse(enum.Enum):
    """Result of :meth:`IRevocationStore.use_refresh`."""

    OK = "ok"
    REUSED = "reused"
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------- stores


class IRevocationStore(Interface):
    """Revoked token ids and the state of refresh tokens.

    Checks are synchronous lookups in memory (they sit on every request); changes are
    applied in memory at once and persisted in order; the returned Deferreds fire once
    the change is durable.
    """

    def load() -> Deferred[None]:
        """Read the persisted state (drops expired entries); call once before use."""

    def is_revoked(jti: str) -> bool:
        """Whether *jti* (or a ``fam:``-prefixed family id) is revoked."""

    def revoke(jti: str, expires_at: float) -> Deferred[None]:
        """Revoke *jti* until *expires_at* (after which the token is expired anyway)."""

    def register_refresh(jti: str, family: str, username: str, expires_at: float) -> Deferred[None]:
        """Record a freshly issued, unused refresh token."""

    def use_refresh(jti: str) -> RefreshUse:
        """Mark a refresh token used: OK the first time, then REUSED; UNKNOWN if never seen."""

    def families_of(username: str) -> set[str]:
        """The session families that still hold a refresh token of *username*."""

    def revoke_family(family: str, expires_at: float) -> Deferred[None]:
        """Revoke the family marker and every refresh token of *family*."""

    def prune(now: float) -> Deferred[None]:
        """Forget entries whose tokens have expired by *now*."""

    def flush() -> Deferred[None]:
        """Fires once every change made so far is durable."""


@dataclass
class _Refresh:
    family: str
    username: str
    expires_at: float
    used: bool = False


@implementer(IRevocationStore)
class MemoryRevocationStore:
    """The in-memory state; also the cache that :class:`SqliteRevocationStore` persists."""

    def __init__(self) -> None:
        self.revoked: dict[str, float] = {}
        self.refresh: dict[str, _Refresh] = {}
        self.families: dict[str, set[str]] = {}

    def load(self) -> Deferred[None]:
        return succeed(None)

    def is_revoked(self, jti: str) -> bool:
        return jti in self.revoked

    def revoke(self, jti: str, expires_at: float) -> Deferred[None]:
        self.revoked[jti] = max(expires_at, self.revoked.get(jti, expires_at))
        return succeed(None)

    def register_refresh(
        self, jti: str, family: str, username: str, expires_at: float
    ) -> Deferred[None]:
        self.refresh[jti] = _Refresh(family, username, expires_at)
        self.families.setdefault(family, set()).add(jti)
        return succeed(None)

    def use_refresh(self, jti: str) -> RefreshUse:
        entry = self.refresh.get(jti)
        if entry is None:
            return RefreshUse.UNKNOWN
        if entry.used:
            return RefreshUse.REUSED
        entry.used = True
        return RefreshUse.OK

    def families_of(self, username: str) -> set[str]:
        return {r.family for r in self.refresh.values() if r.username == username}

    def _family_jtis(self, family: str) -> list[tuple[str, float]]:
        return [(j, self.refresh[j].expires_at) for j in self.families.get(family, ())]

    def revoke_family(self, family: str, expires_at: float) -> Deferred[None]:
        for jti, exp in self._family_jtis(family):
            self.revoke(jti, exp)
        return self.revoke(FAMILY_PREFIX + family, expires_at)

    def prune(self, now: float) -> Deferred[None]:
        self._prune_memory(now)
        return succeed(None)

    def _prune_memory(self, now: float) -> None:
        for jti in [j for j, exp in self.revoked.items() if exp <= now]:
            del self.revoked[jti]
        for jti in [j for j, r in self.refresh.items() if r.expires_at <= now]:
            entry = self.refresh.pop(jti)
            members = self.families.get(entry.family)
            if members is not None:
                members.discard(jti)
                if not members:
                    del self.families[entry.family]

    def flush(self) -> Deferred[None]:
        return succeed(None)


@implementer(IRevocationStore)
class SqliteRevocationStore(MemoryRevocationStore):
    """The in-memory state, loaded from and written through to SQLite.

    *db* holds the registry schema (:data:`aico.gateway.store.MIGRATIONS`); this class
    creates no table.

    Writes run one after another (a chain of Deferreds), so a token's INSERT always
    lands before its ``used`` UPDATE even on a multi-threaded pool. A crash loses at
    most the writes still in flight (e.g. a ``used`` mark, letting that one refresh
    token be used once more after the restart).
    """

    log = Logger()

    def __init__(self, db: DatabaseLike, clock: IReactorTime) -> None:
        super().__init__()
        self._db = db
        self._clock = clock
        self._tail: Deferred[None] = succeed(None)

    def _write(self, sql: str, params: Sequence[Any]) -> Deferred[None]:
        result: Deferred[None] = Deferred()

        def run(_: object) -> Deferred[None]:
            d = self._db.run_operation(sql, params)
            d.chainDeferred(result)
            # Keep the chain going whatever the outcome; the caller sees the failure.
            return d.addErrback(lambda _f: None)

        self._tail = self._tail.addCallback(run)
        return result

    def _interact(self, fn: Callable[..., None], *args: Any) -> Deferred[None]:
        result: Deferred[None] = Deferred()

        def run(_: object) -> Deferred[None]:
            d = self._db.run_interaction(fn, *args)
            d.chainDeferred(result)
            return d.addErrback(lambda _f: None)

        self._tail = self._tail.addCallback(run)
        return result

    def load(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._load())

    async def _load(self) -> None:
        now = self._clock.seconds()
        await self._db.run_operation("DELETE FROM revoked_tokens WHERE expires_at <= ?", (now,))
        await self._db.run_operation("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,))
        rows = await self._db.run_query("SELECT jti, expires_at FROM revoked_tokens", ())
        self.revoked = {str(jti): float(exp) for jti, exp in rows}
        rows = await self._db.run_query(
            "SELECT jti, family, username, expires_at, used FROM refresh_tokens", ()
        )
        self.refresh = {}
        self.families = {}
        for jti, family, username, exp, used in rows:
            self.refresh[str(jti)] = _Refresh(str(family), str(username), float(exp), bool(used))
            self.families.setdefault(str(family), set()).add(str(jti))
        self.log.info(
            "revocation store loaded: {revoked} revoked, {refresh} refresh tokens",
            revoked=len(self.revoked),
            refresh=len(self.refresh),
        )

    def revoke(self, jti: str, expires_at: float) -> Deferred[None]:
        super().revoke(jti, expires_at)
        return self._write(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) "
            "ON CONFLICT(jti) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
            (jti, expires_at),
        )

    def register_refresh(
        self, jti: str, family: str, username: str, expires_at: float
    ) -> Deferred[None]:
        super().register_refresh(jti, family, username, expires_at)
        return self._write(
            "INSERT OR REPLACE INTO refresh_tokens (jti, family, username, expires_at, used) "
            "VALUES (?, ?, ?, ?, 0)",
            (jti, family, username, expires_at),
        )

    def use_refresh(self, jti: str) -> RefreshUse:
        outcome = super().use_refresh(jti)
        if outcome is RefreshUse.OK:
            d = self._write("UPDATE refresh_tokens SET used = 1 WHERE jti = ?", (jti,))
            d.addErrback(lambda f: self.log.failure("could not persist a used refresh token", f))
        return outcome

    def revoke_family(self, family: str, expires_at: float) -> Deferred[None]:
        rows = [(jti, exp) for jti, exp in self._family_jtis(family)]
        rows.append((FAMILY_PREFIX + family, expires_at))
        for jti, exp in rows:
            MemoryRevocationStore.revoke(self, jti, exp)

        def write(cursor: Any) -> None:
            cursor.executemany(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) ON CONFLICT(jti) "
                "DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
                rows,
            )

        return self._interact(write)

    def prune(self, now: float) -> Deferred[None]:
        self._prune_memory(now)

        def write(cursor: Any) -> None:
            cursor.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (now,))
            cursor.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,))

        return self._interact(write)

    def flush(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._tail.addBoth(lambda _: d.callback(None))
        return d


# --------------------------------------------------------------------------- parsing


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url: alphabet only, no padding, canonical (re-encodes identically)."""
    if _B64URL.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise TokenInvalid("bad base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as e:
        raise TokenInvalid("bad base64url") from e
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise TokenInvalid("non-canonical base64url")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise TokenInvalid("duplicate JSON member")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise TokenInvalid("non-finite number")


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TokenInvalid("bad JSON") from e
    if not isinstance(value, dict):
        raise TokenInvalid("not a JSON object")
    return value


def _number(payload: Mapping[str, Any], name: str) -> float:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenInvalid(f"claim {name} missing or not a number")
    return float(value)


def _string(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise TokenInvalid(f"claim {name} missing or not a string")
    return value


def _generation(payload: Mapping[str, Any]) -> int:
    value = payload.get("gen", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TokenInvalid("claim gen not a non-negative integer")
    return value


def _strings(payload: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = payload.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenInvalid(f"claim {name} missing or not a list of strings")
    return tuple(value)


# --------------------------------------------------------------------------- service


@dataclass
class _Cached:
    claims: Claims


class TokenService:
    """Issues and verifies the gateway's tokens."""

    log = Logger()

    def __init__(
        self,
        keyring: KeyRing,
        auth_config: AuthSection,
        clock: IReactorTime,
        revocations: IRevocationStore,
        cache_size: int = 10_000,
    ) -> None:
        self._keyring = keyring
        self._auth = auth_config
        self._clock = clock
        self._revocations = revocations
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_size
        #: subject → its current session generation (absent: 0).
        self._generations: dict[str, int] = {}

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    def set_keyring(self, keyring: KeyRing) -> None:
        """Use a reloaded keyring (after ``aico-gateway keys rotate``)."""
        self._keyring = keyring
        self._cache.clear()

    def update(self, auth_config: AuthSection) -> None:
        """Apply a reloaded ``[auth]`` table (the leeway is reloadable)."""
        self._auth = auth_config
        self._cache.clear()

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return self._keyring.jwks(self._clock.seconds())

    # ------------------------------------------------------------------ session generations

    def load_generations(self, generations: Mapping[str, int]) -> None:
        """Learn every subject's current session generation (at start, from the users
        table); a generation already known higher is kept."""
        for subject, generation in generations.items():
            self.set_generation(subject, generation)

    def set_generation(self, subject: str, generation: int) -> None:
        """*subject*'s sessions now have *generation*: tokens issued under a lower one are
        refused from now on, cached or not. Generations only go up."""
        if generation > self._generations.get(subject, 0):
            self._generations[subject] = generation

    def generation_of(self, subject: str) -> int:
        """The current session generation of *subject* (0 when none is known)."""
        return self._generations.get(subject, 0)

    # ------------------------------------------------------------------ issuing

    def _encode(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims,
            self._keyring.signing_key,
            algorithm=ALGORITHM,
            headers={"kid": self._keyring.current_kid, "typ": "JWT"},
        )

    def issue_pair(
        self,
        subject: str,
        roles: Iterable[str],
        caps: Iterable[str],
        extra: Mapping[str, Any] | None = None,
        family: str | None = None,
        generation: int = 0,
    ) -> TokenPair:
        """A new access + refresh token for *subject*; a new family unless *family*.

        *generation* is the subject's session generation the pair is issued under (the
        one of the account state the caller checked); a lower one than the subject's
        current generation gives tokens that are refused.

        The refresh token is registered in the revocation store at once (in memory)
        and persisted in the background; use :meth:`issue_pair_durable` to wait.
        """
        extra = dict(extra or {})
        clash = RESERVED_CLAIMS & extra.keys()
        if clash:
            raise ValueError(f"extra claims may not set {sorted(clash)}")
        now = self._clock.seconds()
        iat = int(now)
        fam = family or secrets.token_urlsafe(16)
        base = {
            **extra,
            "sub": subject,
            "iss": self._auth.issuer,
            "aud": self._auth.audience,
            "iat": iat,
            "nbf": iat,
            "roles": list(roles),
            "caps": list(caps),
            "fam": fam,
            "gen": generation,
        }
        access_jti = secrets.token_urlsafe(16)
        refresh_jti = secrets.token_urlsafe(16)
        refresh_exp = iat + self._auth.refresh_ttl
        access = self._encode(
            {**base, "exp": iat + self._auth.access_ttl, "jti": access_jti, "typ": ACCESS}
        )
        refresh = self._encode({**base, "exp": refresh_exp, "jti": refresh_jti, "typ": REFRESH})
        d = self._revocations.register_refresh(refresh_jti, fam, subject, refresh_exp)
        d.addErrback(lambda f: self.log.failure("could not persist a refresh token", f))
        return TokenPair(access, refresh, self._auth.access_ttl, family=fam)

    def issue_pair_durable(
        self,
        subject: str,
        roles: Iterable[str],
        caps: Iterable[str],
        extra: Mapping[str, Any] | None = None,
        generation: int = 0,
    ) -> Deferred[TokenPair]:
        """Like :meth:`issue_pair`, firing once the refresh token is persisted."""
        pair = self.issue_pair(subject, roles, caps, extra, generation=generation)
        return self._revocations.flush().addCallback(lambda _: pair)

    # ------------------------------------------------------------------ verifying

    def verify_access(self, token: str | bytes) -> Claims:
        """The claims of a valid access token; raises a :class:`TokenError`."""
        return self._verify(token, ACCESS)

    def verify_refresh(self, token: str | bytes) -> Claims:
        """The claims of a valid refresh token; raises a :class:`TokenError`."""
        return self._verify(token, REFRESH)

    def _verify(self, token: str | bytes, typ: str) -> Claims:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("token too large")
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError as e:
                raise TokenInvalid("not ASCII") from e
        elif not token.isascii():
            raise TokenInvalid("not ASCII")
        now = self._clock.seconds()
        cached = self._cache.get(token)
        if cached is not None:
            claims = cached.claims
            if (
                now < claims.exp + self._auth.leeway
                and self._keyring.public_key(claims.kid, now) is not None
            ):
                self._cache.move_to_end(token)
            else:
                del self._cache[token]
                cached = None
        if cached is None:
            claims = self._verify_uncached(token, now)
            self._cache[token] = _Cached(claims)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if claims.typ != typ:
            raise TokenInvalid(f"a {claims.typ} token where a {typ} token is expected")
        if self._revocations.is_revoked(claims.jti) or self._revocations.is_revoked(
            FAMILY_PREFIX + claims.fam
        ):
            raise TokenRevoked("revoked")
        if claims.gen < self._generations.get(claims.sub, 0):
            raise SessionEnded("issued before the account changed", claims)
        return claims

    def _check_signature(self, public: Ed25519PublicKey, signature: bytes, signed: bytes) -> bool:
        """The one signature check (a seam for tests that count calls)."""
        try:
            public.verify(signature, signed)
        except InvalidSignature:
            return False
        return True

    def _verify_uncached(self, token: str, now: float) -> Claims:
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenInvalid("not a compact JWS")
        header_b64, payload_b64, sig_b64 = parts
        header = _json_object(_b64url_decode(header_b64))
        extra_members = header.keys() - _HEADER_ALLOWED
        if extra_members:
            raise TokenInvalid(f"header members not allowed: {sorted(extra_members)}")
        if header.get("alg") != ALGORITHM:
            raise TokenInvalid("algorithm not allowed")
        if "typ" in header and header["typ"] != "JWT":
            raise TokenInvalid("header typ is not JWT")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenInvalid("no kid")
        public = self._keyring.public_key(kid, now)
        if public is None:
            raise TokenInvalid("unknown kid")
        signature = _b64url_decode(sig_b64)
        if len(signature) != 64:
            raise TokenInvalid("bad signature length")
        if not self._check_signature(
            public, signature, f"{header_b64}.{payload_b64}".encode("ascii")
        ):
            raise TokenInvalid("bad signature")
        payload = _json_object(_b64url_decode(payload_b64))
        return self._claims(payload, kid, now)

    def _claims(self, payload: dict[str, Any], kid: str, now: float) -> Claims:
        leeway = self._auth.leeway
        iss = _string(payload, "iss")
        if iss != self._auth.issuer:
            raise TokenInvalid("wrong issuer")
        aud = payload.get("aud")
        if aud != self._auth.audience:
            raise TokenInvalid("wrong audience")
        exp, nbf, iat = _number(payload, "exp"), _number(payload, "nbf"), _number(payload, "iat")
        if now >= exp + leeway:
            raise TokenExpired("expired")
        if now + leeway < nbf:
            raise TokenInvalid("not yet valid")
        if now + leeway < iat:
            raise TokenInvalid("issued in the future")
        typ = _string(payload, "typ")
        if typ not in (ACCESS, REFRESH):
            raise TokenInvalid("unknown token typ")
        claims = Claims(
            sub=_string(payload, "sub"),
            iss=iss,
            aud=self._auth.audience,
            iat=iat,
            nbf=nbf,
            exp=exp,
            jti=_string(payload, "jti"),
            typ=typ,
            roles=_strings(payload, "roles"),
            caps=_strings(payload, "caps"),
            fam=_string(payload, "fam"),
            kid=kid,
            gen=_generation(payload),
            extra={k: v for k, v in payload.items() if k not in RESERVED_CLAIMS},
        )
        return claims

    # ------------------------------------------------------------------ rotation

    def refresh(
        self,
        token: str | bytes,
        roles: Iterable[str] | None = None,
        caps: Iterable[str] | None = None,
        generation: int | None = None,
    ) -> Deferred[TokenPair]:
        """Rotate a refresh token: a new pair in the same family, the old one used up.

        *roles*/*caps* replace the ones carried over (pass the user's current ones), and
        *generation* the session generation (pass the one of the row they came from).
        A token of an ended session generation fails with :class:`SessionEnded`.
        Reusing a refresh token that was already used revokes the whole family and
        fails with :class:`TokenRevoked`. Fires once the new state is persisted.
        """
        return Deferred.fromCoroutine(self._refresh(token, roles, caps, generation))

    async def _refresh(
        self,
        token: str | bytes,
        roles: Iterable[str] | None,
        caps: Iterable[str] | None,
        generation: int | None = None,
    ) -> TokenPair:
        claims = self.verify_refresh(token)
        outcome = self._revocations.use_refresh(claims.jti)
        if outcome is RefreshUse.REUSED:
            self.log.warn(
                "refresh token reuse for {subject}; revoking its session family",
                subject=claims.sub,
            )
            await self.revoke_family(claims.fam)
            raise TokenRevoked("refresh token reused")
        if outcome is RefreshUse.UNKNOWN:
            raise TokenRevoked("refresh token not on record")
        pair = self.issue_pair(
            claims.sub,
            claims.roles if roles is None else roles,
            claims.caps if caps is None else caps,
            extra=claims.extra,
            family=claims.fam,
            generation=claims.gen if generation is None else generation,
        )
        await self._revocations.flush()
        return pair

    # ------------------------------------------------------------------ revocation

    def revoke(self, jti: str, exp: float) -> Deferred[None]:
        """Revoke one token id until its expiry (plus the leeway)."""
        return self._revocations.revoke(jti, exp + self._auth.leeway)

    def revoke_family(self, family: str) -> Deferred[None]:
        """Revoke every token of a session family."""
        until = self._clock.seconds() + self._auth.refresh_ttl + self._auth.leeway
        return self._revocations.revoke_family(family, until)

    def revoke_subject(self, subject: str) -> Deferred[None]:
        """End every session of *subject* (password changed, disabled, roles changed,
        deleted): all its token families, access tokens included."""
        families = sorted(self._revocations.families_of(subject))
        self._cache.clear()
        ds = [self.revoke_family(f) for f in families]
        return gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)

    def logout(
        self, access_claims: Claims, refresh_token: str | bytes | None = None
    ) -> Deferred[None]:
        """End the session of *access_claims*: its whole family (and *refresh_token*'s)."""
        families = {access_claims.fam}
        if refresh_token is not None:
            try:
                families.add(self.verify_refresh(refresh_token).fam)
            except TokenError:
                pass  # an invalid or expired refresh token needs no revoking
        ds = [self.revoke(access_claims.jti, access_claims.exp)]
        ds += [self.revoke_family(f) for f in sorted(families)]
        return gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)

    def prune(self) -> Deferred[None]:
        """Drop expired revocations and cache entries (run it on a timer, e.g. hourly)."""
        now = self._clock.seconds()
        leeway = self._auth.leeway
        for token in [t for t, c in self._cache.items() if c.claims.exp + leeway <= now]:
            del self._cache[token]
        return self._revocations.prune(now - leeway)
