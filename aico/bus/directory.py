"""The gateway's view of the backend modules on the bus.

:class:`ModuleDirectory` listens to registrations and heartbeats, tells observers when a
module registers (``"registered"``) and when it is dropped (``"dropped"``: three heartbeat
intervals without a heartbeat), and asks every module to register again on start.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from aico.bus.errors import BusTimeout
from aico.bus.interfaces import (
    TOPIC_DISCOVER,
    TOPIC_HEARTBEAT,
    TOPIC_REGISTERED,
    IBusControl,
    IMessageBus,
)
from aico.proto import (
    AicoMessage,
    EnvelopeError,
    ModuleHeartbeat,
    ModuleRegistration,
    Route,
    unpack,
    wrap,
)

#: Heartbeat intervals without a heartbeat after which a module is dropped.
MISSED_HEARTBEATS = 3

EVENT_REGISTERED = "registered"
EVENT_DROPPED = "dropped"


@dataclass(frozen=True)
class ModuleInfo:
    """What the directory knows about one module (a new object on every change)."""

    name: str
    version: str
    registration: ModuleRegistration
    alive: bool
    #: Clock time of the last registration or heartbeat.
    last_seen: float
    #: Clock time of the last registration.
    registered_at: float

    @property
    def routes(self) -> list[Route]:
        return list(self.registration.routes)

    @property
    def admin_routes(self) -> list[Route]:
        return list(self.registration.admin_routes)

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats (0: the module sends none and is never dropped)."""
        return self.registration.heartbeat_interval_ms / 1000.0

    @property
    def health_topic(self) -> str:
        return self.registration.health_topic


Observer = Callable[[str, ModuleInfo], None]


class ModuleDirectory:
    """Registered modules, kept alive by heartbeats; *clock* drives every deadline."""

    log = Logger()

    def __init__(self, bus: IMessageBus, clock: IReactorTime) -> None:
        self._bus = bus
        self._clock = clock
        self._modules: dict[str, ModuleInfo] = {}
        self._deadlines: dict[str, IDelayedCall] = {}
        self._observers: list[Observer] = []
        self._last_discover: float | None = None
        self._subscribed = False

    @property
    def modules(self) -> Mapping[str, ModuleInfo]:
        """Every module seen so far, alive or not, by name (read-only view)."""
        return types.MappingProxyType(self._modules)

    def alive(self) -> list[ModuleInfo]:
        """The modules currently alive, by name."""
        return [info for _, info in sorted(self._modules.items()) if info.alive]

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(event, info)`` on every ``registered`` and ``dropped`` event."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def subscribe(self) -> None:
        """Subscribe to registrations and heartbeats (idempotent).

        Call this before the bus client starts so the subscriptions are known to the
        broker by the time ``start()`` publishes the discovery request.
        """
        if not self._subscribed:
            self._bus.subscribe(TOPIC_REGISTERED, self._on_registered)
            self._bus.subscribe(TOPIC_HEARTBEAT, self._on_heartbeat)
            self._subscribed = True

    def start(self) -> Deferred[None]:
        """Subscribe (if not yet) and ask every module to register again.

        On a running :class:`~aico.bus.client.BusClient` it first waits until the
        subscriptions have propagated, so no answer to the discovery request is lost.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.subscribe()
        if IBusControl.providedBy(self._bus):
            control = cast(IBusControl, self._bus)
            if control.running:
                try:
                    await control.wait_subscribed([TOPIC_REGISTERED, TOPIC_HEARTBEAT])
                except BusTimeout:
                    self.log.warn("module directory: subscriptions not confirmed in time")
        self.discover()

    def stop(self) -> None:
        """Unsubscribe and cancel every deadline; the known modules stay as they are."""
        if self._subscribed:
            self._bus.unsubscribe(TOPIC_REGISTERED, self._on_registered)
            self._bus.unsubscribe(TOPIC_HEARTBEAT, self._on_heartbeat)
            self._subscribed = False
        for call in self._deadlines.values():
            if call.active():
                call.cancel()
        self._deadlines.clear()

    def discover(self) -> None:
        """Publish ``system/module/discover/v1``; modules answer by registering again."""
        self._last_discover = self._clock.seconds()
        self._bus.publish(TOPIC_DISCOVER, wrap(ModuleHeartbeat(name=self._bus.source), self._bus.source))

    def _notify(self, event: str, info: ModuleInfo) -> None:
        for observer in list(self._observers):
            try:
                observer(event, info)
            except Exception:
                self.log.failure(
                    "module directory observer failed on {event} {name}",
                    event=event,
                    name=info.name,
                )

    def _on_registered(self, topic: str, message: AicoMessage) -> None:
        try:
            registration = unpack(message, ModuleRegistration)
        except EnvelopeError as e:
            self.log.warn("ignored a malformed module registration: {error}", error=str(e))
            return
        if not registration.name:
            self.log.warn("ignored a module registration without a name")
            return
        now = self._clock.seconds()
        previous = self._modules.get(registration.name)
        info = ModuleInfo(
            name=registration.name,
            version=registration.version,
            registration=registration,
            alive=True,
            last_seen=now,
            registered_at=now,
        )
        self._modules[registration.name] = info
        self._arm(info)
        if previous is None or not previous.alive:
            self.log.info(
                "module {name} {version} registered with {count} routes",
                name=info.name,
                version=info.version,
                count=len(registration.routes),
            )
        self._notify(EVENT_REGISTERED, info)

    def _on_heartbeat(self, topic: str, message: AicoMessage) -> None:
        try:
            heartbeat = unpack(message, ModuleHeartbeat)
        except EnvelopeError as e:
            self.log.warn("ignored a malformed module heartbeat: {error}", error=str(e))
            return
        info = self._modules.get(heartbeat.name)
        if info is None or not info.alive:
            # A module we do not know (we started after it) or dropped (it stalled and
            # came back): ask for registrations, at most once per second.
            now = self._clock.seconds()
            if self._last_discover is None or now - self._last_discover >= 1.0:
                self.discover()
            return
        info = replace(info, last_seen=self._clock.seconds())
        self._modules[info.name] = info
        self._arm(info)

    def _arm(self, info: ModuleInfo) -> None:
        call = self._deadlines.pop(info.name, None)
        if call is not None and call.active():
            call.cancel()
        if info.heartbeat_interval > 0:
            self._deadlines[info.name] = self._clock.callLater(
                MISSED_HEARTBEATS * info.heartbeat_interval, self._drop, info.name
            )

    def _drop(self, name: str) -> None:
        self._deadlines.pop(name, None)
        info = self._modules.get(name)
        if info is None or not info.alive:
            return
        info = replace(info, alive=False)
        self._modules[name] = info
        self.log.warn(
            "module {name} dropped: no heartbeat for {count} intervals",
            name=name,
            count=MISSED_HEARTBEATS,
        )
        self._notify(EVENT_DROPPED, info)
