"""``/api/v1/users/…``: authenticate, refresh, logout, me, and admin user management."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from aico.gateway.api.users import schemas
from aico.gateway.api.users.dependencies import UsersDeps
from aico.gateway.api.users.exceptions import (
    LastAdmin,
    LoginFailed,
    UserExists,
    UserNotFound,
    WeakPassword,
)
from aico.gateway.errors import TokenRevoked, ValidationFailed
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security import tokens as tk
from aico.gateway.security.capabilities import capabilities_for
from aico.gateway.security.chain import PROBE_TIER, token_error
from aico.gateway.users import RESERVED_USERNAMES, NoAdminLeft, UserChange, username_problem
from aico.net import source_identity

log = Logger(namespace="aico.gateway.api.users")


def routes(deps: UsersDeps) -> list[RouteEntry]:
    store, passwords, tokens, audit = deps.store, deps.passwords, deps.tokens, deps.audit

    def caps_of(roles: tuple[str, ...]) -> list[str]:
        return sorted(capabilities_for(roles, deps.config().roles))

    async def authenticate(request: Request) -> Response:
        body = request.json
        username, password = body["username"], body["password"]
        auth = deps.config().auth
        # Failures count per (account, source): a lock earned from one source never
        # refuses the right password from another (docs/security.md, "Lockout").
        source = source_identity(request.peer_host)
        user, locked_until = await store.login_state(username, source)
        now = deps.clock.seconds()
        if user is None or user.disabled or locked_until > now:
            # The same work and the same answer whether or not the user exists.
            await passwords.verify(None, password)
            reason = ("unknown user" if user is None else "disabled" if user.disabled
                      else "locked")
            await audit.append("login_failed", username, {"reason": reason,
                                                          "peer": request.peer_host})
            log.info("login refused for {username} from {peer}: {reason}", username=username,
                     peer=request.peer_host, reason=reason)
            raise LoginFailed()
        if not await passwords.verify(user.password_hash, password):
            locked_until = await store.record_failure(
                username, source, auth.lockout_threshold, auth.lockout_base, auth.lockout_max)
            await audit.append("login_failed", username, {"reason": "password",
                                                          "peer": request.peer_host})
            if locked_until:
                await audit.append("account_locked", username,
                                   {"seconds": round(locked_until - now, 3), "source": source})
                log.warn("account {username} locked for {seconds:.0f} s for logins from "
                         "{source} after failed logins", username=username,
                         seconds=locked_until - now, source=source)
            log.info("login refused for {username} from {peer}: wrong password",
                     username=username, peer=request.peer_host)
            raise LoginFailed()
        # The tokens belong to the row the password was checked against: its roles and
        # its session generation. Should the account change before they are handed out
        # (new password, disabled, other roles, deleted), that generation has ended and
        # the tokens are refused — so a login that raced a change never outlives it.
        # A change already known here refuses the login itself.
        if tokens.generation_of(username) > user.session_generation:
            await audit.append("login_failed", username, {"reason": "changed during login",
                                                          "peer": request.peer_host})
            raise LoginFailed()
        await store.record_success(username, source)
        pair = await tokens.issue_pair_durable(username, user.roles, caps_of(user.roles),
                                               generation=user.session_generation)
        await audit.append("login_succeeded", username, {"peer": request.peer_host,
                                                         "transport": request.transport})
        log.info("login for {username} from {peer} over {transport}", username=username,
                 peer=request.peer_host, transport=request.transport)
        return json_response(pair.as_json())

    async def session_ended(claims: tk.Claims, why: str) -> TokenRevoked:
        await tokens.revoke_family(claims.fam)
        deps.on_revoke_family(claims.fam)
        return TokenRevoked(why)

    async def refresh(request: Request) -> Response:
        token = request.json["refresh_token"]
        try:
            claims = tokens.verify_refresh(token)
        except tk.SessionEnded as e:
            assert e.claims is not None
            raise await session_ended(e.claims, "the account changed; the session ended") from None
        except tk.TokenError as e:
            raise token_error(e) from None
        user = await store.get(claims.sub)
        if user is None or user.disabled:
            raise await session_ended(claims, "the account no longer exists or is disabled")
        tokens.set_generation(user.username, user.session_generation)
        if claims.gen < user.session_generation:
            raise await session_ended(claims, "the account changed; the session ended")
        try:
            pair = await tokens.refresh(token, roles=user.roles, caps=caps_of(user.roles),
                                        generation=user.session_generation)
        except tk.SessionEnded:
            raise await session_ended(claims, "the account changed; the session ended") from None
        except tk.TokenRevoked:
            deps.on_revoke_family(claims.fam)
            await audit.append("refresh_reuse", claims.sub, {"family_revoked": True})
            raise TokenRevoked("refresh token already used; the session is revoked") from None
        except tk.TokenError as e:
            raise token_error(e) from None
        return json_response(pair.as_json())

    async def logout(request: Request) -> Response:
        claims = request.claims
        refresh_token = (request.json or {}).get("refresh_token")
        await tokens.logout(claims, refresh_token)
        deps.on_revoke(claims.jti)
        deps.on_revoke_family(claims.fam)
        await audit.append("logout", claims.sub, {"tokens_revoked": True})
        log.info("logout for {username}: session revoked", username=claims.sub)
        return Response(status=204, content_type="application/json")

    async def me(request: Request) -> Response:
        p = request.principal
        assert p is not None
        return json_response({"username": p.subject, "roles": list(p.roles),
                              "capabilities": sorted(p.caps), "expires_at": p.expires_at})

    async def list_users(request: Request) -> Response:
        return json_response({"users": [u.public() for u in await store.list()]})

    def check_password(password: str) -> None:
        minimum = deps.config().auth.password_min_length
        if len(password) < minimum:
            raise WeakPassword(minimum)

    async def create_user(request: Request) -> Response:
        body = request.json
        problem = username_problem(body["username"])
        if problem is not None:
            raise ValidationFailed([{"pointer": "/username", "detail": problem}],
                                   detail=f"username: {problem}")
        check_password(body["password"])
        roles = tuple(body["roles"])
        hashed = await passwords.hash(body["password"])
        if not await store.create(body["username"], hashed, roles):
            raise UserExists(body["username"])
        actor = request.principal.subject if request.principal else "?"
        await audit.append("user_created", actor, {"username": body["username"],
                                                   "roles": list(roles)})
        user = await store.get(body["username"])
        assert user is not None
        tokens.set_generation(user.username, user.session_generation)
        return json_response(user.public(), status=201,
                             headers={"Location": f"/api/v1/users/{quote(user.username)}"})

    async def end_sessions(change: UserChange) -> None:
        # First, before anything else is awaited: from here on no token issued under an
        # earlier generation is accepted, cached or not, racing login or not.
        tokens.set_generation(change.after.username, change.after.session_generation)
        await tokens.revoke_subject(change.after.username)
        deps.on_revoke_subject(change.after.username)
        await audit.append("sessions_revoked", change.after.username, {"tokens_revoked": True})

    async def password_changed(username: str) -> None:
        # The bootstrap admin's password file goes once it no longer opens the account.
        result = deps.on_password_changed(username)
        if isinstance(result, Deferred):
            await result

    async def update_user(request: Request) -> Response:
        username = request.path_params["username"]
        body: dict[str, Any] = request.json
        roles = tuple(body["roles"]) if "roles" in body else None
        if await store.get(username) is None:
            raise UserNotFound(username)
        hashed = None
        if "password" in body:
            check_password(body["password"])
            hashed = await passwords.hash(body["password"])
        try:
            # The last-enabled-admin check and the write: one transaction.
            change = await store.update(username, password_hash=hashed, roles=roles,
                                        disabled=body.get("disabled"), keep_an_admin=True)
        except NoAdminLeft:
            raise LastAdmin() from None
        if change is None:
            raise UserNotFound(username)
        if change.sessions_ended:
            # A new password, a disabled account or other roles: its sessions end now,
            # not when their tokens expire.
            await end_sessions(change)
        actor = request.principal.subject if request.principal else "?"
        await audit.append("user_updated", actor, {"username": username, "changed": sorted(body)})
        if hashed is not None:
            await password_changed(username)
        return json_response(change.after.public())

    async def delete_user(request: Request) -> Response:
        username = request.path_params["username"]
        try:
            change = await store.delete(username, keep_an_admin=True)
        except NoAdminLeft:
            raise LastAdmin() from None
        if change is None:
            raise UserNotFound(username)
        await end_sessions(change)
        actor = request.principal.subject if request.principal else "?"
        await audit.append("user_deleted", actor, {"username": username})
        await password_changed(username)
        return Response(status=204)

    def jwks(request: Request) -> Response:
        return json_response(tokens.jwks(), headers={"Cache-Control": "max-age=300"})

    minimum = deps.config().auth.password_min_length
    create_schema = schemas.with_password_minimum(schemas.CREATE_USER, minimum)
    update_schema = schemas.with_password_minimum(schemas.UPDATE_USER, minimum)
    base = "/api/v1/users"
    entries = [
        RouteEntry("POST", f"{base}/authenticate", authenticate, public=True, tier="auth",
                   limit_by="login",
                   request_schema=schemas.AUTHENTICATE, response_schema=schemas.TOKENS,
                   summary="Log in: username and password for an access and a refresh token"),
        RouteEntry("POST", f"{base}/refresh", refresh, public=True, tier="auth", limit_by="refresh",
                   request_schema=schemas.REFRESH, response_schema=schemas.TOKENS,
                   summary="Rotate the refresh token (reusing an old one revokes the session)"),
        RouteEntry("POST", f"{base}/logout", logout, capability="users:self",
                   request_schema=schemas.LOGOUT, success_status=204,
                   summary="Revoke this session's tokens"),
        RouteEntry("GET", f"{base}/me", me, capability="users:self", response_schema=schemas.ME,
                   summary="The caller: username, roles and capabilities"),
        RouteEntry("GET", base, list_users, capability="admin:users", tier="admin",
                   response_schema=schemas.USER_LIST, summary="Every user (admin)"),
        RouteEntry("POST", base, create_user, capability="admin:users", tier="admin",
                   request_schema=create_schema, response_schema=schemas.USER,
                   success_status=201, summary="Create a user (admin)"),
        RouteEntry("PATCH", f"{base}/{{username}}", update_user, capability="admin:users",
                   tier="admin", request_schema=update_schema,
                   response_schema=schemas.USER, summary="Change a user (admin)"),
        RouteEntry("DELETE", f"{base}/{{username}}", delete_user, capability="admin:users",
                   tier="admin", success_status=204, summary="Delete a user (admin)"),
        RouteEntry("GET", "/.well-known/jwks.json", jwks, public=True, tier=PROBE_TIER,
                   response_schema=schemas.JWKS,
                   summary="Public keys that verify the gateway's tokens (RFC 7517)"),
    ]
    _check_reserved(entries, base)
    return entries


def _check_reserved(entries: list[RouteEntry], base: str) -> None:
    """Every static segment right under *base* must be a reserved username (a user so
    named could not be managed at ``{base}/{username}``)."""
    static = {e.path[len(base) + 1:] for e in entries
              if e.path.startswith(base + "/") and "{" not in e.path}
    segments = {p.split("/", 1)[0] for p in static}
    missing = segments - RESERVED_USERNAMES
    if missing:
        raise RuntimeError(f"add {sorted(missing)} to aico.gateway.users.RESERVED_USERNAMES")
