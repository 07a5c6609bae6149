"""The gateway process: one ``MultiService`` that owns every listener and the bus.

``startService`` binds every listener synchronously — a listener that cannot bind
stops the process with a message naming the address and exit status 3 — then starts
the bus client, the module directory and the built-in modules, and finally writes
``STATE_DIR/ports.json``. ``stopService`` stops accepting, lets in-flight requests
finish (``gateway.shutdown_grace``), then closes the bus and the broker.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico.bus.broker import EmbeddedBroker
from aico.bus.builtin import BUILTIN_MODULES
from aico.bus.client import BusClient, CurveClientKeys
from aico.bus.directory import ModuleDirectory
from aico.bus.errors import BrokerBindError
from aico.gateway.config import Config, ConfigError, load
from aico.gateway.config import reload as reload_config
from aico.gateway.lifecycle import SignalHook, write_ports
from aico.gateway.state import StatePaths


class ListenerError(Exception):
    """A listener that is not a TCP port (e.g. IPC) could not bind; names the address."""


class Wiring(Protocol):
    """What the service needs from the assembled gateway (built in ``tap.py``)."""

    def listeners(self) -> dict[str, tuple[str, int, IProtocolFactory]]: ...
    def bind(self, tcp: dict[str, dict[str, Any]]) -> dict[str, Any]: ...
    def start(self) -> Deferred[None]: ...
    def drain(self, grace: float) -> Deferred[None]: ...
    def stop(self) -> Deferred[None]: ...
    def reconfigure(self, config: Config) -> None: ...


#: Builds the gateway's routes, security chain and adapters around a started bus.
WireFactory = Callable[[Config, StatePaths, Any, BusClient, ModuleDirectory], Wiring]


class StartupError(SystemExit):
    """Ends twistd with a non-zero status before the reactor runs."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(3)


class GatewayService(MultiService):
    """Everything one ``twistd aico-gateway`` process runs."""

    log = Logger()

    def __init__(self, config: Config, state_dir: Path, reactor: Any, wire: WireFactory,
                 config_path: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wire = wire
        self.config = config
        self.paths = StatePaths(state_dir)
        self.reactor = reactor
        self.config_path = config_path
        self.broker: EmbeddedBroker | None = None
        self.bus: BusClient | None = None
        self.directory: ModuleDirectory | None = None
        self.modules: list[Any] = []
        self.gateway: Wiring | None = None
        self.ports: dict[str, IListeningPort] = {}
        #: ports.json entries of the listeners that are not TCP ports (``ipc``).
        self.extra_ports: dict[str, Any] = {}
        self.ready: Deferred[None] = Deferred()
        self._hooks: list[SignalHook] = []
        self._stopping = False
        self._stopped: Deferred[None] | None = None

    # ------------------------------------------------------------------ start

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            self._bind()
        except StartupError as e:
            self.log.critical("{message}", message=e.message)
            self._abort()
            raise
        self._hooks.append(SignalHook(self.reactor, signal.SIGHUP, self.reload))
        # SPEC §1: SIGTERM is an orderly stop with exit status 0. twistd's own handler
        # would re-raise the signal after shutdown (death by signal, status -15), so ours
        # replaces it once the reactor runs.
        self.reactor.callWhenRunning(self._take_sigterm)
        d = ensureDeferred(self._start_async())
        d.addCallbacks(self._started, self._start_failed)

    def _take_sigterm(self) -> None:
        if not self._stopping:
            self._hooks.append(SignalHook(self.reactor, signal.SIGTERM, self._terminate))

    def _terminate(self) -> None:
        self.log.info("SIGTERM: finishing in-flight requests, then stopping")
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def _bind(self) -> None:
        c = self.config
        pub, sub = c.bus.pub, c.bus.sub
        if c.bus.embedded_broker:
            self.broker = EmbeddedBroker(self.paths.curve, pub, sub)
            try:
                self.broker.start()
            except BrokerBindError as e:
                raise StartupError(f"cannot start the message bus: {e}") from e
            pub, sub = self.broker.pub_endpoint, self.broker.sub_endpoint
        keys = CurveClientKeys.from_layout(self.paths.curve, "gateway")
        self.bus = BusClient(self.reactor, "gateway", pub, sub, keys,
                             default_timeout=c.bus.request_timeout, start_timeout=30.0)
        self.directory = ModuleDirectory(self.bus, self.reactor)
        self.gateway = self.wire(self.config, self.paths, self.reactor, self.bus, self.directory)
        for name, (host, port, factory) in self.gateway.listeners().items():
            try:
                self.ports[name] = self.reactor.listenTCP(port, factory, interface=host)
            except CannotListenError as e:
                raise StartupError(
                    f"cannot listen on {host}:{port} for the {name!r} listener: "
                    f"{getattr(e.socketError, 'strerror', e.socketError)}"
                ) from e
        tcp = {}
        for name, listening in self.ports.items():
            address = listening.getHost()
            tcp[name] = {"host": address.host, "port": address.port}  # type: ignore[attr-defined]
        try:
            self.extra_ports = self.gateway.bind(tcp)
        except ListenerError as e:
            raise StartupError(str(e)) from e

    async def _start_async(self) -> None:
        assert self.bus is not None and self.directory is not None
        # Subscriptions made before the bus starts are in place once start() fires.
        self.directory.subscribe()
        await self.bus.start()
        await self.directory.start()
        if self.config.modules.in_process:
            # In-process built-in modules share the gateway's bus client; their requests
            # still make the full round trip through the broker.
            for name in self.config.modules.builtin:
                module = BUILTIN_MODULES[name](self.bus, self.reactor)
                self.modules.append(module)
                await module.start(start_bus=False)
        assert self.gateway is not None
        await self.gateway.start()
        # File I/O off the reactor thread: ports.json says "ready" only once written.
        await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), write_ports,
                                self.paths.ports_json, self.port_map())

    def port_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, port in self.ports.items():
            address = port.getHost()
            out[name] = {"host": address.host, "port": address.port}  # type: ignore[attr-defined]
        out.update(self.extra_ports)
        assert self.bus is not None
        out["bus"] = {"pub": self.bus.pub_endpoint, "sub": self.bus.sub_endpoint}
        return out

    def _started(self, _: object) -> None:
        ports = self.port_map()
        http = ports.get("http")
        url = f"http://{http['host']}:{http['port']}" if http else ""
        ipc = ports.get("ipc") or {}
        self.log.info(
            "aico-gateway ready: REST {url}/api/v1/health, OpenAPI {url}/openapi.json, "
            "WebSocket {ws}/ws, IPC {ipc}; state in {state}; the bootstrap admin password "
            "is in {password_file}",
            url=url or "(http off)",
            ws=url.replace("http://", "ws://") or "(http off)",
            ipc=" and ".join(v for v in (ipc.get("endpoint"), ipc.get("fallback")) if v) or "off",
            state=str(self.paths.root),
            password_file=str(self.paths.admin_password),
        )
        self.ready.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("the gateway could not start", failure)
        self.ready.errback(failure)
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def _abort(self) -> None:
        for port in self.ports.values():
            port.stopListening()
        if self.gateway is not None:
            self.gateway.stop()
        if self.broker is not None:
            self.broker.stop()

    # ------------------------------------------------------------------ reload

    def reload(self) -> Deferred[None]:
        """SIGHUP: re-read the config file and apply the keys marked reloadable."""
        if self.config_path is None:
            self.log.info("SIGHUP: no config file to reload (running on defaults)")
            if self.gateway is not None:
                self.gateway.reconfigure(self.config)
            return succeed(None)
        path = self.config_path
        d: Deferred[Config] = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load, path)

        def apply(new: Config) -> None:
            result = reload_config(self.config, new)
            live, restart = result.live, result.restart
            if restart:
                self.log.warn("config reload: {keys} change only on restart", keys=", ".join(restart))
            self.config = result.config
            if self.gateway is not None:
                self.gateway.reconfigure(self.config)
            self.log.info("config reloaded from {path}: {keys}", path=path,
                          keys=", ".join(live) or "no live changes")

        def refused(failure: Failure) -> None:
            failure.trap(ConfigError)
            self.log.error("config reload refused, keeping the running config: {error}",
                           error=str(failure.value))

        return d.addCallback(apply).addErrback(refused)

    # ------------------------------------------------------------------ stop

    def stopService(self) -> Deferred[None]:
        # Idempotent: a second call (twistd's shutdown after a test or an operator already
        # stopped it) waits for the same stop.
        if self._stopped is not None:
            waiter: Deferred[None] = Deferred()

            def release(result: object) -> object:
                waiter.callback(None)
                return result

            self._stopped.addBoth(release)
            return waiter
        self._stopping = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stopped = ensureDeferred(self._stop_async())
        return self._stopped

    async def _stop_async(self) -> None:
        await DeferredList([maybeDeferred(p.stopListening) for p in self.ports.values()])
        if self.gateway is not None:
            await self.gateway.drain(self.config.gateway.shutdown_grace)
        for module in reversed(self.modules):
            await maybeDeferred(module.stop)
        if self.directory is not None:
            self.directory.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.bus is not None:
            await self.bus.stop()
        if self.broker is not None:
            broker = self.broker
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), broker.stop)
        await maybeDeferred(super().stopService)
