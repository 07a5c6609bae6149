"""Every ``/admin/api/…`` route (``docs/admin.md`` lists them with examples).

Each route names an ``admin:`` capability (the ``admin`` role has them all; the security
chain grants ``admin:`` capabilities only over loopback or from an admin-trusted device)
and the ``admin`` rate-limit tier. The user routes are the users domain's own handlers
(``/api/v1/users``) mounted a second time: one implementation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from aico.files import write_atomic
from aico.gateway.admin.configedit import dumps, effective, merge
from aico.gateway.admin.logbuffer import LEVELS
from aico.gateway.config import ConfigError, from_mapping
from aico.gateway.config import reload as reload_config
from aico.gateway.errors import BadRequest, Conflict, NotFound, ValidationFailed
from aico.gateway.routing.messages import Request, Response, StreamBody, json_response
from aico.gateway.routing.table import RouteEntry

if TYPE_CHECKING:
    from aico.gateway.admin.site import AdminSite

__all__ = ["api_routes"]

OBJECT = {"type": "object"}
PAIRING = {
    "type": "object",
    "properties": {
        "minutes": {"type": "number", "exclusiveMinimum": 0, "maximum": 1440},
        "device_name": {"type": "string", "minLength": 1, "maxLength": 128},
        "paired_for": {"type": "string", "minLength": 1, "maxLength": 64},
    },
}


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value


def _level(request: Request) -> str:
    level = request.query.get("level", "debug").lower()
    if level not in LEVELS:
        raise BadRequest(f"level must be one of {', '.join(LEVELS)}")
    return level


def _actor(request: Request) -> str:
    return request.principal.subject if request.principal is not None else "?"


def api_routes(site: AdminSite) -> list[RouteEntry]:
    parts = site.parts

    # -- config ------------------------------------------------------------------------

    def get_config(request: Request) -> Response:
        return json_response({"config": effective(parts.config), "file": parts.config_path})

    async def patch_config(request: Request) -> Response:
        path = parts.config_path
        if path is None:
            raise Conflict("the gateway runs without a config file (no --config): start it "
                           "with one to change the config from the admin API")
        patch = request.json
        before: bytes = await parts.run_blocking(Path(path).read_bytes)
        try:
            data = tomllib.loads(before.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise Conflict(f"the config file cannot be read as TOML: {e}") from None
        merged = merge(data, patch)
        try:
            new = from_mapping(merged, path)
        except ConfigError as e:
            raise ValidationFailed([{"pointer": "/" + e.key.replace(".", "/"),
                                     "detail": e.problem}], detail=f"{e.key}: {e.problem}") from None
        try:
            text = dumps(merged)
        except ValueError as e:
            raise ValidationFailed([{"pointer": "", "detail": str(e)}]) from None
        result = reload_config(parts.config, new)
        mode = os.stat(path).st_mode & 0o777
        await parts.run_blocking(write_atomic, path, text.encode("utf-8"), mode)
        parts.reconfigure(result.config)
        await parts.audit.append("config_changed", _actor(request),
                                 {"live": result.live, "restart": result.restart})
        return json_response({"live": result.live, "restart": result.restart,
                              "config": effective(parts.config)})

    async def reload(request: Request) -> Response:
        try:
            result = await site.reloader.reload_now()
        except ConfigError as e:
            raise ValidationFailed([{"pointer": "/" + e.key.replace(".", "/"),
                                     "detail": e.problem}], detail=str(e)) from None
        return json_response({"file": parts.config_path, "live": result.live,
                              "restart": result.restart})

    # -- logs --------------------------------------------------------------------------

    def logs(request: Request) -> Response:
        limit = _int(request, "limit", 100, 1, site.log_buffer.capacity)
        return json_response({"entries": site.log_buffer.recent(limit, _level(request))})

    def tail(request: Request) -> Response:
        level = LEVELS.index(_level(request))
        limit = _int(request, "limit", 0, 0, 100_000)
        stream = StreamBody()
        sent = [0]

        def on_record(record: dict[str, Any]) -> None:
            if LEVELS.index(record["level"]) < level:
                return
            stream.push(b"data: " + json.dumps(record, separators=(",", ":")).encode())
            stream.push(b"")  # the adapter ends every chunk with LF: an empty line ends the event
            sent[0] += 1
            if limit and sent[0] >= limit:
                unsubscribe()
                stream.finish()

        unsubscribe = site.log_buffer.subscribe(on_record)
        stream.on_cancel = unsubscribe
        stream.push(b": aico-gateway log tail")
        stream.push(b"")
        return Response(status=200, body=b"", content_type="text/event-stream",
                        headers={"Cache-Control": "no-store"}, stream=stream)

    # -- devices -----------------------------------------------------------------------

    async def devices(request: Request) -> Response:
        listed = await parts.devices.list()
        return json_response({"devices": [
            {**d.public(), "connections": parts.device_gate.live(d.device_id)} for d in listed]})

    async def pairing(request: Request) -> Response:
        body = request.json or {}
        minutes = body.get("minutes")
        window = await parts.pairing.open_window(
            seconds=float(minutes) * 60 if minutes is not None else None,
            opened_by=_actor(request), device_name=body.get("device_name"),
            paired_for=body.get("paired_for"))
        return json_response({k: window[k] for k in ("code", "port", "expires_at", "window_id")},
                             status=201)

    async def revoke_device(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        device = await parts.devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id}")
        await parts.device_gate.revoke(device_id)
        await parts.audit.append("device_revoked", _actor(request),
                                 {"device_id": device_id, "name": device.name,
                                  "peer": request.peer_host, "transport": request.transport})
        return Response(status=204)

    # -- modules -----------------------------------------------------------------------

    def _module(name: str) -> Any:
        info = parts.directory.modules.get(name)
        if info is None:
            raise NotFound(f"no module {name}")
        return info

    def modules(request: Request) -> Response:
        mr = parts.module_routes
        out = []
        for info in parts.directory.modules.values():
            state = ("disabled" if info.name in mr.disabled
                     else "alive" if info.alive else "dropped")
            out.append({
                "name": info.name, "version": info.version, "health": state,
                "disabled": info.name in mr.disabled, "last_seen": info.last_seen,
                "registered_at": info.registered_at,
                "routes": [{"method": r.method, "path": r.path, "topic": r.topic,
                            "capability": r.capability, "public": r.public}
                           for r in info.routes if not r.path.startswith("/admin/")],
                "admin_routes": [{"method": e.method, "path": e.path,
                                  "capability": e.capability}
                                 for e in mr.admin_entries.get(info.name, [])],
            })
        return json_response({"modules": out})

    def disable(request: Request) -> Response:
        name = _module(request.path_params["name"]).name
        parts.module_routes.disable(name)
        return json_response({"name": name, "disabled": True})

    def enable(request: Request) -> Response:
        name = _module(request.path_params["name"]).name
        parts.module_routes.enable(name)
        return json_response({"name": name, "disabled": False})

    # -- audit -------------------------------------------------------------------------

    async def audit(request: Request) -> Response:
        limit = _int(request, "limit", 100, 1, 1000)
        if "after" in request.query:
            after = _int(request, "after", 0, 0, 2**62)
            entries = await parts.audit.list(limit, after)
            nxt = entries[-1].seq if len(entries) == limit else None
        else:
            entries = await parts.audit.latest(limit)
            nxt = None
        return json_response({"entries": [e.as_json() for e in entries], "next_after": nxt})

    async def audit_verify(request: Request) -> Response:
        return json_response((await parts.audit.verify()).as_json())

    # -- connections and rate limits --------------------------------------------------

    async def connections(request: Request) -> Response:
        tls = [{"device_id": d.device_id, "name": d.name,
                "connections": parts.device_gate.live(d.device_id)}
               for d in await parts.devices.list() if parts.device_gate.live(d.device_id)]
        return json_response({"sessions": parts.connections.snapshot(), "tls": tls})

    def ratelimits(request: Request) -> Response:
        limiter = parts.limiter
        limit = _int(request, "limit", 1000, 1, 100_000)
        tiers = {name: dataclasses.asdict(t) for name, t in limiter.tiers.items()}
        return json_response({"enabled": parts.config.ratelimit.enabled, "tiers": tiers,
                              "stats": limiter.stats(), "clients": limiter.snapshot(limit)})

    async def unblock(request: Request) -> Response:
        client = request.path_params["client"]
        if not parts.limiter.unblock(client):
            raise NotFound("no rate-limit state for this client")
        await parts.audit.append("client_unblocked", _actor(request),
                                 {"client": client, "peer": request.peer_host})
        return Response(status=204)

    # -- version and sync -------------------------------------------------------------

    def version(request: Request) -> Response:
        from aico.gateway.adapters.websocket import SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO
        from aico.proto import ApiRequest
        from aico.sync.protocol import MAJOR as SYNC_MAJOR
        from aico.sync.protocol import MINOR as SYNC_MINOR

        return json_response({
            "gateway": parts.version,
            "modules": {i.name: i.version for i in parts.directory.modules.values()},
            "protocols": {
                "proto_package": ApiRequest.DESCRIPTOR.file.package,
                "websocket_subprotocols": [SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO],
                "rest": "v1",
                "sync": f"{SYNC_MAJOR}.{SYNC_MINOR}",
            },
        })

    def sync(request: Request) -> Response:
        """Federated sync (docs/sync.md): this gateway's node, every collection it holds
        or configures with its policy, item count and Merkle root, and every peer with its
        device ID, state, how it is reached, its last round and each shared collection's
        root as this gateway holds it."""
        engine = parts.sync
        configured = parts.config.sync.collections
        counts = engine.counts()
        collections = {}
        for name in sorted(set(counts) | set(configured)):
            policy = engine.policy(name)
            collections[name] = {
                "sync": policy.sync, "strategy": policy.strategy,
                "peers": list(policy.peers) or "all",
                "items": counts.get(name, 0), "root": engine.root(name).hex(),
            }
        service = parts.sync_service
        return json_response({
            "enabled": parts.config.sync.enabled,
            "node_id": engine.node_id,
            "listener": parts.listener_addresses.get("sync"),
            "collections": collections,
            "peers": service.status() if service is not None else [],
        })

    def session(request: Request) -> Response:
        s = site.session_of(request)
        return json_response({
            "username": _actor(request), "roles": list(request.principal.roles)
            if request.principal else [],
            "csrf_token": s.csrf_token if s is not None else None,
            "expires_at": s.expires_at if s is not None else None,
        })

    # -- users: the users domain's handlers ---------------------------------------------

    users = []
    by_route = {(e.method, e.path): e for e in parts.own_routes}
    for method, path, new in (("GET", "/api/v1/users", "/admin/api/users"),
                              ("POST", "/api/v1/users", "/admin/api/users"),
                              ("PATCH", "/api/v1/users/{username}", "/admin/api/users/{username}"),
                              ("DELETE", "/api/v1/users/{username}",
                               "/admin/api/users/{username}")):
        users.append(dataclasses.replace(by_route[(method, path)], path=new, owner="admin",
                                         extra=dict(by_route[(method, path)].extra)))

    def metrics(request: Request) -> Deferred[Response]:
        d = parts.metrics.render(request.headers.get("accept", ""))
        return d.addCallback(lambda out: Response(status=200, body=out[0], content_type=out[1]))

    base = "/admin/api"

    def r(method: str, path: str, handler: Any, cap: str, summary: str, **kw: Any) -> RouteEntry:
        return RouteEntry(method, base + path, handler, owner="admin", capability=cap,
                          tier="admin", summary=summary, **kw)

    return [
        r("GET", "/session", session, "admin:site", "The caller, and the session's CSRF token"),
        r("GET", "/config", get_config, "admin:config",
          "The effective config, secrets redacted"),
        r("PATCH", "/config", patch_config, "admin:config",
          "Change the config file (JSON merge patch); live keys apply at once",
          request_schema=OBJECT),
        r("POST", "/config/reload", reload, "admin:config", "Re-read the config file (SIGHUP)"),
        r("GET", "/logs", logs, "admin:logs", "Recent log lines (?limit=&level=)"),
        r("GET", "/logs/tail", tail, "admin:logs",
          "New log lines as server-sent events (?level=&limit=)", streaming=True, raw_body=True),
        r("GET", "/devices", devices, "admin:devices", "Paired devices"),
        r("POST", "/devices/pairing", pairing, "admin:devices", "Open a pairing window",
          request_schema=PAIRING, success_status=201),
        r("DELETE", "/devices/{device_id}", revoke_device, "admin:devices",
          "Revoke a device (its connections are cut)", success_status=204),
        *users,
        r("GET", "/modules", modules, "admin:modules",
          "Registered modules: routes, health, versions"),
        r("POST", "/modules/{name}/disable", disable, "admin:modules",
          "Stop forwarding to a module (its routes answer 503)"),
        r("POST", "/modules/{name}/enable", enable, "admin:modules", "Forward to it again"),
        r("GET", "/audit", audit, "admin:audit", "The audit log (?limit=&after=)"),
        r("GET", "/audit/verify", audit_verify, "admin:audit", "Verify the audit chain"),
        r("GET", "/connections", connections, "admin:connections",
          "Live WebSocket/IPC sessions and TLS connections"),
        r("GET", "/ratelimits", ratelimits, "admin:ratelimits", "Rate-limit state per client"),
        r("DELETE", "/ratelimits/{client}", unblock, "admin:ratelimits",
          "Unblock a client (forget its rate-limit state)", success_status=204),
        r("GET", "/version", version, "admin:site", "Gateway, module and protocol versions"),
        r("GET", "/sync", sync, "admin:site", "Federated sync: collections, roots and peers"),
        RouteEntry("GET", "/admin/metrics", metrics, owner="admin", capability="admin:metrics",
                   tier="admin", summary="Prometheus metrics (docs/metrics.md)"),
    ]
