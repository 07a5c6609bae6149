"""The composition root: the one place where the gateway's parts are built and wired.

* :class:`Materials` — what the parts are made from that lives outside the code: the JWT
  keyring, the registry database, the password service, the Curve keys, file paths.
  :func:`materials_from_state` reads them from a state directory; the in-memory test
  layer (:mod:`aico.gateway.testing.memory`) makes them in memory.
* :class:`GatewayParts` — everything the listeners serve, around one message bus: route
  table and dispatcher, security chain, domains, connection manager, the REST/WebSocket
  site and the IPC listener, the access log. No lifecycle of its own beyond
  :meth:`~GatewayParts.start` and :meth:`~GatewayParts.stop`.
* :func:`build_tree` — the service tree (``docs/architecture.md`` draws it) whose order
  is the start order: thread pool, security state, broker, bus, module directory,
  built-in modules, connections, listeners, periodic jobs, then ``ports.json``.
* :func:`compose` — all of the above for one state directory; ``makeService`` calls it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from aico.bus.broker import EmbeddedBroker
from aico.bus.builtin import BUILTIN_MODULES
from aico.bus.client import BusClient, CurveClientKeys
from aico.bus.curve import load_public
from aico.bus.directory import ModuleDirectory
from aico.bus.interfaces import IMessageBus
from aico.bus.module import BackendModule
from aico.bus.service import BrokerService, BusService, DirectoryService, ModuleService
from aico.gateway.access import AccessLog
from aico.gateway.adapters.ipc import IpcListener
from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.adapters.session import SessionServices
from aico.gateway.adapters.websocket import websocket_resource
from aico.gateway.admin.hosts import host_allowed
from aico.gateway.admin.logbuffer import LogBuffer
from aico.gateway.api.conversations.dependencies import ConversationsDeps
from aico.gateway.api.conversations.router import routes as conversation_routes
from aico.gateway.api.devices.dependencies import DevicesDeps
from aico.gateway.api.devices.router import routes as device_routes
from aico.gateway.api.health.dependencies import HealthDeps
from aico.gateway.api.health.router import routes as health_routes
from aico.gateway.api.sync.dependencies import SyncDeps
from aico.gateway.api.sync.router import routes as sync_routes
from aico.gateway.api.transport.dependencies import TransportDeps
from aico.gateway.api.transport.router import routes as transport_routes
from aico.gateway.api.users.dependencies import UsersDeps
from aico.gateway.api.users.router import routes as user_routes
from aico.gateway.config import Config, ConfigError, LimitsSection, Reload, load
from aico.gateway.config import reload as reload_config
from aico.gateway.connections import ConnectionManager
from aico.gateway.devices.ca import DeviceCA, load_certificate, load_private_key
from aico.gateway.devices.mdns import MdnsAdvertiser, should_advertise
from aico.gateway.devices.pairing import PairingService
from aico.gateway.devices.registry import ChangeWatcher, DeviceStore, PairingWindowStore
from aico.gateway.lifecycle import InFlight, write_ports
from aico.gateway.listeners import IListener, TcpListener, tcp_endpoint
from aico.gateway.logs import fast_access_lines
from aico.gateway.metrics import GatewayMetrics, StateCollector
from aico.gateway.routing.backend import BusForwarder, ModuleRoutes
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.openapi import OpenApiView
from aico.gateway.routing.table import RouteEntry, RouteTable
from aico.gateway.security import validate
from aico.gateway.security.audit import AuditLog
from aico.gateway.security.chain import SecurityChain
from aico.gateway.security.keys import KeyRing, KeyRingError
from aico.gateway.security.passwords import PasswordService, thread_pool_runner
from aico.gateway.security.ratelimit import GcraLimiter
from aico.gateway.security.tokens import SqliteRevocationStore, TokenService
from aico.gateway.service import GatewayService, ListenerGroup, ProcessExit, StartupError
from aico.gateway.state import ADMIN_USERNAME, StateDirError, StatePaths, bootstrap
from aico.gateway.store import Database, SchemaError
from aico.gateway.tls import (
    DeviceGate,
    DeviceSite,
    DeviceTLSFactory,
    device_id_of_request,
    device_id_of_transport,
    server_options,
)
from aico.gateway.users import UserStore
from aico.net import is_loopback
from aico.services import CallbackService, PeriodicJob, SequentialMultiService, ThreadPoolService
from aico.sync.engine import SyncEngine, bus_publisher, memory_node_id
from aico.sync.store import SyncStore

__all__ = ["GatewayParts", "Materials", "build_tree", "compose", "materials_from_state"]

log = Logger(namespace="aico.gateway.composition")

#: Seconds between prunes of expired token revocations.
TOKEN_PRUNE_INTERVAL = 3600.0
#: Seconds between two looks for registry changes made by another process (a device
#: revoked or a pairing window opened from the CLI takes effect within this time).
REGISTRY_WATCH_INTERVAL = 0.25


@dataclass
class Materials:
    """What the gateway's parts are made from that lives outside the code."""

    keyring: KeyRing
    database: Any  # DatabaseLike with close()
    passwords: PasswordService
    #: The gateway's Z85 Curve public key (``curve/gateway.key``), "" when unknown.
    curve_public: str = ""
    #: The state directory's paths; ``None`` in memory (no IPC, no files).
    paths: StatePaths | None = None
    #: Where the audit log's head is anchored after every append.
    audit_anchor: Path | None = None
    #: The thread pool that runs CPU work (Argon2), when the gateway owns one.
    cpu_pool: ThreadPool | None = field(default=None)
    #: The device CA (issues device certificates at pairing); ``None`` in memory.
    device_ca: DeviceCA | None = None
    #: The gateway's TLS server certificate and key (``tls``, ``sync``); ``None`` in memory.
    server_identity: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None


def materials_from_state(paths: StatePaths, reactor: Any) -> Materials:
    """Read the keys and open the registry of a bootstrapped state directory.

    *paths* carries the keystore that the bootstrap opened (``report.paths``); the private
    keys are decrypted with it. Raises ``SystemExit`` with one line naming the file (exit
    status 1) for a key or file that cannot be read or decrypted: this runs in
    ``makeService``, before twistd's logging starts, so the line goes to standard error.
    """
    try:
        keystore = paths.sealer
        keyring = KeyRing.load(paths.jwt_dir, keystore, now=reactor.seconds())
        curve_public = load_public(paths.curve.gateway_public).decode()
        device_ca = DeviceCA.load(paths.ca_cert, paths.ca_key, keystore)
        server_identity = (load_certificate(paths.server_cert),
                           load_private_key(paths.server_key, keystore))
    except (KeyRingError, OSError, ValueError) as e:
        raise SystemExit(f"aico-gateway: cannot load the gateway's keys: {e}") from e
    pool = ThreadPool(minthreads=0, maxthreads=max(2, os.cpu_count() or 2), name="aico-cpu")
    return Materials(
        keyring=keyring,
        database=Database(paths.registry_db, reactor),
        passwords=PasswordService(thread_pool_runner(reactor, pool)),
        curve_public=curve_public,
        paths=paths,
        audit_anchor=paths.root / "audit-head.json",
        cpu_pool=pool,
        device_ca=device_ca,
        server_identity=server_identity,
    )


class GatewayParts:
    """Everything the listeners serve, around one bus client and one module directory."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any, bus: IMessageBus,
                 directory: ModuleDirectory, materials: Materials) -> None:
        self.config = config
        self.reactor = reactor
        self.bus = bus
        self.directory = directory
        self.materials = materials
        #: Requests in progress on every listener (SIGTERM's drain waits for them).
        self.inflight = InFlight()
        #: The config file the gateway runs from (``None``: defaults only); the admin API
        #: changes it and ``SIGHUP`` re-reads it.
        self.config_path: str | None = None
        self.version = _version()
        #: Recent log lines for the admin API (added to the log publisher at start).
        self.log_buffer = LogBuffer()

        # Security: tokens, passwords, rate limits, audit log.
        self.db = materials.database
        self.revocations = SqliteRevocationStore(self.db, reactor)
        self.tokens = TokenService(materials.keyring, config.auth, reactor, self.revocations)
        self.audit = AuditLog(self.db, reactor, anchor_path=materials.audit_anchor)
        self.limiter = GcraLimiter.from_config(reactor, config.ratelimit, on_block=self._blocked)
        self.passwords = materials.passwords
        self.passwords.limit(config.auth.password_concurrency, config.auth.password_queue)
        self.chain = SecurityChain(self.tokens, self.limiter, lambda: self.config)
        self.access_log = AccessLog(reactor, lambda: self.config.logging.access)
        #: One dispatcher for every adapter; module routes join the table as modules come.
        self.dispatcher = Dispatcher(RouteTable(), self.chain.steps(), clock=reactor,
                                     observers=[self.access_log.record])
        #: Every live WebSocket and IPC connection; revoked tokens close their sockets.
        self.connections = ConnectionManager(reactor, bus)

        #: What every WebSocket and IPC session shares (the session layer).
        self.sessions = SessionServices(self.dispatcher, self.chain, self.connections,
                                        self.inflight, lambda: self.config.limits, reactor)

        # Routing: the gateway's own domains, then module routes as modules register.
        self.openapi = OpenApiView(lambda: self.dispatcher.table, _version())
        self.ipc = self._ipc_listener()
        #: The users table; its session generations feed the token service at start.
        self.user_store = UserStore(self.db, reactor)
        #: Paired devices and pairing windows (detached mode); the watcher tells the
        #: gateway when another process (the CLI) changed the registry.
        self.devices = DeviceStore(self.db, reactor)
        self.pairing_windows = PairingWindowStore(self.db, reactor)
        self.registry_watcher = ChangeWatcher(self.db)
        #: The registry in memory for the tls listener (the hot path never waits on
        #: SQLite), its live connections per device, and revocation that cuts them.
        self.device_gate = DeviceGate(self.devices, reactor,
                                      close_sessions=self.connections.close_device)
        self.chain.devices = self.device_gate.lookup
        self.registry_watcher.add_listener(self.device_gate.refresh)
        #: Every listener's ``ports.json`` entry, once they are up.
        self.listener_addresses: dict[str, dict[str, Any]] = {}
        #: Pairing windows and the ``pairing`` listener open while one is.
        self.pairing = self._pairing_service()
        self.registry_watcher.add_listener(self.pairing.refresh)
        #: The sync engine (docs/sync.md): always built, so the data API works on a
        #: gateway without peers too; the ``sync`` listener exists only with [sync] enabled.
        self.sync = self._sync_engine()
        users = UsersDeps(store=self.user_store, passwords=self.passwords,
                          tokens=self.tokens, chain=self.chain, audit=self.audit, clock=reactor,
                          config=lambda: self.config, on_revoke=self.connections.revoke_token,
                          on_revoke_subject=self.connections.revoke_subject,
                          on_revoke_family=self.connections.revoke_family,
                          on_password_changed=self.forget_bootstrap_password)
        #: Whether STATE_DIR/initial-admin-password is there (checked at start, cleared
        #: when it is removed); the "ready" line names the file only while it is.
        self.bootstrap_password_present = False
        self.http_addresses: dict[str, dict[str, Any]] = {}
        ca = materials.device_ca
        transport = TransportDeps(
            tls_address=lambda: self.http_addresses.get("tls"),
            ca_fingerprint=lambda: ca.fingerprint if ca is not None else "",
            ipc_endpoints=lambda: self.ipc.endpoints if self.ipc is not None else {},
            curve_server_key=lambda: materials.curve_public,
            ipc_curve=lambda: self.config.ipc.curve,
            http_bases=lambda: {name: f"{'https' if name == 'tls' else 'http'}://"
                                      f"{a['host']}:{a['port']}"
                                for name, a in self.http_addresses.items()},
            version=_version(),
        )
        self.module_routes = ModuleRoutes(directory, self.dispatcher, [], validate.prepare)
        self.forwarder = BusForwarder(bus, self.module_routes.served,
                                      lambda: self.config.bus.request_timeout, reactor)
        health = HealthDeps(bus=bus, clock=reactor, modules=lambda: directory.modules,
                            deadline=lambda: self.config.bus.health_deadline)
        self.own_routes: list[RouteEntry] = validate.prepare([
            *health_routes(health),
            *conversation_routes(ConversationsDeps(self.forwarder)),
            *user_routes(users),
            *transport_routes(transport),
            *device_routes(DevicesDeps(device=self.device_gate.known)),
            *sync_routes(SyncDeps(engine=self.sync)),
            self.openapi.entry(),
        ])
        self.module_routes.own_routes = self.own_routes
        self.module_routes.attach(self.forwarder)

        # Adapters: REST and WebSocket on the http site, IPC on its own sockets.
        ws, self.ws_factory = websocket_resource(self.sessions, lambda: self.config.websocket)
        self.rest = RestAdapter(self.dispatcher, "http", websocket=ws, inflight=self.inflight,
                                host_allowed=self._http_host_allowed)
        self.http_site = GatewaySite(self.rest.resource(), **self.site_options(self.dispatcher))

        # Detached mode: the tls listener serves the same routes, chain and WebSocket
        # adapter (WSS) over mutual TLS 1.3; its device is the principal.
        wss, self.wss_factory = websocket_resource(
            self.sessions, lambda: self.config.websocket, transport_name="wss",
            device_id_of=device_id_of_transport,
            device_principal=lambda did: (self.chain.device_principal(d)
                                          if (d := self.device_gate.known(did)) else None))
        self.tls_rest = RestAdapter(self.dispatcher, "tls", websocket=wss, inflight=self.inflight,
                                    identify=device_id_of_request)
        self.tls_site = DeviceSite(self.tls_rest.resource(), gate=self.device_gate,
                                   **self.site_options(self.dispatcher))

        # Metrics (docs/metrics.md): events counted as they happen, state read at scrape
        # time; the admin site serves ``self.metrics.resource()`` at /admin/metrics.
        pool = materials.cpu_pool
        self.metrics = GatewayMetrics(reactor, StateCollector(
            connections=lambda: self.connections,
            http_sites=lambda: {"http": self.http_site, "tls": self.tls_site},
            directory=directory, limiter=lambda: self.limiter, audit=self.audit),
            formatter=(lambda f: deferToThreadPool(reactor, pool, f)) if pool is not None else None)
        self.dispatcher.observers.append(self.metrics.observe_request)
        self.forwarder.on_round_trip = self.metrics.observe_round_trip

        # The admin site: its own listener, dispatcher and routes (docs/admin.md).
        from aico.gateway.admin.site import AdminSite

        admin_remote = not is_loopback(config.admin.host)
        self.admin = AdminSite(self, Reloader(self, None),
                               identify=device_id_of_request if admin_remote else None,
                               gate=self.device_gate if admin_remote else None)

        #: Sync with paired gateways (docs/sync-protocol.md), with ``[sync] enabled``:
        #: the ``sync`` listener's factory, one reconnecting client per peer, and the
        #: pairing listener's answer to ``aico-gateway sync join``.
        self.sync_service = self._sync_service()

    def site_options(self, dispatcher: Dispatcher) -> dict[str, Any]:
        """What every HTTP site (``http``, ``tls``, ``admin``) is bounded by: the live
        ``[limits]`` and the dispatcher whose requests it finishes."""
        def limits() -> LimitsSection:  # read at each use: [limits] is reloadable
            return self.config.limits

        return dict(
            body_limit=lambda: limits().body_max,
            header_limits=lambda: (limits().header_count, limits().header_size),
            head_timeout=lambda: limits().head_timeout,
            body_timeout=lambda: limits().body_timeout,
            reactor=self.reactor,
            finished=dispatcher.finished,
        )

    def _http_host_allowed(self, host: str | None) -> bool:
        """The DNS-rebinding guard of the ``http`` listener, while it is on loopback."""
        http = self.config.http
        return not is_loopback(http.host) or host_allowed(host, http.allowed_hosts)

    def run_blocking(self, fn: Any, *args: Any) -> Deferred[Any]:
        """Run blocking work (file I/O) off the reactor thread; in memory (no thread
        pool of the gateway's own) on the calling thread."""
        if self.materials.cpu_pool is None:
            return maybeDeferred(fn, *args)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _ipc_listener(self) -> IpcListener | None:
        paths = self.materials.paths
        ipc = self.config.ipc
        if paths is None or not (ipc.endpoint or ipc.fallback):
            return None
        return IpcListener(self.sessions, paths.curve, ipc.endpoint, ipc.fallback, ipc.curve,
                           self.reactor)

    def _pairing_service(self) -> PairingService:
        pool = self.materials.cpu_pool
        reactor = self.reactor

        def run_cpu(fn: Any, *args: Any) -> Deferred[Any]:
            if pool is None:  # in memory: synchronous, as everything there
                return maybeDeferred(fn, *args)
            return deferToThreadPool(reactor, pool, fn, *args)

        def listen(factory: Any) -> Deferred[Any]:
            cfg = self.config.pairing
            d: Deferred[Any] = tcp_endpoint(reactor, cfg.host, cfg.port).listen(factory)
            return d

        identity = self.materials.server_identity
        return PairingService(reactor, lambda: self.config.pairing, self.pairing_windows,
                              self.devices, self.audit, self.materials.device_ca,
                              identity[0] if identity is not None else None, listen, run_cpu,
                              tls_address=lambda: self.listener_addresses.get("tls"),
                              baseline=self.registry_watcher.check,
                              on_paired=self.device_gate.remember)

    def _sync_engine(self) -> SyncEngine:
        """The sync engine on the registry; its node name is this gateway's device CA's
        ID (stable for the state directory; a random one in memory)."""
        ca = self.materials.device_ca
        pool = self.materials.cpu_pool
        reactor = self.reactor

        def run_cpu(fn: Any, *args: Any) -> Deferred[Any]:
            if pool is None:
                return maybeDeferred(fn, *args)
            return deferToThreadPool(reactor, pool, fn, *args)

        return SyncEngine(SyncStore(self.db, reactor.seconds),
                          ca.fingerprint if ca is not None else memory_node_id(),
                          lambda: self.config.sync, reactor.seconds,
                          publish=bus_publisher(self.bus), run_cpu=run_cpu)

    def _sync_service(self) -> Any:
        if not self.config.sync.enabled:
            return None
        from aico.keystore import Keystore
        from aico.sync.join import JoinHost
        from aico.sync.peers import PeerStore
        from aico.sync.service import SyncService

        m = self.materials
        engine = getattr(self, "sync", None)  # the engine (aico.sync.engine), when built
        if engine is None:
            from aico.sync.testing import MemoryEngine

            engine = MemoryEngine(m.device_ca.fingerprint if m.device_ca else "memory",
                                  {name: (c.peers or None) for name, c in
                                   self.config.sync.collections.items() if c.sync})
        keystore = m.paths.sealer if m.paths is not None else Keystore.ephemeral()
        peers = PeerStore(self.db, self.reactor)
        service = SyncService(engine, peers, keystore, self.device_gate, self.reactor,
                              config=lambda: self.config.sync,
                              identity=m.device_ca.fingerprint if m.device_ca else "")
        self.registry_watcher.add_listener(service.refresh)
        close_sessions = self.device_gate.close_sessions

        def close_device(device_id: str) -> int:  # revoked: its sync connections go too
            return close_sessions(device_id) + service.close_device(device_id)

        self.device_gate.close_sessions = close_device
        if m.device_ca is not None:
            import socket

            pool = m.cpu_pool
            reactor = self.reactor

            def run_cpu(fn: Any, *args: Any) -> Deferred[Any]:
                if pool is None:
                    return maybeDeferred(fn, *args)
                return deferToThreadPool(reactor, pool, fn, *args)

            self.pairing.sync_join = JoinHost(
                m.device_ca, self.devices, self.pairing_windows, peers, keystore, self.audit,
                name=f"aico-gateway {socket.gethostname()}"[:64], node_id=m.device_ca.fingerprint,
                sync_address=lambda: self.listener_addresses.get("sync"), run_cpu=run_cpu,
                on_device=self.device_gate.remember, on_peer=service.refresh)
        return service

    def mdns(self) -> MdnsAdvertiser | None:
        """The mDNS advertiser, when ``[mdns]`` and the listeners' hosts ask for one."""
        if not should_advertise(self.config):
            return None
        return MdnsAdvertiser(self.reactor, self.config, self.pairing,
                              lambda: self.listener_addresses)

    def _blocked(self, client: str, tier: str, seconds: float) -> None:
        self.metrics.blocked(client, tier, seconds)
        d = self.audit.append("client_blocked", client, {"tier": tier, "seconds": seconds})
        d.addErrback(lambda f: self.log.failure("could not audit a block", f))

    # ------------------------------------------------------------------ what the tree runs

    def listeners(self) -> list[IListener]:
        """Every listener the config enables, in binding order."""
        out: list[IListener] = []
        http = self.config.http
        if http.enabled:
            out.append(TcpListener("http", tcp_endpoint(self.reactor, http.host, http.port),
                                   self.http_site, describe=f"{http.host}:{http.port}",
                                   close=self._close_http))
        tls = self.config.tls
        m = self.materials
        if tls.enabled and m.device_ca is not None and m.server_identity is not None:
            options = server_options(m.device_ca.cert, *m.server_identity)
            out.append(TcpListener("tls", tcp_endpoint(self.reactor, tls.host, tls.port),
                                   DeviceTLSFactory(options, self.tls_site, self.device_gate),
                                   describe=f"{tls.host}:{tls.port}", close=self._close_tls))
        if self.ipc is not None:
            out.append(self.ipc)
        sync = self.config.sync
        if (self.sync_service is not None and m.device_ca is not None
                and m.server_identity is not None):
            from aico.sync.service import SyncTLSFactory

            options = server_options(m.device_ca.cert, *m.server_identity)
            listener = TcpListener("sync", tcp_endpoint(self.reactor, sync.host, sync.port),
                                   SyncTLSFactory(options, self.sync_service.server),
                                   describe=f"{sync.host}:{sync.port}", close=self._close_sync)
            out.append(listener)
            # Relayed sessions on which we play the TLS server run what this listener runs;
            # mDNS advertises the port it bound (bound before the sync service starts).
            self.sync_service.server_options = options
            self.sync_service.listen_port = lambda: int(listener.address().get("port", 0))
        admin = self.admin_listener()
        if admin is not None:
            out.append(admin)
        return out

    def admin_listener(self) -> IListener | None:
        """The ``admin`` listener: on loopback, plain HTTP; elsewhere only with
        ``allow_remote = true``, and then only over mutual TLS with the device CA (a
        device trusted ``admin`` is needed for every request: :mod:`aico.gateway.admin`)."""
        admin = self.config.admin
        if not admin.enabled:
            return None
        endpoint = tcp_endpoint(self.reactor, admin.host, admin.port)
        describe = f"{admin.host}:{admin.port}"
        if is_loopback(admin.host):
            return TcpListener("admin", endpoint, self.admin.site, describe=describe,
                               close=self._close_admin)
        m = self.materials
        if not admin.allow_remote:
            raise StartupError(f"aico-gateway: admin.host {admin.host!r} is not a loopback "
                               "address and admin.allow_remote is not set")
        if m.device_ca is None or m.server_identity is None:
            raise StartupError("aico-gateway: admin.allow_remote needs the device CA and the "
                               "server certificate (mutual TLS); refusing to serve the admin "
                               "site without them")
        options = server_options(m.device_ca.cert, *m.server_identity)
        site = self.admin.site
        assert isinstance(site, DeviceSite)
        return TcpListener("admin", endpoint, DeviceTLSFactory(options, site, self.device_gate),
                           describe=describe, close=self._close_admin)

    def _close_admin(self) -> Deferred[None]:
        return self.admin.site.close_connections(self.reactor)

    def _close_sync(self) -> Deferred[None]:
        self.sync_service.server.close_all()
        return succeed(None)

    def _close_tls(self) -> Deferred[None]:
        """As ``http``: WSS sockets closed (1001), HTTPS connections gracefully."""
        self.wss_factory.close_all()
        return self.tls_site.close_connections(self.reactor)

    def _close_http(self) -> Deferred[None]:
        """After the drain: WebSockets are closed (1001), HTTP connections gracefully."""
        self.ws_factory.close_all()
        return self.http_site.close_connections(self.reactor)

    def jobs(self) -> list[PeriodicJob]:
        """The periodic jobs (each logs its errors and keeps running)."""
        jobs = [
            PeriodicJob("token-prune", TOKEN_PRUNE_INTERVAL, self.tokens.prune, self.reactor),
            PeriodicJob("ratelimit-sweep", self.limiter.sweep_interval, self.limiter.sweep,
                        self.reactor),
        ]
        if self.materials.paths is not None:
            jobs.append(PeriodicJob("registry-watch", REGISTRY_WATCH_INTERVAL,
                                    self.registry_watcher.check, self.reactor))
        if self.ipc is not None:
            jobs.append(PeriodicJob("ipc-peer-sweep", self.ipc.sweep_interval, self.ipc.sweep,
                                    self.reactor))
        return jobs

    def start(self) -> Deferred[None]:
        """Load the revocation state and the session generations; prepare the password service."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        globalLogPublisher.addObserver(self.log_buffer)
        await self.revocations.load()
        self.tokens.load_generations(await self.user_store.session_generations())
        # The watcher's first look only records the registry's version: take it before
        # the devices are read, so a change the CLI commits from now on is never missed.
        await self.registry_watcher.check()
        await self.device_gate.load()
        await self.sync.start()
        await self.passwords.prepare()
        await self.metrics.start()
        await self._check_bootstrap_password()

    async def _check_bootstrap_password(self) -> None:
        """At start: remove the bootstrap admin's password file if it no longer opens
        ``admin`` (its password was changed, or ``admin`` is gone)."""
        paths = self.materials.paths
        if paths is None:
            return
        pool = self.reactor.getThreadPool()
        try:
            password = await deferToThreadPool(self.reactor, pool, _read_secret,
                                               paths.admin_password)
            if password is None:
                return
            self.bootstrap_password_present = True
            admin = await self.user_store.get(ADMIN_USERNAME)
            valid = admin is not None and await self.passwords.verify(admin.password_hash,
                                                                      password)
            del password
            if not valid:
                await self.forget_bootstrap_password(ADMIN_USERNAME)
        except Exception:
            self.log.failure("could not check the bootstrap admin password file")

    def forget_bootstrap_password(self, username: str) -> Deferred[None]:
        """``admin`` has a password of its own (or is gone): remove the bootstrap
        password file (in the thread pool), so no stale secret stays on disk."""
        paths = self.materials.paths
        if username != ADMIN_USERNAME or paths is None:
            return succeed(None)
        path = paths.admin_password
        d: Deferred[bool] = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                              _remove, path)

        def removed(gone: bool) -> None:
            self.bootstrap_password_present = False
            if gone:
                self.log.info("removed {path}: the admin has a password of their own",
                              path=str(path))

        def failed(f: Failure) -> None:
            self.log.failure("could not remove {path}", f, path=str(path))

        return d.addCallbacks(removed, failed)

    def stop(self) -> Deferred[None]:
        """Flush pending writes and close the registry."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        globalLogPublisher.removeObserver(self.log_buffer)
        self.device_gate.stop()
        await self.revocations.flush()
        self.db.close()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (only its reloadable keys differ)."""
        self.config = config
        self.tokens.update(config.auth)
        self.limiter.update_from_config(config.ratelimit)
        self.passwords.limit(config.auth.password_concurrency, config.auth.password_queue)
        self.reload_keys()

    def reload_keys(self) -> Deferred[None]:
        """Re-read the JWT keyring (in a thread): a rotated key starts signing."""
        paths = self.materials.paths
        if paths is None:
            return succeed(None)
        d: Deferred[KeyRing] = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                 KeyRing.load, paths.jwt_dir, paths.sealer,
                                                 self.reactor.seconds())

        def use(ring: KeyRing) -> None:
            if ring.current_kid != self.tokens.keyring.current_kid:
                self.log.info("JWT signing key is now {kid}", kid=ring.current_kid)
            self.tokens.set_keyring(ring)

        def failed(f: Failure) -> None:
            self.log.failure("could not reload the JWT keyring; keeping the old one", f)

        return d.addCallbacks(use, failed)


class Reloader:
    """``SIGHUP``: re-read the config file and apply the keys marked reloadable."""

    log = Logger()

    def __init__(self, parts: GatewayParts, config_path: str | None) -> None:
        self.parts = parts
        if config_path is not None:
            parts.config_path = config_path

    @property
    def config_path(self) -> str | None:
        return self.parts.config_path

    def reload_now(self) -> Deferred[Reload]:
        """Re-read and apply the config file; fails with ``ConfigError`` (nothing changed)
        for an invalid one. ``POST /admin/api/config/reload`` calls this."""
        parts = self.parts
        path = self.config_path
        if path is None:
            self.log.info("reload: no config file to reload (running on defaults)")
            parts.reconfigure(parts.config)
            return succeed(Reload(parts.config, [], []))
        d: Deferred[Config] = parts.run_blocking(load, path)

        def apply(new: Config) -> Reload:
            result = reload_config(parts.config, new)
            if result.restart:
                self.log.warn("config reload: {keys} change only on restart",
                              keys=", ".join(result.restart))
            parts.reconfigure(result.config)
            self.log.info("config reloaded from {path}: {keys}", path=path,
                          keys=", ".join(result.live) or "no live changes")
            return result

        def refused(failure: Failure) -> Failure:
            failure.trap(ConfigError)
            self.log.error("config reload refused, keeping the running config: {error}",
                           error=str(failure.value))
            return failure

        return d.addCallback(apply).addErrback(refused)

    def __call__(self) -> Deferred[None]:
        """``SIGHUP``: :meth:`reload_now`, an invalid file logged and kept out."""
        d = self.reload_now()
        d.addErrback(lambda f: f.trap(ConfigError))
        return d.addCallback(lambda _: None)


def build_tree(
    parts: GatewayParts,
    *,
    bus: IMessageBus,
    directory: ModuleDirectory,
    broker: EmbeddedBroker | None = None,
    modules: Sequence[BackendModule] = (),
    ports_file: Path | None = None,
    reload: Any = None,
    on_fatal: Any = None,
    signals: bool = True,
) -> GatewayService:
    """The service tree, children in start order (``docs/architecture.md``)."""
    reactor = parts.reactor
    root = GatewayService(reactor, reload=reload, on_fatal=on_fatal, signals=signals)
    root.parts = parts

    def add(child: Any, parent: Any = root) -> Any:
        child.setServiceParent(parent)
        return child

    if parts.materials.cpu_pool is not None:
        add(ThreadPoolService("cpu-pool", parts.materials.cpu_pool))
    # First: the revocation state is loaded before the first request can be read.
    add(CallbackService("security", parts.start, parts.stop))
    if broker is not None:
        add(BrokerService(broker, reactor))
    add(BusService(bus, broker))
    add(DirectoryService(directory))
    group = SequentialMultiService()
    group.setName("modules")  # type: ignore[no-untyped-call]
    add(group)
    for module in modules:
        add(ModuleService(module, reactor), group)
    add(CallbackService("connections", None, parts.connections.stop))
    listeners = add(ListenerGroup(parts.listeners(), parts.inflight, reactor,
                                  lambda: parts.config.gateway.shutdown_grace))
    add(parts.pairing)
    if parts.sync_service is not None:
        add(parts.sync_service)
    jobs = MultiService()
    jobs.setName("jobs")
    add(jobs)
    for job in parts.jobs():
        add(job, jobs)

    # ports.json names the pairing listener while it is open (its port is picked when a
    # window opens): rewritten on each change once the file exists, writes in order.
    written: dict[str, Any] = {}
    writes: list[Deferred[None]] = []

    def write_now() -> Deferred[None]:
        assert ports_file is not None
        snapshot = dict(written)
        prev = writes[-1] if writes else succeed(None)
        d: Deferred[None] = prev.addBoth(lambda _: deferToThreadPool(
            reactor, reactor.getThreadPool(), write_ports, ports_file, snapshot))
        writes[:] = [d]
        return d

    def pairing_address(port: int | None) -> dict[str, Any]:
        return {"host": parts.config.pairing.host, "port": port}

    def pairing_changed(is_open: bool, port: int | None) -> None:
        if not written:
            return  # before ready(): it writes the pairing listener too
        if is_open and port:
            written["pairing"] = pairing_address(port)
        else:
            written.pop("pairing", None)
        write_now().addErrback(lambda f: log.failure("could not update ports.json", f))

    parts.pairing.observers.append(pairing_changed)

    def ready() -> Deferred[None]:
        ports = listeners.addresses()
        parts.http_addresses = {k: v for k, v in ports.items() if k in ("http", "tls")}
        parts.listener_addresses = dict(ports)
        if isinstance(bus, BusClient):
            ports["bus"] = {"pub": bus.pub_endpoint, "sub": bus.sub_endpoint}
        if parts.pairing.listening_port:
            ports["pairing"] = pairing_address(parts.pairing.listening_port)
        d: Deferred[None]
        if ports_file is None:
            d = succeed(None)
        else:
            # File I/O off the reactor thread: ports.json says "ready" only once written.
            written.update(ports)
            d = write_now()
        d.addCallback(lambda _: _announce(ports, parts))
        if root.settle_heap:
            d.addCallback(lambda _: _settle())
        return d

    add(CallbackService("ports-file", ready))
    advertiser = parts.mdns()
    if advertiser is not None:
        add(advertiser)
    return root


def _read_secret(path: Path) -> str | None:
    """The stripped text of *path*, ``None`` when it does not exist (blocking)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _remove(path: Path) -> bool:
    """Delete *path*; False when it was already gone (blocking)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _settle() -> None:
    # twistd's text log exists by now (it is made after makeService): access lines get
    # their direct format there (logs.AccessLineFormat, docs/performance.md).
    fast_access_lines()
    settle_heap()  # looked up at call time, so a test can watch it


def settle_heap() -> None:
    """Once the gateway is up: collect, then move every object alive now (modules, route
    table, compiled validators, keys: ~90,000 objects) out of the garbage collector's
    reach with ``gc.freeze()``.

    Measured under ``make bench``'s REST load before this (docs/performance.md, "Tail
    latency"): a full (generation-2) collection ran every ~2 s, because the objects of
    the 64 requests in flight survive the young collections and count toward the next
    full one, and each walked the whole startup heap — up to 191 ms with the reactor
    stopped, the largest single cause of the p99. Frozen objects are still freed by
    reference counting; only cycles among them would stay, and the startup heap holds
    none worth reclaiming.
    """
    gc.collect()
    gc.freeze()


def _announce(ports: dict[str, Any], parts: GatewayParts) -> None:
    http = ports.get("http")
    url = f"http://{http['host']}:{http['port']}" if http else ""
    ipc = ports.get("ipc") or {}
    paths = parts.materials.paths
    tls = ports.get("tls")
    # The password file is named only while it is there (it goes once the admin has a
    # password of their own).
    password = ("; the bootstrap admin password is in {password_file}"
                if paths is not None and parts.bootstrap_password_present else "")
    log.info(
        "aico-gateway ready: REST {url}/api/v1/health, OpenAPI {url}/openapi.json, "
        "WebSocket {ws}/ws, IPC {ipc}, detached mode (mutual TLS) {tls}; state in {state}"
        + password,
        url=url or "(http off)",
        ws=url.replace("http://", "ws://") or "(http off)",
        tls=f"https://{tls['host']}:{tls['port']} and wss://{tls['host']}:{tls['port']}/ws"
        if tls else "off",
        ipc=" and ".join(v for v in (ipc.get("endpoint"), ipc.get("fallback")) if v) or "off",
        state=str(paths.root) if paths else "(memory)",
        password_file=str(paths.admin_password) if paths else "(memory)",
    )


def compose(config: Config, state_dir: Path, reactor: Any = None,
            config_path: str | None = None) -> GatewayService:
    """Bootstrap *state_dir* and build the whole gateway for it (``makeService``)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        report = bootstrap(state_dir, config.modules.builtin)
    except (StateDirError, SchemaError, OSError) as e:
        raise SystemExit(f"aico-gateway: cannot prepare the state directory {state_dir}: {e}") from e
    paths = report.paths
    materials = materials_from_state(paths, reactor)
    c = config
    broker = EmbeddedBroker(paths.curve, c.bus.pub, c.bus.sub) if c.bus.embedded_broker else None
    try:
        keys = CurveClientKeys.from_layout(paths.curve, "gateway")
    except (OSError, ValueError) as e:
        raise SystemExit(f"aico-gateway: cannot load the gateway's bus keys: {e}") from e
    bus = BusClient(reactor, "gateway", c.bus.pub, c.bus.sub, keys,
                    default_timeout=c.bus.request_timeout, start_timeout=c.bus.start_timeout)
    directory = ModuleDirectory(bus, reactor)
    parts = GatewayParts(config, reactor, bus, directory, materials)
    modules = ([BUILTIN_MODULES[name](bus, reactor) for name in c.modules.builtin]
               if c.modules.in_process else [])
    return build_tree(parts, bus=bus, directory=directory, broker=broker, modules=modules,
                      ports_file=paths.ports_json, reload=Reloader(parts, config_path),
                      on_fatal=ProcessExit(reactor))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aico-gateway")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"

