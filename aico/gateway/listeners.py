"""The listener abstraction: one shape for every way in (``http``, ``ipc``; later ``tls``,
``admin``, ``pairing``, ``sync``).

A listener (:class:`IListener`) has a name (its table in the config and its key in
``ports.json``), binds synchronously (:meth:`~IListener.listen`, so a listener that cannot
bind stops the process before anything else runs, with a message naming the address),
reports the address it bound (:meth:`~IListener.address`, the ``ports.json`` entry), and
stops in two steps on ``SIGTERM``: :meth:`~IListener.stop_accepting` (no new connections
or requests), then, once in-flight requests have finished or the grace period is over,
:meth:`~IListener.close_connections` (what is still open is closed).

:class:`~aico.gateway.service.ListenerGroup` runs those steps for every listener at once;
each listener is a child service of it. Adding a listener is one :class:`TcpListener`
(an endpoint and a factory) or one class providing :class:`IListener`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

__all__ = ["IListener", "ListenerError", "TcpListener", "tcp_endpoint"]


class ListenerError(Exception):
    """A listener could not bind; the message names the listener and the address."""


class IListener(Interface):
    """One way into the gateway (see the module docstring)."""

    name = Attribute("The listener's name: its config table and its key in ports.json.")

    def listen() -> Deferred[None] | None:
        """Bind now; raise :class:`ListenerError` naming the address when it cannot.

        Synchronous for every listener the gateway has (TCP ports and ZeroMQ sockets),
        so a bind failure stops the process before the reactor runs; an endpoint that
        binds asynchronously may return a Deferred instead.
        """

    def address() -> dict[str, Any]:
        """The ``ports.json`` entry of the bound listener (e.g. ``{"host", "port"}``)."""

    def stop_accepting() -> Deferred[None] | None:
        """Take no new connections or requests (first step of a stop)."""

    def close_connections() -> Deferred[None] | None:
        """Close the connections still open (after in-flight requests had their grace)."""


def tcp_endpoint(reactor: IReactorTCP, host: str, port: int) -> IStreamServerEndpoint:
    """The server endpoint for a ``host``/``port`` listener table (IPv6 when the host
    has a colon)."""
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, interface=host)
    return TCP4ServerEndpoint(reactor, port, interface=host)


@implementer(IListener)
class TcpListener:
    """A stream listener: an endpoint (or a strports description) and a factory.

    *close* is called by :meth:`close_connections` (e.g. the WebSocket factory's
    ``close_all``); plain HTTP connections end with the reactor.
    """

    def __init__(
        self,
        name: str,
        endpoint: IStreamServerEndpoint | str,
        factory: IProtocolFactory,
        *,
        reactor: Any = None,
        describe: str = "",
        close: Callable[[], object] | None = None,
    ) -> None:
        if isinstance(endpoint, str):
            if reactor is None:
                raise ValueError("a strports description needs the reactor")
            describe = describe or endpoint
            self.endpoint: IStreamServerEndpoint = serverFromString(reactor, endpoint)
        else:
            self.endpoint = endpoint
        self.name = name
        self.factory = factory
        self.describe = describe or repr(endpoint)
        self._close = close
        self.port: IListeningPort | None = None
        self._address: dict[str, Any] = {}

    def listen(self) -> Deferred[None] | None:
        outcome: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if not outcome:  # an endpoint that binds later
            return d.addCallback(self._bound).addErrback(self._refused)
        result = outcome[0]
        if isinstance(result, Failure):
            self._refused(result)
        self._bound(result)
        return None

    def _bound(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        self._address = {"host": getattr(host, "host", ""), "port": getattr(host, "port", 0)}

    def _refused(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, CannotListenError):
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise ListenerError(f"cannot listen on {error.interface or '*'}:{error.port} for the "
                                f"{self.name!r} listener: {reason}") from error
        raise ListenerError(f"cannot listen on {self.describe} for the {self.name!r} listener: "
                            f"{error}") from error

    def address(self) -> dict[str, Any]:
        return dict(self._address)

    def stop_accepting(self) -> Deferred[None]:
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)

    def close_connections(self) -> Deferred[None]:
        if self._close is None:
            return succeed(None)
        close = self._close

        def run() -> object:
            return close()

        return maybeDeferred(run).addCallback(lambda _: None)
