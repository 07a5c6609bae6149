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

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage

from aico.bus.client import BusClient
from aico.bus.directory import ModuleDirectory
from aico.gateway import config as configuration
from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.api.health.dependencies import HealthDeps
from aico.gateway.api.health.router import routes as health_routes
from aico.gateway.config import Config, ConfigError
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.backend import BusForwarder, entries_from_registration
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.table import RouteConflict, RouteTable
from aico.gateway.service import GatewayService
from aico.gateway.state import StatePaths, bootstrap, resolve_state_dir


class Options(usage.Options):
    """``twistd aico-gateway [--config FILE] [--state-dir DIR]``."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (docs/configuration.md)."],
        ["state-dir", "s", None, "State directory (default: $AICO_STATE_DIR, "
         "[gateway] state_dir, then the platform's data directory)."],
    ]

    def postOptions(self) -> None:  # noqa: N802 - Twisted's name
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
        self.forwarder = BusForwarder(bus, self._alive, lambda: self.config.bus.request_timeout,
                                      reactor)
        health = HealthDeps(bus=bus, clock=reactor, modules=lambda: directory.modules,
                            deadline=lambda: self.config.bus.health_deadline)
        self.dispatcher = Dispatcher(RouteTable(health_routes(health)))
        directory.add_observer(self._on_module)
        self.rest = RestAdapter(self.dispatcher, "http", inflight=self.inflight)
        self.http_site = GatewaySite(
            self.rest.resource(),
            body_limit=lambda: self.config.limits.body_max,
            header_limits=lambda: (self.config.limits.header_count, self.config.limits.header_size),
        )

    def _alive(self, module: str) -> bool:
        info = self.directory.modules.get(module)
        return info is not None and info.alive

    def _on_module(self, event: str, info: Any) -> None:
        if event != "registered":
            return
        try:
            entries = entries_from_registration(info.name, list(info.registration.routes),
                                                self.forwarder)
            table = self.dispatcher.table.with_routes(info.name, entries)
        except (RouteConflict, ValueError) as e:
            self.log.error("routes of module {module} refused: {error}", module=info.name,
                           error=str(e))
            return
        self.dispatcher.set_table(table)
        self.log.info("module {module} {version} serves {count} route(s)", module=info.name,
                      version=info.version, count=len(entries))

    def listeners(self) -> dict[str, tuple[str, int, IProtocolFactory]]:
        out: dict[str, tuple[str, int, IProtocolFactory]] = {}
        if self.config.http.enabled:
            out["http"] = (self.config.http.host, self.config.http.port, self.http_site)
        return out

    def start(self) -> Deferred[None]:
        return succeed(None)

    def drain(self, grace: float) -> Deferred[None]:
        return self.inflight.drained(self.reactor, grace)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def reconfigure(self, config: Config) -> None:
        self.config = config


def build_service(config: Config, state_dir: Path, reactor: Any = None,
                  config_path: str | None = None) -> GatewayService:
    """Bootstrap *state_dir* and assemble the service (tests call this directly)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    bootstrap(state_dir, config.modules.builtin)
    return GatewayService(config, state_dir, reactor, Gateway, config_path=config_path)


def makeService(options: Options) -> GatewayService:  # noqa: N802 - twistd's name
    config: Config = options.config
    state_dir = resolve_state_dir(options["state-dir"], os.environ, config.gateway.state_dir)
    return build_service(config, state_dir, config_path=options["config"])
