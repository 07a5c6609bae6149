"""The admin site: its own Klein site, dispatcher and route table (``docs/admin.md``).

The ``admin`` listener serves this site and nothing else; no other listener has a route
under ``/admin/``. Requests go through :class:`~aico.gateway.adapters.rest.RestAdapter`
(transport ``admin``) into a dispatcher of their own whose steps are the security chain's
own, after one step of the site's (:meth:`AdminSite.session_step`):

* a request with ``Authorization: Bearer …`` is authenticated by the chain as anywhere
  (no CSRF token needed: a browser never sends one by itself);
* otherwise the session cookie names a browser session (:mod:`.sessions`); a
  state-changing request (``POST``, ``PATCH``, ``DELETE``) must then carry the session's
  CSRF token (``X-CSRF-Token``, or a ``csrf_token`` form field) or is refused 403, and
  the session's access token authenticates it (refreshed through the users domain
  when it is about to expire);
* on an ``allow_remote`` admin listener (mutual TLS), the connection's device must be
  paired, unrevoked and trusted ``admin``.

Every state-changing request is audited (``admin_action``: who, from where, what).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, flattenString, tags
from werkzeug.exceptions import HTTPException

from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.admin.api import api_routes
from aico.gateway.admin.hosts import host_allowed
from aico.gateway.admin.sessions import COOKIE, AdminSession, AdminSessions
from aico.gateway.admin.ui import AdminUI, page_route
from aico.gateway.errors import ApiError, Forbidden
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Request, Response
from aico.gateway.routing.table import RouteEntry, RouteTable
from aico.gateway.security import validate
from aico.gateway.security.capabilities import grants
from aico.gateway.tls import DeviceGate, DeviceSite
from aico.net import is_loopback

if TYPE_CHECKING:
    from aico.gateway.composition import GatewayParts, Reloader

__all__ = ["AdminSite"]

log = Logger(namespace="aico.gateway.admin")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Refresh a session's access token when it has less than this many seconds left.
REFRESH_MARGIN = 30.0
HTML = "text/html; charset=utf-8"


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def _form(request: Request) -> dict[str, str]:
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    try:
        parsed = parse_qs(request.body.decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items() if v}


def _page(title: str, *body: Any, csrf: str | None = None) -> Deferred[bytes]:
    head = tags.head(tags.meta(charset="utf-8"), tags.title(title),
                     tags.link(rel="stylesheet", href="/admin/ui.css"),
                     *( [tags.meta(name="csrf-token", content=csrf)] if csrf else []))
    doc = tags.html(head, tags.body(Tag("main")(tags.h1(title), *body)), lang="en")
    d: Deferred[bytes] = flattenString(None, doc)
    return d.addCallback(lambda html: b"<!DOCTYPE html>\n" + html)


class AdminRouter:
    """The admin site's Klein app, behind the front's Host guard and target check: every
    path goes to the admin dispatcher, which matches the admin route table (pages, API,
    modules' admin routes). The API listeners skip Klein (docs/performance.md); the admin
    site is not a hot path, so it keeps Klein's request handling."""

    app = Klein()

    def __init__(self, adapter: RestAdapter) -> None:
        self.adapter = adapter

    @app.route("/", branch=True)
    def everything(self, request: IRequest) -> Any:
        return self.adapter.handle(request)

    @app.handle_errors(HTTPException)
    def unrouted(self, request: IRequest, failure: Failure) -> Any:
        """Paths Werkzeug's matcher cannot take still get the dispatcher's problem+json."""
        return self.adapter.handle(request)


class AdminSite:
    """Everything the ``admin`` listener serves; see the module docstring."""

    def __init__(self, parts: GatewayParts, reloader: Reloader, *,
                 identify: Callable[[Any], str] | None = None,
                 gate: DeviceGate | None = None) -> None:
        self.parts = parts
        self.reloader = reloader
        self.log_buffer = parts.log_buffer
        self.sessions = AdminSessions(parts.reactor)
        users = {(e.method, e.path): e for e in parts.own_routes}
        self._authenticate = users[("POST", "/api/v1/users/authenticate")]
        self._refresh = users[("POST", "/api/v1/users/refresh")]
        self._logout = users[("POST", "/api/v1/users/logout")]
        #: The web UI's pages (:mod:`.ui`).
        self.ui = AdminUI(self)
        self.own_routes: list[RouteEntry] = validate.prepare([*self._pages(), *self.ui.routes(),
                                                              *api_routes(self)])
        self.dispatcher = Dispatcher(RouteTable(self.own_routes),
                                     [self.session_step, *parts.chain.steps()],
                                     clock=parts.reactor,
                                     observers=[parts.access_log.record, self.audit_action])
        parts.module_routes.on_admin_routes = self.rebuild
        self.rebuild()
        self.adapter = RestAdapter(self.dispatcher, "admin", inflight=parts.inflight,
                                   identify=identify, host_allowed=self.host_allowed)
        self.adapter.router = AdminRouter(self.adapter).app.resource()
        options = parts.site_options(self.dispatcher)
        #: The site the ``admin`` listener serves: over mutual TLS (a :class:`DeviceSite`)
        #: when the listener is off loopback (``allow_remote``).
        self.site: GatewaySite = (DeviceSite(self.adapter.resource(), gate=gate, **options)
                                  if gate is not None
                                  else GatewaySite(self.adapter.resource(), **options))

    # -- routes ------------------------------------------------------------------------

    def rebuild(self) -> None:
        """The site's table: its own routes and every module's admin routes."""
        module_entries = [e for entries in self.parts.module_routes.admin_entries.values()
                          for e in entries]
        try:
            self.dispatcher.set_table(RouteTable([*self.own_routes, *module_entries]))
        except ValueError as e:
            log.error("module admin routes refused: {error}", error=str(e))

    def host_allowed(self, host: str | None) -> bool:
        admin = self.parts.config.admin
        # Off loopback (allow_remote, mutual TLS) the device certificate is the guard.
        return not is_loopback(admin.host) or host_allowed(host, admin.allowed_hosts)

    # -- the site's step ---------------------------------------------------------------

    def session_of(self, request: Request) -> AdminSession | None:
        return self.sessions.get(_cookie(request.headers.get("cookie")))

    def session_step(self, request: Request) -> Deferred[None] | None:
        if request.device_id:
            device = self.parts.device_gate.lookup(request.device_id)
            if device is None or device.trust != "admin":
                raise Forbidden("the admin site needs a device trusted for administration")
            request.device_admin = True
        if "authorization" in request.headers:
            return None
        session = self.session_of(request)
        if session is None:
            return None
        if request.method in STATE_CHANGING and request.path != "/admin/login":
            sent = request.headers.get("x-csrf-token") or _form(request).get("csrf_token")
            if not session.csrf_ok(sent):
                raise Forbidden("a state-changing request of a browser session needs the "
                                "session's CSRF token (X-CSRF-Token)")
        if session.access_expires - self.parts.reactor.seconds() < REFRESH_MARGIN:
            return Deferred.fromCoroutine(self._refreshed(session, request))
        self._use(session, request)
        return None

    def _use(self, session: AdminSession, request: Request) -> None:
        try:
            self.parts.chain.principal_for_token(session.access_token)
        except ApiError:
            # The user's sessions ended (new password, disabled, deleted, logged out).
            self.sessions.drop(session.session_id)
            return
        request.headers["authorization"] = f"Bearer {session.access_token}"

    async def _refreshed(self, session: AdminSession, request: Request) -> None:
        response = await self._inner(request, self._refresh,
                                     {"refresh_token": session.refresh_token})
        if response.status != 200:
            self.sessions.drop(session.session_id)
            return
        self.sessions.update(session, json.loads(response.body))
        self._use(session, request)

    def _inner(self, outer: Request, entry: RouteEntry, body: dict[str, Any],
               token: str | None = None) -> Deferred[Response]:
        """Run a users-domain route for *outer* (same peer, transport ``admin``) through
        the gateway's own dispatcher and chain: its rate limits, lockout and audit."""
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        inner = Request(method=entry.method, path=entry.path, request_id=outer.request_id,
                        transport="admin", peer_host=outer.peer_host, loopback=outer.loopback,
                        headers=headers, body=json.dumps(body).encode())
        return self.parts.dispatcher.handle_control(inner, entry, self.parts.dispatcher.steps)

    # -- audit -------------------------------------------------------------------------

    def audit_action(self, request: Request, status: int, body_bytes: int) -> None:
        """Every state-changing request on the admin site: who, from where, what."""
        if request.method not in STATE_CHANGING:
            return
        route = request.route
        p = request.principal
        detail = {"route": f"{request.method} {route.path if route else '-'}",
                  "path": request.path[:512], "status": status, "peer": request.peer_host,
                  "transport": request.transport,
                  "summary": route.summary if route else ""}
        d = self.parts.audit.append("admin_action", p.subject if p is not None else "anonymous",
                                    detail)
        d.addErrback(lambda f: log.failure("could not audit an admin action", f))

    # -- pages -------------------------------------------------------------------------

    def _pages(self) -> list[RouteEntry]:
        page = page_route
        return [
            page("GET", "/admin/login", self.login_page, "The login form"),
            page("POST", "/admin/login", self.login, "Log in (form: username, password)"),
            page("POST", "/admin/logout", self.logout, "Log out (ends the session)"),
        ]

    def _html(self, body: Deferred[bytes], status: int = 200,
              headers: dict[str, str] | None = None) -> Deferred[Response]:
        return body.addCallback(lambda html: Response(status=status, body=html,
                                                      content_type=HTML, headers=headers or {}))

    def _login_form(self, message: str = "") -> list[Tag]:
        form = tags.form(
            tags.p(tags.label("User name ", tags.input(name="username", autocomplete="username",
                                                     required="required"))),
            tags.p(tags.label("Password ", tags.input(name="password", type="password",
                                                    autocomplete="current-password",
                                                    required="required"))),
            tags.p(tags.button("Log in", type="submit")),
            method="post", action="/admin/login")
        return [*([tags.p(message, role="alert")] if message else []), form]

    def login_page(self, request: Request) -> Deferred[Response]:
        return self._html(_page("aico-gateway admin: log in", *self._login_form()))

    def _cookie_header(self, value: str, max_age: int) -> str:
        return (f"{COOKIE}={value}; Path=/admin; Max-Age={max_age}; HttpOnly; "
                "SameSite=Strict")

    async def login(self, request: Request) -> Response:
        form = _form(request)
        username, password = form.get("username", ""), form.get("password", "")
        old = self.session_of(request)
        if old is not None:
            self.sessions.drop(old.session_id)
        response = await self._inner(request, self._authenticate,
                                     {"username": username, "password": password})
        if response.status != 200:
            message = ("Too many attempts; try again later." if response.status == 429
                       else "Wrong user name or password." if response.status in (400, 401)
                       else "The gateway could not log you in right now.")
            headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
            status = response.status if response.status >= 400 else 401
            return await self._html(_page("aico-gateway admin: log in",
                                          *self._login_form(message)), status, headers)
        pair = json.loads(response.body)
        try:
            principal, _ = self.parts.chain.principal_for_token(pair["access_token"])
        except ApiError:
            principal = None
        if principal is None or not grants(principal.caps, "admin:site"):
            await self._inner(request, self._logout, {"refresh_token": pair["refresh_token"]},
                              token=pair["access_token"])
            return await self._html(_page("aico-gateway admin: log in", *self._login_form(
                "This account may not administer the gateway.")), 403)
        session = self.sessions.create(principal.subject, pair)
        return Response(status=303, headers={
            "Location": "/admin/",
            "Set-Cookie": self._cookie_header(session.session_id, int(self.sessions.ttl))})

    async def logout(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is not None:
            self.sessions.drop(session.session_id)
            await self._inner(request, self._logout, {"refresh_token": session.refresh_token},
                              token=session.access_token)
        return Response(status=303, headers={"Location": "/admin/login",
                                             "Set-Cookie": self._cookie_header("", 0)})
