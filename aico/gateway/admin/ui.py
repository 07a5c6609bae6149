"""The admin site's web UI: server-rendered pages over the ``/admin/api`` routes.

Every page is plain HTML made with :mod:`twisted.web.template` — no build step, nothing
loaded from elsewhere, one small stylesheet served by the site (``/admin/ui.css``) and a
few lines of script for the live log tail (``/admin/ui.js``: an ``EventSource`` on
``/admin/api/logs/tail``). A page needs a browser session (else ``303 → /admin/login``).

A page gathers its data by running the ``/admin/api`` routes themselves, in process
(:meth:`AdminUI.api`): the same handlers, the same capability checks with the session's
token, one implementation. State-changing forms ``POST`` to the page routes with the
session's CSRF token (``csrf_token`` field, checked by :meth:`AdminSite.session_step`),
which run the matching API route and show the result.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import segno
from twisted.internet.defer import Deferred
from twisted.web.template import Tag, XMLString, flattenString, tags

from aico.gateway.admin.logbuffer import LEVELS
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Request, Response
from aico.gateway.routing.table import RouteEntry, RouteTable

if TYPE_CHECKING:
    from aico.gateway.admin.sessions import AdminSession
    from aico.gateway.admin.site import AdminSite

__all__ = ["STYLESHEET", "AdminUI", "pairing_qr"]

HTML = "text/html; charset=utf-8"

#: Every page, in the nav bar's order: (path, label).
NAV = (("/admin/", "Dashboard"), ("/admin/config", "Config"), ("/admin/logs", "Logs"),
       ("/admin/devices", "Devices"), ("/admin/users", "Users"), ("/admin/audit", "Audit"))

STYLESHEET = b"""\
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #fdfdfd; --mute: #666;
        --line: #ccc; --accent: #0b57d0; --bad: #b3261e; --good: #146c2e; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e6e6; --bg: #151515; --mute: #aaa; --line: #444; --accent: #8ab4f8;
          --bad: #f2b8b5; --good: #a8dab5; } }
body { font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg);
       margin: 0; }
nav { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: center;
      padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); text-decoration: none; padding: .2rem .3rem; }
nav a[aria-current=page] { font-weight: bold; text-decoration: underline; }
nav form { margin-left: auto; }
main { padding: 0 1rem 2rem; max-width: 72rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .6rem; text-align: left;
         vertical-align: top; }
td form { margin: 0; }
pre, textarea, code { font: 13px/1.35 ui-monospace, monospace; }
pre { overflow: auto; border: 1px solid var(--line); padding: .5rem; max-height: 32rem; }
textarea { width: 100%; max-width: 48rem; }
label { display: inline-block; margin-right: 1rem; }
input, select, button, textarea { font: inherit; }
button { cursor: pointer; }
a:focus-visible, button:focus-visible, input:focus-visible, select:focus-visible,
textarea:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.ok { color: var(--good); } .bad { color: var(--bad); } .mute { color: var(--mute); }
.notice { border-left: 4px solid var(--accent); padding: .3rem .8rem; }
.error { border-left: 4px solid var(--bad); padding: .3rem .8rem; }
.code { font: bold 2rem ui-monospace, monospace; letter-spacing: .1em; }
.qr svg { background: #fff; }
#tail li { font: 13px/1.35 ui-monospace, monospace; }
"""

#: The live tail (``/admin/ui.js``, loaded by the logs page only): new lines from the
#: server-sent events, appended to ``#tail``. A file of its own, not inline: the flattener
#: would escape ``<`` and ``>`` in a ``<script>``.
TAIL_SCRIPT = b"""\
(function () {
  var list = document.getElementById("tail"), state = document.getElementById("tail-state");
  var source = new EventSource(list.dataset.src);
  source.onopen = function () { state.textContent = "live"; };
  source.onerror = function () { state.textContent = "disconnected (retrying)"; };
  source.onmessage = function (e) {
    var r = JSON.parse(e.data), li = document.createElement("li");
    li.textContent = new Date(r.time * 1000).toISOString() + " " + r.level + " " +
                     r.namespace + ": " + r.text;
    list.appendChild(li);
    while (list.children.length > 500) { list.removeChild(list.firstChild); }
  };
})();
"""


def _when(ts: float | None) -> str:
    if not ts:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def pairing_qr(host: str, port: int | None, code: str) -> tuple[str, str]:
    """The text a device scans to pair (``aico://pair?host=&port=&code=``) and its QR code
    as an inline ``<svg>`` element (made with ``segno``)."""
    text = "aico://pair?" + urlencode({"host": host, "port": port or "", "code": code})
    svg = segno.make(text, error="m").svg_inline(scale=5, title="Pairing QR code")
    return text, svg


def _table(headers: list[str], rows: list[list[Any]], caption: str = "") -> Tag:
    return tags.table(
        *([tags.caption(caption)] if caption else []),
        tags.thead(tags.tr(*[tags.th(h, scope="col") for h in headers])),
        tags.tbody(*[tags.tr(*[tags.td(c) for c in row]) for row in rows]))



def page_route(method: str, path: str, handler: Any, summary: str) -> RouteEntry:
    """A route of the admin site's HTML pages: no token needed by the chain (the session
    step decides), the ``admin`` tier, the body handed over as it came."""
    return RouteEntry(method, path, handler, owner="admin", public=True, tier="admin",
                      raw_body=True, summary=summary)

class AdminUI:
    """The pages of the admin site (see the module docstring)."""

    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.parts = site.parts
        self._inner: Dispatcher | None = None

    # -- plumbing ------------------------------------------------------------------------

    def routes(self) -> list[RouteEntry]:
        page = page_route
        return [
            page("GET", "/admin/", self.dashboard, "Web UI: dashboard"),
            page("GET", "/admin", self.dashboard, "Web UI: dashboard"),
            page("GET", "/admin/ui.css", self.stylesheet, "Web UI: the stylesheet"),
            page("GET", "/admin/ui.js", self.script, "Web UI: the live log tail"),
            page("GET", "/admin/config", self.config, "Web UI: the effective config"),
            page("POST", "/admin/config", self.config_patch, "Web UI: change the config"),
            page("POST", "/admin/config/reload", self.config_reload,
                 "Web UI: re-read the config file"),
            page("GET", "/admin/logs", self.logs, "Web UI: recent log lines and live tail"),
            page("GET", "/admin/devices", self.devices, "Web UI: paired devices"),
            page("POST", "/admin/devices/pairing", self.pairing,
                 "Web UI: open a pairing window"),
            page("POST", "/admin/devices/{device_id}/revoke", self.revoke,
                 "Web UI: revoke a device"),
            page("GET", "/admin/users", self.users, "Web UI: users"),
            page("POST", "/admin/users", self.user_create, "Web UI: create a user"),
            page("POST", "/admin/users/{username}/disable", self.user_disable,
                 "Web UI: disable a user"),
            page("POST", "/admin/users/{username}/enable", self.user_enable,
                 "Web UI: enable a user"),
            page("GET", "/admin/audit", self.audit, "Web UI: the audit log"),
        ]

    def api(self, outer: Request, method: str, path: str, body: Any = None,
            query: dict[str, str] | None = None) -> Deferred[tuple[int, Any]]:
        """Run the admin API route ``method path`` for the page request *outer*: same
        caller (its session's token), peer and device; authenticated, authorized and
        validated as any API call (not charged again, nor logged twice). Fires with
        ``(status, parsed JSON body or None)``."""
        if self._inner is None:
            self._inner = Dispatcher(RouteTable(), [], clock=self.parts.reactor)
        entry, params = self.site.dispatcher.table.match(method, path)
        headers = {"authorization": outer.headers.get("authorization", "")}
        raw = b""
        if body is not None:
            headers["content-type"] = "application/json"
            raw = json.dumps(body).encode()
        inner = Request(method=method, path=path, request_id=outer.request_id,
                        transport="admin", peer_host=outer.peer_host, loopback=outer.loopback,
                        headers=headers, query=query or {}, body=raw, path_params=params,
                        device_id=outer.device_id, device_admin=outer.device_admin)
        steps = self.parts.chain.steps()[:3]  # authenticate, authorize, validate
        d = self._inner.handle_control(inner, entry, steps)

        def parsed(response: Response) -> tuple[int, Any]:
            try:
                return response.status, json.loads(response.body) if response.body else None
            except ValueError:
                return response.status, None

        return d.addCallback(parsed)

    def _session(self, request: Request) -> AdminSession | None:
        session = self.site.session_of(request)
        if session is None or request.principal is None:
            return None
        return session

    def _render(self, request: Request, title: str, *body: Any,
                status: int = 200) -> Deferred[Response]:
        session = self._session(request)
        assert session is not None
        current = request.path if request.path != "/admin" else "/admin/"
        links = [tags.a(label, href=path, **({"aria-current": "page"} if path == current
                                                 else {}))
                 for path, label in NAV]
        logout = tags.form(self._csrf(session), tags.button("Log out", type="submit"),
                           method="post", action="/admin/logout")
        doc = tags.html(
            tags.head(tags.meta(charset="utf-8"),
                      tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
                      tags.meta(name="csrf-token", content=session.csrf_token),
                      tags.title(f"{title} · aico-gateway admin"),
                      tags.link(rel="stylesheet", href="/admin/ui.css")),
            tags.body(tags.nav(tags.strong("aico-gateway"), *links,
                               tags.span("signed in as ", tags.strong(session.username),
                                         class_="mute"), logout, **{"aria-label": "Admin"}),
                      Tag("main")(tags.h1(title), *body, id="main")),
            lang="en")
        d: Deferred[bytes] = flattenString(None, doc)
        return d.addCallback(lambda html: Response(
            status=status, body=b"<!DOCTYPE html>\n" + html, content_type=HTML,
            headers={"Cache-Control": "no-store"}))

    @staticmethod
    def _csrf(session: AdminSession) -> Tag:
        return tags.input(type="hidden", name="csrf_token", value=session.csrf_token)

    @staticmethod
    def _to_login() -> Response:
        return Response(status=303, headers={"Location": "/admin/login"})

    @staticmethod
    def _problem(status: int, body: Any) -> Tag:
        detail = body.get("detail") or body.get("title") if isinstance(body, dict) else None
        return tags.p(f"Refused ({status}): {detail or 'error'}", class_="error", role="alert")

    def _form(self, request: Request) -> dict[str, str]:
        from aico.gateway.admin.site import _form

        return _form(request)

    def stylesheet(self, request: Request) -> Response:
        return Response(status=200, body=STYLESHEET, content_type="text/css; charset=utf-8",
                        headers={"Cache-Control": "max-age=300"})

    def script(self, request: Request) -> Response:
        return Response(status=200, body=TAIL_SCRIPT,
                        content_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "max-age=300"})

    # -- dashboard -----------------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        status_m, modules = await self.api(request, "GET", "/admin/api/modules")
        status_c, conns = await self.api(request, "GET", "/admin/api/connections")
        status_v, version = await self.api(request, "GET", "/admin/api/version")
        body: list[Any] = []

        body.append(tags.h2("Modules", id="modules"))
        if status_m != 200:
            body.append(self._problem(status_m, modules))
        elif not modules["modules"]:
            body.append(tags.p("No module is registered.", class_="mute"))
        else:
            body.append(_table(["Module", "Health", "Version", "Routes", "Last seen"], [
                [tags.strong(m["name"]),
                 tags.span(m["health"], class_="ok" if m["health"] == "alive" else "bad"),
                 m["version"] or "—", str(len(m["routes"])), _when(m["last_seen"])]
                for m in modules["modules"]]))

        body.append(tags.h2("Connections", id="connections"))
        if status_c != 200:
            body.append(self._problem(status_c, conns))
        else:
            by_transport = Counter(s["transport"] for s in conns["sessions"])
            tls = sum(len(d["connections"]) if isinstance(d["connections"], list)
                      else int(d["connections"]) for d in conns["tls"])
            if tls:
                by_transport["tls (devices)"] += tls
            rows = [[t, str(n)] for t, n in sorted(by_transport.items())]
            body.append(_table(["Transport", "Open"], rows or [["—", "0"]]))

        body.append(tags.h2("Requests", id="requests"))
        body.append(self._rates())

        body.append(tags.h2("Version", id="version"))
        if status_v != 200:
            body.append(self._problem(status_v, version))
        else:
            p = version["protocols"]
            body.append(_table(["", ""], [
                ["gateway", tags.strong(str(version["gateway"]))],
                ["protobuf package", p["proto_package"]],
                ["WebSocket subprotocols", ", ".join(p["websocket_subprotocols"])],
                ["REST", p["rest"]], ["sync", p["sync"]]]))
        return await self._render(request, "Dashboard", *body)

    def _rates(self) -> Tag:
        """Requests per transport over the last minute and five, from the access log's
        lines in the log buffer."""
        wall = time.time()
        records = [r for r in self.site.log_buffer.recent(self.site.log_buffer.capacity)
                   if r["namespace"] == "aico.access"]
        minute: Counter[str] = Counter()
        five: Counter[str] = Counter()
        for r in records:
            age = wall - r["time"]
            fields = r["text"].split(" ", 2)  # request ID, transport, …
            listener = fields[1] if len(fields) > 1 else "-"
            if age <= 300:
                five[listener] += 1
                if age <= 60:
                    minute[listener] += 1
        rows = [[k, str(minute[k]), f"{minute[k] / 60:.2f}", str(five[k]), f"{five[k] / 300:.2f}"]
                for k in sorted(five)]
        return tags.div(
            _table(["Transport", "last 1 min", "per s", "last 5 min", "per s"],
                   rows or [["—", "0", "0.00", "0", "0.00"]]),
            tags.p("From the access log lines kept in memory (the newest ",
                   str(self.site.log_buffer.capacity), " log lines). Prometheus metrics: ",
                   tags.a("/admin/metrics", href="/admin/metrics"), ".", class_="mute"))

    # -- config --------------------------------------------------------------------------

    async def config(self, request: Request, notice: Any = None,
                     patch_text: str = "") -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login()
        status, body = await self.api(request, "GET", "/admin/api/config")
        out: list[Any] = [notice] if notice is not None else []
        if status != 200:
            out.append(self._problem(status, body))
            return await self._render(request, "Config", *out)
        out += [
            tags.p("Config file: ", tags.code(body["file"] or "none (started without --config)")),
            tags.h2("Change", id="change"),
            tags.form(
                self._csrf(session),
                tags.p(tags.label("JSON merge patch (RFC 7396) on the config file",
                                  tags.br(),
                                  tags.textarea(patch_text, name="patch", rows="6", cols="70",
                                                placeholder='{"ratelimit": {"enabled": true}}',
                                                id="patch"))),
                tags.p(tags.button("Apply", type="submit")),
                method="post", action="/admin/config"),
            tags.form(self._csrf(session),
                      tags.button("Reload the config file", type="submit"),
                      method="post", action="/admin/config/reload"),
            tags.h2("Effective config (secrets redacted)", id="effective"),
            tags.pre(json.dumps(body["config"], indent=2, sort_keys=True), id="config"),
        ]
        return await self._render(request, "Config", *out)

    def _changed(self, title: str, body: Any) -> Tag:
        live = ", ".join(body.get("live") or []) or "none"
        restart = ", ".join(body.get("restart") or []) or "none"
        return tags.div(tags.p(title), tags.p("Applied live: ", tags.code(live)),
                        tags.p("Needs a restart: ", tags.code(restart)),
                        class_="notice", role="status")

    async def config_patch(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        text = self._form(request).get("patch", "")
        try:
            patch = json.loads(text)
        except ValueError as e:
            return await self.config(request, tags.p(f"Not JSON: {e}", class_="error",
                                                     role="alert"), text)
        if not isinstance(patch, dict):
            return await self.config(request, tags.p("The patch must be a JSON object.",
                                                     class_="error", role="alert"), text)
        status, body = await self.api(request, "PATCH", "/admin/api/config", patch)
        if status != 200:
            return await self.config(request, self._problem(status, body), text)
        return await self.config(request, self._changed("Config changed.", body))

    async def config_reload(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        status, body = await self.api(request, "POST", "/admin/api/config/reload")
        if status != 200:
            return await self.config(request, self._problem(status, body))
        return await self.config(request, self._changed("Config file re-read.", body))

    # -- logs ----------------------------------------------------------------------------

    async def logs(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        level = request.query.get("level", "info").lower()
        if level not in LEVELS:
            level = "info"
        status, body = await self.api(request, "GET", "/admin/api/logs",
                                      query={"level": level, "limit": "200"})
        options = [tags.option(name, value=name, **({"selected": "selected"}
                                                    if name == level else {}))
                   for name in LEVELS]
        out: list[Any] = [tags.form(
            tags.label("Lowest level ", tags.select(*options, name="level", id="level")),
            tags.button("Show", type="submit"), method="get", action="/admin/logs")]
        if status != 200:
            out.append(self._problem(status, body))
            return await self._render(request, "Logs", *out)
        entries = body["entries"]
        out += [tags.h2(f"Recent lines ({len(entries)}, newest last)", id="recent"),
                _table(["Time", "Level", "Namespace", "Text"], [
                    [_when(e["time"]), e["level"], e["namespace"], e["text"]]
                    for e in entries]) if entries else tags.p("No lines.", class_="mute"),
                tags.h2("Live tail ", tags.small("(", tags.span("connecting", id="tail-state"),
                                                 ")", class_="mute"), id="live"),
                tags.ol(id="tail", **{"data-src": "/admin/api/logs/tail?level=" + quote(level),
                                      "aria-live": "polite"}),
                tags.script(src="/admin/ui.js", defer="defer")]
        return await self._render(request, "Logs", *out)

    # -- devices -------------------------------------------------------------------------

    async def devices(self, request: Request, notice: Any = None) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login()
        status, body = await self.api(request, "GET", "/admin/api/devices")
        out: list[Any] = [notice] if notice is not None else []
        if status != 200:
            out.append(self._problem(status, body))
            return await self._render(request, "Devices", *out)
        rows = []
        for d in body["devices"]:
            conns = d["connections"]
            n = len(conns) if isinstance(conns, list) else int(conns or 0)
            action: Any = (tags.span(f"revoked {_when(d['revoked_at'])}", class_="bad")
                           if d["revoked"] else
                           tags.form(self._csrf(session),
                                     tags.button("Revoke", type="submit",
                                                 **{"aria-label": f"Revoke {d['name']}"}),
                                     method="post",
                                     action=f"/admin/devices/{quote(d['device_id'], safe='')}"
                                            "/revoke"))
            rows.append([tags.strong(d["name"]), tags.code(d["device_id"]), d["trust"],
                         d["paired_for"] or "—", _when(d["paired_at"]), _when(d["last_seen"]),
                         str(n), action])
        out.append(_table(["Name", "ID", "Trust", "For user", "Paired", "Last seen",
                           "Connections", ""], rows) if rows
                   else tags.p("No device is paired.", class_="mute"))
        out += [tags.h2("Pair a device", id="pair"), tags.form(
            self._csrf(session),
            tags.p(tags.label("Minutes open ", tags.input(name="minutes", type="number",
                                                          min="1", max="1440", value="5",
                                                          id="minutes")),
                   tags.label("Device name (optional) ", tags.input(name="device_name",
                                                                    id="device_name")),
                   tags.label("For user (optional) ", tags.input(name="paired_for",
                                                                 id="paired_for"))),
            tags.p(tags.button("Open pairing window", type="submit")),
            method="post", action="/admin/devices/pairing")]
        return await self._render(request, "Devices", *out)

    async def pairing(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        form = self._form(request)
        body: dict[str, Any] = {}
        try:
            if form.get("minutes"):
                body["minutes"] = float(form["minutes"])
        except ValueError:
            return await self.devices(request, tags.p("Minutes must be a number.",
                                                      class_="error", role="alert"))
        for key in ("device_name", "paired_for"):
            if form.get(key, "").strip():
                body[key] = form[key].strip()
        status, window = await self.api(request, "POST", "/admin/api/devices/pairing", body)
        if status != 201:
            return await self.devices(request, self._problem(status, window))
        host = self.parts.config.pairing.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - shown, not bound
            import socket

            host = socket.gethostname()
        text, svg = pairing_qr(host, window["port"], window["code"])
        notice = tags.section(
            tags.h2("Pairing window open", id="window"),
            tags.p("Code: ", tags.span(window["code"], class_="code", id="pairing-code")),
            tags.p(f"Port {window['port'] or '(opening)'} on {host}; open until "
                   f"{_when(window['expires_at'])}. One window at a time: this closed any "
                   "other."),
            tags.p("On the device: ", tags.code(
                f"aico-client pair --host {host} --port {window['port']} "
                f"--code {window['code']} --name NAME --out DIR")),
            tags.div(XMLString(svg).load(), class_="qr", id="pairing-qr"),
            tags.p("The QR code holds ", tags.code(text), class_="mute"),
            class_="notice", role="status", **{"aria-labelledby": "window"})
        return await self.devices(request, notice)

    async def revoke(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        device_id = request.path_params["device_id"]
        status, body = await self.api(request, "DELETE",
                                      f"/admin/api/devices/{quote(device_id, safe='')}")
        if status != 204:
            return await self.devices(request, self._problem(status, body))
        return await self.devices(request, tags.p(f"Device {device_id} revoked.",
                                                  class_="notice", role="status"))

    # -- users ---------------------------------------------------------------------------

    async def users(self, request: Request, notice: Any = None) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login()
        status, body = await self.api(request, "GET", "/admin/api/users")
        out: list[Any] = [notice] if notice is not None else []
        if status != 200:
            out.append(self._problem(status, body))
            return await self._render(request, "Users", *out)
        rows = []
        for u in body["users"]:
            verb = "enable" if u["disabled"] else "disable"
            rows.append([tags.strong(u["username"]), ", ".join(u["roles"]),
                         tags.span("disabled", class_="bad") if u["disabled"]
                         else tags.span("active", class_="ok"),
                         tags.form(self._csrf(session),
                                   tags.button(verb.capitalize(), type="submit",
                                               **{"aria-label": f"{verb} {u['username']}"}),
                                   method="post",
                                   action=f"/admin/users/{quote(u['username'], safe='')}/{verb}")])
        out.append(_table(["User", "Roles", "State", ""], rows))
        out += [tags.h2("Create a user", id="create"), tags.form(
            self._csrf(session),
            tags.p(tags.label("User name ", tags.input(name="username", required="required",
                                                       autocomplete="off", id="new-username")),
                   tags.label("Password ", tags.input(name="password", type="password",
                                                      required="required",
                                                      autocomplete="new-password",
                                                      id="new-password")),
                   tags.label("Roles (comma-separated) ", tags.input(name="roles", value="user",
                                                                     id="new-roles"))),
            tags.p(tags.button("Create", type="submit")),
            method="post", action="/admin/users")]
        return await self._render(request, "Users", *out)

    async def user_create(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        form = self._form(request)
        roles = [r.strip() for r in form.get("roles", "").split(",") if r.strip()]
        status, body = await self.api(request, "POST", "/admin/api/users", {
            "username": form.get("username", ""), "password": form.get("password", ""),
            "roles": roles})
        if status not in (200, 201):
            return await self.users(request, self._problem(status, body))
        return await self.users(request, tags.p(f"User {form.get('username')} created.",
                                                class_="notice", role="status"))

    async def _set_disabled(self, request: Request, disabled: bool) -> Response:
        if self._session(request) is None:
            return self._to_login()
        name = request.path_params["username"]
        status, body = await self.api(request, "PATCH",
                                      f"/admin/api/users/{quote(name, safe='')}",
                                      {"disabled": disabled})
        if status != 200:
            return await self.users(request, self._problem(status, body))
        return await self.users(request, tags.p(
            f"User {name} {'disabled' if disabled else 'enabled'}.", class_="notice",
            role="status"))

    def user_disable(self, request: Request) -> Deferred[Response]:
        return Deferred.fromCoroutine(self._set_disabled(request, True))

    def user_enable(self, request: Request) -> Deferred[Response]:
        return Deferred.fromCoroutine(self._set_disabled(request, False))

    # -- audit ---------------------------------------------------------------------------

    async def audit(self, request: Request) -> Response:
        if self._session(request) is None:
            return self._to_login()
        status_v, verify = await self.api(request, "GET", "/admin/api/audit/verify")
        status, body = await self.api(request, "GET", "/admin/api/audit",
                                      query={"limit": "100"})
        out: list[Any] = [tags.h2("Chain", id="chain")]
        if status_v != 200:
            out.append(self._problem(status_v, verify))
        elif verify["ok"]:
            out.append(tags.p(tags.strong("Verified", class_="ok"),
                              f": {verify['checked']} entries, the hash chain is intact.",
                              id="verify"))
        else:
            out.append(tags.p(tags.strong("BROKEN", class_="bad"),
                              f" at entry {verify['first_bad_seq']}: {verify['reason']} "
                              f"({verify['checked']} checked).", id="verify", role="alert"))
        out.append(tags.h2("Newest entries", id="entries"))
        if status != 200:
            out.append(self._problem(status, body))
        else:
            out.append(_table(["#", "Time", "Event", "Actor", "Detail"], [
                [str(e["seq"]), _when(e["ts"]), tags.strong(e["event"]), e["actor"],
                 tags.code(json.dumps(e["detail"], sort_keys=True))]
                for e in body["entries"]]))
        return await self._render(request, "Audit", *out)
