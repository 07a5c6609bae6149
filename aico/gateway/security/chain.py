"""The security chain: authenticate → authorize → validate → rate-limit, for every transport.

Each step is a small callable with one job that inspects the normalized
:class:`~aico.gateway.routing.messages.Request` and raises an ``ApiError`` to refuse.
The steps are composed once (:meth:`SecurityChain.steps`) and the same list runs for
REST, WebSocket, IPC and every later adapter; no adapter has checks of its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from aico.gateway.api.devices.exceptions import DeviceRefused
from aico.gateway.config import Config
from aico.gateway.errors import (
    ApiError,
    Forbidden,
    RateLimited,
    TemporarilyBlocked,
    TokenInvalid,
    Unauthenticated,
    to_api_error,
)
from aico.gateway.routing.messages import Principal, Request, Step
from aico.gateway.security import tokens as tk
from aico.gateway.security import validate
from aico.gateway.security.capabilities import CapabilityCache, grants
from aico.gateway.security.ratelimit import IRateLimiter
from aico.gateway.security.topics import may_subscribe
from aico.net import source_identity

if TYPE_CHECKING:
    from aico.gateway.devices.registry import Device

#: Transports whose connections carry a device certificate (the ``tls`` listener).
DEVICE_TRANSPORTS = frozenset({"tls", "wss"})
#: The role every device principal has (``[roles] device``).
DEVICE_ROLE = "device"

#: Capabilities with this prefix are narrowed by context: only over loopback, or from a
#: device trusted for administration.
ADMIN_PREFIX = "admin:"

#: The rate-limit tier of probe routes (``GET /api/v1/health``,
#: ``/.well-known/jwks.json``): load balancers and monitors poll them, so they are never
#: rate-limited nor refused by a block. They still pass the whole chain; only a probe
#: that the chain refuses (a bad token) is charged, to the ``public`` tier.
PROBE_TIER = "probe"
#: The tier a refused probe is charged to.
PROBE_REFUSAL_TIER = "public"

def token_error(error: tk.TokenError) -> ApiError:
    """The 401 problem for a refused token (the reason is for logs, not the client)."""
    return to_api_error(error)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header; ``None`` when absent."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenInvalid("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def _body_string(request: Request, member: str) -> str | None:
    """A string member of the validated body; None before validation (or if refused)."""
    body = request.json
    if isinstance(body, dict):
        value = body.get(member)
        if isinstance(value, str):
            return value
    return None


def limit_key(request: Request, tokens: tk.TokenService | None = None) -> str:
    """Whose budget a request spends.

    Requests on the ``auth`` tier are keyed by what they are about and by their source
    (:func:`~aico.net.source_identity`: every loopback address is one source), never by
    a token sent along with them and never by connection, so neither a new socket, a new
    loopback address nor a bearer token is a fresh budget; and one client's failures
    spend only its own budget:

    * a login (``limit_by="login"``): the account named in the validated body, from this
      source — ``login:SOURCE:"NAME"`` (the name JSON-quoted); a login refused before its
      body was validated, ``login-unread:SOURCE`` (no account's key);
    * a refresh (``limit_by="refresh"``): the session family of the refresh token
      (``refresh:fam:FAMILY``); a refresh token that does not verify,
      ``refresh:src:SOURCE``;
    * any other ``auth``-tier route: ``addr:SOURCE``.

    Everything else counts per user, device, connection or address
    (:attr:`Request.client_key`).
    """
    route = request.route
    if route is None or route.tier != "auth":
        return request.client_key
    source = source_identity(request.peer_host)
    if route.limit_by == "login":
        username = _body_string(request, "username")
        if username is None:
            return "login-unread:" + source
        return f"login:{source}:{json.dumps(username)}"
    if route.limit_by == "refresh":
        token = _body_string(request, "refresh_token")
        if token is not None and tokens is not None:
            try:
                return "refresh:fam:" + tokens.verify_refresh(token).fam
            except tk.TokenError:
                pass
        return "refresh:src:" + source
    return "addr:" + source


class SecurityChain:
    """The steps every request passes, built once from the gateway's parts."""

    log = Logger()

    def __init__(
        self,
        tokens: tk.TokenService,
        limiter: IRateLimiter,
        config: Callable[[], Config],
    ) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self.config = config
        #: The paired, unrevoked device with this ID, or ``None`` (the composition sets
        #: it to the device cache's lookup; ``None`` here refuses every device).
        self.devices: Callable[[str], Device | None] = lambda device_id: None
        #: Role set → capabilities for the role mapping in force (emptied when it changes).
        self.capabilities = CapabilityCache()

    # ------------------------------------------------------------------ authentication

    def principal_for_token(self, token: str) -> tuple[Principal, tk.Claims]:
        """Verify an access token (cached) and build the caller's principal."""
        try:
            claims = self.tokens.verify_access(token)
        except tk.TokenError as e:
            raise token_error(e) from None
        # Capabilities come from the current role mapping (a config reload applies at
        # once), narrowed to what the token itself carries.
        caps = self.capabilities.narrowed(claims.roles, claims.caps, self.config().roles)
        principal = Principal(
            subject=claims.sub,
            roles=claims.roles,
            caps=caps,
            device_id=str(claims.extra.get("device_id", "")),
            token_id=claims.jti,
            expires_at=claims.exp,
            family=claims.fam,
        )
        return principal, claims

    def device_principal(self, device: Device) -> Principal:
        """A device acting on its own: role ``device`` plus the device's own capabilities,
        as the user it was paired for when there is one (else ``device:ID``)."""
        caps = (self.capabilities.for_roles((DEVICE_ROLE,), self.config().roles)
                | frozenset(device.capabilities))
        return Principal(subject=device.paired_for or f"device:{device.device_id}",
                         roles=(DEVICE_ROLE,), caps=caps, device_id=device.device_id)

    def authenticate(self, request: Request) -> None:
        """Step 1: who is calling. A public route needs no token, but a bad one is refused.

        On the ``tls`` listener the connection's device (its client certificate) must be
        paired and not revoked; without a token it is the principal; with one, the
        token's user acts through the device, narrowed to what the device may do.
        """
        device = None
        if request.device_id and request.transport in DEVICE_TRANSPORTS:
            device = self.devices(request.device_id)
            if device is None:
                raise DeviceRefused()
            request.device_admin = device.trust == "admin"
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            if device is not None:
                request.principal = self.device_principal(device)
                return
            if request.route is not None and request.route.public:
                return
            raise Unauthenticated("authenticate before subscribing" if request.method == "SUBSCRIBE"
                                  else "this route needs a bearer token")
        principal, request.claims = self.principal_for_token(token)
        if device is not None:
            allowed = self.device_principal(device).caps
            principal = dataclasses.replace(
                principal, device_id=device.device_id,
                caps=frozenset({c for c in principal.caps if grants(allowed, c)}
                               | {c for c in allowed if grants(principal.caps, c)}))
        request.principal = principal

    # ------------------------------------------------------------------ authorization

    def authorize(self, request: Request) -> None:
        """Step 2: may they. Default deny; admin capabilities only in an admin context."""
        route = request.route
        assert route is not None
        if route.public:
            return
        principal = request.principal
        if principal is None:
            raise Unauthenticated("this route needs a bearer token")
        needed = route.capability
        if not grants(principal.caps, needed):
            raise Forbidden(f"this route needs the capability {needed!r}")
        if needed.startswith(ADMIN_PREFIX) and not (request.loopback or request.device_admin):
            raise Forbidden("administration is allowed only from this machine or an "
                            "admin-trusted device")

    # ------------------------------------------------------------------ rate limiting

    def rate_limit(self, request: Request) -> None:
        """Step 4: per client and route tier; adds ``RateLimit-Policy``/``RateLimit``."""
        self._charge(request, None)

    def _charge(self, request: Request, cause: ApiError | None) -> None:
        """Spend one request of the route's tier; refuse (429) past the limit."""
        if not self.config().ratelimit.enabled or request.route is None:
            return
        tier = request.route.tier
        if tier == PROBE_TIER:
            if cause is None:
                return  # probes are never limited nor blocked
            tier = PROBE_REFUSAL_TIER
        decision = self.limiter.check(limit_key(request, self.tokens), tier)
        request.response_headers.update(decision.headers())
        if decision.allowed:
            return
        headers = {"Retry-After": str(decision.retry_after)}
        if decision.blocked:
            raise TemporarilyBlocked(
                f"too many requests; blocked for {decision.retry_after} s", headers=headers
            ) from cause
        raise RateLimited(f"too many requests; retry in {decision.retry_after} s",
                          headers=headers) from cause

    def _counted(self, step: Callable[[Request], None]) -> Step:
        def run(request: Request) -> None:
            try:
                step(request)
            except ApiError as error:
                # A refused request still costs the client one request of the route's
                # tier, so bad tokens or malformed bodies cannot be sent without limit.
                self._charge(request, error)
                raise

        run.__name__ = getattr(step, "__name__", "step")
        return run

    def steps(self) -> list[Step]:
        """authenticate → authorize → validate → rate-limit (then the route's handler).

        A request refused by one of the first three is counted by the rate limiter too.
        """
        return [
            self._counted(self.authenticate),
            self._counted(self.authorize),
            self._counted(validate.make_step(lambda: self.config().limits)),
            self.rate_limit,
        ]

    # ------------------------------------------------------------------ session control

    def authorize_topic(self, request: Request) -> None:
        """Subscriptions: the caller may read events under the topic prefix in ``path``
        (:mod:`aico.gateway.security.topics`)."""
        if request.principal is None:
            raise Unauthenticated("authenticate before subscribing")
        if not may_subscribe(request.principal, request.path):
            raise Forbidden(f"not allowed to subscribe to {request.path[:256]!r}")

    def token_steps(self) -> list[Step]:
        """A connection presents a token (WebSocket ``auth``): authenticate, a refusal
        charged to the rate limiter as on any request."""
        return [self._counted(self.authenticate)]

    def subscription_steps(self) -> list[Step]:
        """``subscribe``: authenticate → authorize the topic → rate-limit."""
        return [self._counted(self.authenticate), self._counted(self.authorize_topic),
                self.rate_limit]

    def unsubscription_steps(self) -> list[Step]:
        """``unsubscribe`` (only one's own subscriptions): authenticate a token if one
        is given → rate-limit."""
        return [self._counted(self.authenticate), self.rate_limit]
