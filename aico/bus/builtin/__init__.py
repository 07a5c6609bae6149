"""The backend modules the gateway ships, so that ``make run`` works alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IReactorTime

from aico.bus.builtin.conversation import ConversationModule
from aico.bus.builtin.health import HealthModule
from aico.bus.interfaces import IMessageBus
from aico.bus.module import BackendModule

ModuleFactory = Callable[[IMessageBus, IReactorTime], BackendModule]

#: name → ``factory(bus, clock)`` of every built-in module.
BUILTIN_MODULES: Mapping[str, ModuleFactory] = {
    "conversation": ConversationModule,
    "health": HealthModule,
}

__all__ = ["BUILTIN_MODULES", "ConversationModule", "HealthModule", "ModuleFactory"]
