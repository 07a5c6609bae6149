"""All wiring in one place: ``twistd aico-gateway`` options, ``makeService``, the assembly.

``makeService`` resolves the state directory, bootstraps it (before the reactor runs),
and returns a :class:`~aico.gateway.service.GatewayService`; :class:`Gateway` builds
the route table, the security chain and the adapters around the bus. Tests call
:func:`build_service` with a config string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from aico.bus.client import BusClient
from aico.bus.curve import load_public
from aico.bus.directory import ModuleDirectory
from aico.gateway import config as configuration
from aico.gateway.adapters.ipc import IpcBindError, IpcListener
from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.adapters.websocket import websocket_resource
from aico.gateway.api.conversations.dependencies import ConversationsDeps
from aico.gateway.api.conversations.router import routes as conversation_routes
from aico.gateway.api.health.dependencies import HealthDeps
from aico.gateway.api.health.router import routes as health_routes
from aico.gateway.api.transport.dependencies import TransportDeps
from aico.gateway.api.transport.router import routes as transport_routes
from aico.gateway.api.users.dependencies import UsersDeps, UserStore
from aico.gateway.api.users.router import routes as user_routes
from aico.gateway.config import Config, ConfigError
from aico.gateway.connections import ConnectionManager
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.backend import BusForwarder, entries_from_registration
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.openapi import OpenApiView
from aico.gateway.routing.table import RouteConflict, RouteEntry, RouteTable
from aico.gateway.security import topics, validate
from aico.gateway.security.audit import AuditLog
from aico.gateway.security.chain import SecurityChain
from aico.gateway.security.keys import KeyRing
from aico.gateway.security.passwords import PasswordService, thread_pool_runner
from aico.gateway.security.ratelimit import GcraLimiter
from aico.gateway.security.tokens import SqliteRevocationStore, TokenService
from aico.gateway.service import GatewayService, ListenerError
from aico.gateway.state import StateDirError, StatePaths, bootstrap, resolve_state_dir
from aico.gateway.store import Database, SchemaError


class Options(usage.Options):
    """``twistd aico-gateway [--config FILE] [--state-dir DIR]``."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (docs/configuration.md)."],
        ["state-dir", "s", None, "State directory (default: $AICO_STATE_DIR, "
         "[gateway] state_dir, then the platform's data directory)."],
    ]

    def postOptions(self) -> None:
        try:
            self.config = (configuration.load(self["config"]) if self["config"]
                           else Config())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


class Gateway:
    """The gateway's routes, security chain and adapters around one bus client."""

    log = Logger()

    def __init__(self, config: Config, paths: StatePaths, reactor: Any, bus: BusClient,
                 directory: ModuleDirectory) -> None:
        self.config = config
        self.paths = paths
        self.reactor = reactor
        self.bus = bus
        self.directory = directory
        self.inflight = InFlight()
        self._served_topics: frozenset[str] = frozenset()
        self.forwarder = BusForwarder(bus, self._served, lambda: self.config.bus.request_timeout,
                                      reactor)
        health = HealthDeps(bus=bus, clock=reactor, modules=lambda: directory.modules,
                            deadline=lambda: self.config.bus.health_deadline)
        self.openapi = OpenApiView(lambda: self.dispatcher.table, _version())

        # Security: registry database, tokens, passwords, rate limits, audit log.
        self.db = Database(paths.registry_db, reactor)
        self.revocations = SqliteRevocationStore(self.db, reactor)
        self.tokens = TokenService(KeyRing.load(paths.jwt_dir, now=reactor.seconds()),
                                   config.auth, reactor, self.revocations)
        self.audit = AuditLog(self.db, reactor, anchor_path=paths.root / "audit-head.json")
        self.limiter = GcraLimiter.from_config(reactor, config.ratelimit, on_block=self._blocked)
        self.passwords = PasswordService(thread_pool_runner(reactor, reactor.getThreadPool()))
        self.chain = SecurityChain(self.tokens, self.limiter, lambda: self.config)
        #: One dispatcher for every adapter; its table is filled below and as modules come.
        self.dispatcher = Dispatcher(RouteTable(), self.chain.steps())
        #: Every live WebSocket and IPC connection; revoked tokens close their sockets.
        self.connections = ConnectionManager(reactor, bus)
        users = UsersDeps(store=UserStore(self.db, reactor), passwords=self.passwords,
                          tokens=self.tokens, chain=self.chain, audit=self.audit, clock=reactor,
                          config=lambda: self.config, on_revoke=self.connections.revoke_token,
                          on_revoke_subject=self.connections.revoke_subject,
                          on_revoke_family=self.connections.revoke_family)
        self.bound: dict[str, dict[str, Any]] = {}
        self.ipc = IpcListener(self.dispatcher, self._authenticate, topics.may_subscribe,
                               self.connections, paths.curve, config.ipc.endpoint,
                               config.ipc.fallback, config.ipc.curve, reactor,
                               inflight=self.inflight)
        # Read once, before the reactor runs: never a file read on the hot path.
        gateway_key = load_public(paths.curve.gateway_public).decode()
        transport = TransportDeps(
            ipc_endpoints=lambda: self.ipc.endpoints,
            curve_server_key=lambda: gateway_key,
            ipc_curve=lambda: self.config.ipc.curve,
            http_bases=self._http_bases,
            version=_version(),
        )
        self._prune = LoopingCall(self.tokens.prune)
        self._prune.clock = reactor

        #: The gateway's own domains; module routes are added next to them as modules come.
        self.own_routes: list[RouteEntry] = validate.prepare([
            *health_routes(health),
            *conversation_routes(ConversationsDeps(self.forwarder)),
            *user_routes(users),
            *transport_routes(transport),
            self.openapi.entry(),
        ])
        self.dispatcher.set_table(RouteTable(self.own_routes))
        directory.add_observer(self._on_module)
        ws, self.ws_factory = websocket_resource(
            self.dispatcher, self._authenticate, topics.may_subscribe, self.connections,
            lambda: self.config.websocket, reactor, inflight=self.inflight)
        self.rest = RestAdapter(self.dispatcher, "http", websocket=ws, inflight=self.inflight)
        self.http_site = GatewaySite(
            self.rest.resource(),
            body_limit=lambda: self.config.limits.body_max,
            header_limits=lambda: (self.config.limits.header_count, self.config.limits.header_size),
            head_timeout=lambda: self.config.limits.head_timeout,
        )

    def _authenticate(self, token: str) -> Any:
        """A bearer token → its principal (for the WebSocket ``auth`` frame and IPC)."""
        return self.chain.principal_for_token(token)[0]

    def _http_bases(self) -> dict[str, str]:
        return {name: f"http://{a['host']}:{a['port']}" for name, a in self.bound.items()
                if name == "http"}

    def _served(self, topic: str) -> bool:
        """Whether a live module serves *topic* (one of its routes names it)."""
        return topic in self._served_topics

    def _on_module(self, event: str, info: Any) -> None:
        # Topics served by live modules, recomputed on every registration and drop so that
        # the hot path is one set lookup.
        self._served_topics = frozenset(
            t.strip()
            for module in self.directory.modules.values() if module.alive
            for r in module.registration.routes
            for t in r.topic.split(",")
        )
        if event != "registered":
            return
        own = {(e.method, e.path): e for e in self.own_routes}
        try:
            entries = entries_from_registration(info.name, list(info.registration.routes),
                                                self.forwarder)
            # A module serving one of the gateway's own domain routes (same method, path
            # and topic) serves it under the gateway's contract; it adds no second route.
            entries = [e for e in entries
                       if not ((e.method, e.path) in own and own[(e.method, e.path)].topics == e.topics)]
            table = self.dispatcher.table.with_routes(info.name, validate.prepare(entries))
        except (RouteConflict, ValueError) as e:
            self.log.error("routes of module {module} refused: {error}", module=info.name,
                           error=str(e))
            return
        self.dispatcher.set_table(table)
        self.log.info("module {module} {version} serves {count} route(s)", module=info.name,
                      version=info.version, count=len(entries))

    def bind(self, tcp: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Bind what is not a TCP port (the IPC endpoints), after the TCP listeners."""
        self.bound = tcp
        try:
            self.ipc.start()
        except IpcBindError as e:
            raise ListenerError(str(e)) from e
        return {"ipc": dict(self.ipc.endpoints)} if any(self.ipc.endpoints.values()) else {}

    def listeners(self) -> dict[str, tuple[str, int, IProtocolFactory]]:
        out: dict[str, tuple[str, int, IProtocolFactory]] = {}
        if self.config.http.enabled:
            out["http"] = (self.config.http.host, self.config.http.port, self.http_site)
        return out

    def _blocked(self, client: str, tier: str, seconds: float) -> None:
        d = self.audit.append("client_blocked", client, {"tier": tier, "seconds": seconds})
        d.addErrback(lambda f: self.log.failure("could not audit a block", f))

    def start(self) -> Deferred[None]:
        async def go() -> None:
            await self.revocations.load()
            await self.passwords.prepare()
            self.limiter.start()
            self._prune.start(3600, now=False)

        return ensureDeferred(go())

    def drain(self, grace: float) -> Deferred[None]:
        return self.inflight.drained(self.reactor, grace)

    def stop(self) -> Deferred[None]:
        async def go() -> None:
            self.ws_factory.close_all(1001, "gateway stopping")
            await self.ipc.stop()
            self.connections.stop()
            self.limiter.stop()
            if self._prune.running:
                self._prune.stop()
            await self.revocations.flush()
            self.db.close()

        return ensureDeferred(go())

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.tokens.update(config.auth)
        self.limiter.update_from_config(config.ratelimit)
        self.reload_keys()

    def reload_keys(self) -> Deferred[None]:
        """Re-read the JWT keyring (in a thread): a rotated key starts signing."""
        from twisted.internet.threads import deferToThreadPool

        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), KeyRing.load,
                              self.paths.jwt_dir, self.reactor.seconds())

        def use(ring: KeyRing) -> None:
            if ring.current_kid != self.tokens.keyring.current_kid:
                self.log.info("JWT signing key is now {kid}", kid=ring.current_kid)
            self.tokens.set_keyring(ring)

        def failed(f: Any) -> None:
            self.log.failure("could not reload the JWT keyring; keeping the old one", f)

        return d.addCallbacks(use, failed)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aico-gateway")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def build_service(config: Config, state_dir: Path, reactor: Any = None,
                  config_path: str | None = None) -> GatewayService:
    """Bootstrap *state_dir* and assemble the service (tests call this directly)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        bootstrap(state_dir, config.modules.builtin)
    except (StateDirError, SchemaError, OSError) as e:
        raise SystemExit(f"aico-gateway: cannot prepare the state directory {state_dir}: {e}") from e
    return GatewayService(config, state_dir, reactor, Gateway, config_path=config_path)


def makeService(options: Options) -> GatewayService:
    config: Config = options.config
    state_dir = resolve_state_dir(options["state-dir"], os.environ, config.gateway.state_dir)
    return build_service(config, state_dir, config_path=options["config"])
