"""Errors raised by the message bus."""

from __future__ import annotations


class BusError(Exception):
    """Base class of every message-bus error."""


class BusTimeout(BusError):
    """A bus request (or the client's start-up probe) got no reply in time."""

    def __init__(self, topic: str, timeout: float) -> None:
        super().__init__(f"no reply on bus topic {topic!r} within {timeout:g} s")
        self.topic = topic
        self.timeout = timeout


class BusStopped(BusError):
    """The bus client was stopped (or not started) while a request was pending."""

    def __init__(self, detail: str = "the bus client is stopped") -> None:
        super().__init__(detail)


class BrokerBindError(BusError):
    """The embedded broker could not bind one of its endpoints."""

    def __init__(self, address: str, reason: str = "") -> None:
        message = f"the message-bus broker cannot bind {address}"
        if reason:
            message += f": {reason}"
        super().__init__(message)
        self.address = address
        self.reason = reason
