"""The message bus's parts as child services: broker, bus client, module directory, module.

Any process that runs bus parts (the gateway, ``aico-module``) puts these in its service
tree, in this order, under a :class:`~aico.services.SequentialMultiService`: each starts
once the one before it is up and they stop in reverse order.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from aico.bus.broker import EmbeddedBroker
from aico.bus.client import BusClient
from aico.bus.directory import ModuleDirectory
from aico.bus.errors import BusError, BusTimeout
from aico.bus.interfaces import IMessageBus
from aico.bus.module import BackendModule
from aico.services import CallbackService, PeriodicJob, SequentialMultiService

__all__ = ["BrokerService", "BusService", "BusStartError", "DirectoryService", "ModuleService"]


class BusStartError(BusError):
    """The bus client could not reach the broker; the message names the endpoints."""


class BrokerService(Service):
    """The embedded broker: binds in ``privilegedStartService`` (a bind failure stops the
    process before the reactor runs), ends its threads in ``stopService``."""

    name = "broker"

    def __init__(self, broker: EmbeddedBroker, reactor: Any) -> None:
        self.broker = broker
        self.reactor = reactor

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.broker.start()  # raises BrokerBindError naming the address

    def abort(self) -> None:
        """Undo the bind (a later part of the start-up failed)."""
        if self.broker.running:
            self.broker.stop()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if not self.broker.running:
            return succeed(None)
        # Joining the proxy thread blocks: on a pool thread, not the reactor's.
        d: Deferred[None] = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                              self.broker.stop)
        return d


class BusService(Service):
    """A bus client: ``startService`` fires once the client hears itself through the
    broker (or fails with :class:`BusStartError` naming the endpoints).

    With the embedded *broker* (bound on ``*`` ports, say), the client takes the
    endpoints the broker actually bound.
    """

    name = "bus"

    def __init__(self, bus: IMessageBus, broker: EmbeddedBroker | None = None) -> None:
        self.bus = bus
        self.broker = broker

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        if self.broker is not None and isinstance(self.bus, BusClient):
            self.bus.pub_endpoint = self.broker.pub_endpoint
            self.bus.sub_endpoint = self.broker.sub_endpoint
        return self.bus.start().addErrback(self._not_started)

    def _not_started(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, BusTimeout) and isinstance(self.bus, BusClient):
            timeout = error.timeout
            raise BusStartError(
                f"the message bus at {self.bus.pub_endpoint} / {self.bus.sub_endpoint} did not "
                f"answer within {timeout:g} s") from error
        failure.raiseException()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.bus.stop()


class DirectoryService(Service):
    """The module directory: asks every module to register once the bus is up."""

    name = "directory"

    def __init__(self, directory: ModuleDirectory) -> None:
        self.directory = directory
        # Subscriptions made before the bus starts are in place once its start fires.
        directory.subscribe()

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        return self.directory.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.directory.stop()


class ModuleService(SequentialMultiService):
    """One backend module in this process: started on a bus that already runs (it shares
    the host's bus client), then its heartbeat as a :class:`~aico.services.PeriodicJob`
    child (an error in one beat is logged; the next one goes out as usual)."""

    def __init__(self, module: BackendModule, clock: IReactorTime) -> None:
        super().__init__()
        self.setName(module.name)  # type: ignore[no-untyped-call]
        self.module = module
        CallbackService(
            "module", lambda: module.start(start_bus=False, heartbeat=False), module.stop,
        ).setServiceParent(self)  # type: ignore[no-untyped-call]
        if module.heartbeat_interval > 0:
            PeriodicJob("heartbeat", module.heartbeat_interval, module.beat,
                        clock).setServiceParent(self)  # type: ignore[no-untyped-call]
