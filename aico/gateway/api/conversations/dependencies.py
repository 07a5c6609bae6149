"""What the conversations domain needs from the rest of the gateway."""

from __future__ import annotations

from dataclasses import dataclass

from aico.gateway.routing.backend import BusForwarder


@dataclass(frozen=True)
class ConversationsDeps:
    #: Sends a request over the bus and knows which topics a live module serves.
    forwarder: BusForwarder
