"""What the health domain needs from the rest of the gateway."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from aico.bus.interfaces import IMessageBus
from aico.proto import ModuleRegistration


class ModuleView(Protocol):
    """The parts of a module directory entry the health check reads."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    @property
    def registration(self) -> ModuleRegistration: ...


@dataclass(frozen=True)
class HealthDeps:
    bus: IMessageBus
    clock: IReactorTime
    modules: Callable[[], Mapping[str, ModuleView]]
    #: Seconds to wait for module answers (docs/rest.md § Fan-out: the whole check answers within 2 s).
    deadline: Callable[[], float]
