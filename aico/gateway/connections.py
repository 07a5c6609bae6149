"""The connection manager: every live WebSocket and IPC connection, and their events.

Each adapter registers its connections here (:class:`IConnection`). The manager

* tracks them (transport, principal, device, since, bytes and messages each way) for
  the admin site (:meth:`ConnectionManager.snapshot`);
* ends their authentication when the token expires (a timer on the injected clock at
  ``principal.expires_at``) or is revoked (:meth:`ConnectionManager.revoke_token`, which
  the token store calls), and closes a revoked device's connections
  (:meth:`ConnectionManager.close_device`);
* relays bus events to subscribed connections: one bus subscription per distinct prefix,
  however many connections share it, and one event object per bus message whose encoded
  frames are cached, so a thousand subscribers cost one decode and one encode per frame
  format. Only ``ApiEvent`` payloads are relayed: requests and replies that travel on
  the same topics never reach a subscriber.

Authorization of a subscription (:mod:`aico.gateway.security.topics`) is the adapter's
job before it calls :meth:`ConnectionManager.subscribe`; the manager re-checks nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from aico.bus.interfaces import IBusControl, IMessageBus
from aico.gateway.errors import ApiError, TokenExpired, TokenRevoked
from aico.gateway.routing.messages import Principal
from aico.proto import AicoMessage, ApiEvent, EnvelopeError, unpack


class Event:
    """One bus event on its way to subscribers; encodings are made once and shared."""

    __slots__ = ("_frames", "body", "topic")

    def __init__(self, topic: str, body: bytes) -> None:
        self.topic = topic
        self.body = body
        self._frames: dict[str, bytes] = {}

    def frame(self, kind: str, make: Callable[[Event], bytes]) -> bytes:
        """The frame of format *kind*, made by *make* the first time it is asked for."""
        out = self._frames.get(kind)
        if out is None:
            out = self._frames[kind] = make(self)
        return out

    def json_body(self) -> Any:
        """The body as JSON (``None`` when empty, a string when it is not JSON)."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")


@dataclass
class ConnectionInfo:
    """What the gateway knows about one live connection."""

    transport: str
    peer: str
    since: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    principal: Principal | None = None
    device_id: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    subscriptions: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        p = self.principal
        return {
            "id": self.id,
            "transport": self.transport,
            "peer": self.peer,
            "subject": p.subject if p is not None else None,
            "roles": list(p.roles) if p is not None else [],
            "device_id": self.device_id or (p.device_id if p is not None else ""),
            "since": self.since,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "subscriptions": sorted(self.subscriptions),
        }


def _bus_key(prefix: str) -> str:
    """The bus subscription that covers *prefix*: its first segment and the slash.

    ZeroMQ keeps a trie per subscription (tens of KiB for a long one), so the bus holds one
    subscription per first segment, not one per socket prefix (the topic rules require a
    slash after the first segment)."""
    segment, slash, _ = prefix.partition("/")
    return segment + slash


class IConnection(Interface):
    """A live connection as the manager sees it (WebSocket session, IPC peer)."""

    info = Attribute("The connection's ConnectionInfo.")

    def deliver(event: Event) -> None:
        """Send *event* (the connection subscribed to a prefix of its topic)."""

    def auth_ended(error: ApiError) -> None:
        """The token expired or was revoked: tell the peer; requests need a new token.

        The manager has already forgotten the principal and the subscriptions.
        """

    def close(code: int, reason: str) -> None:
        """Close the connection (e.g. its device was revoked)."""


#: Close code used when a device's connections are closed after its revocation.
CLOSE_DEVICE_REVOKED = 4003


class ConnectionManager:
    """Every live connection, their authentication timers, and the event fan-out."""

    log = Logger()

    def __init__(self, clock: IReactorTime, bus: IMessageBus | None = None) -> None:
        self.clock = clock
        self.bus = bus
        self._connections: dict[str, IConnection] = {}
        self._by_token: dict[str, set[str]] = {}
        self._expiry: dict[str, IDelayedCall] = {}
        self._token_of: dict[str, str] = {}
        #: prefix -> ids of the connections subscribed to it.
        self._subscribers: dict[str, set[str]] = {}
        self._handlers: dict[str, Callable[[str, AicoMessage], None]] = {}
        #: Bus subscriptions not yet confirmed by the broker (``IBusControl.wait_subscribed``).
        self._unconfirmed: dict[str, list[Deferred[None]]] = {}
        #: Distinct subscribed prefixes under each bus subscription (first segment + "/").
        self._segment_refs: dict[str, int] = {}
        self._last_message: AicoMessage | None = None
        self.events_relayed = 0

    # -- registry ----------------------------------------------------------------------

    def add(self, conn: IConnection) -> None:
        self._connections[conn.info.id] = conn

    def remove(self, conn: IConnection) -> None:
        """Forget *conn*: its timers, token index and subscriptions."""
        cid = conn.info.id
        if self._connections.pop(cid, None) is None:
            return
        self._forget_auth(cid)
        self.unsubscribe_all(conn)

    def get(self, cid: str) -> IConnection | None:
        return self._connections.get(cid)

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[IConnection]:
        return iter(list(self._connections.values()))

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live connection, oldest first (for ``GET /admin/api/connections``)."""
        infos = sorted((c.info for c in self._connections.values()), key=lambda i: i.since)
        return [i.as_dict() for i in infos]

    # -- authentication ----------------------------------------------------------------

    def authenticated(self, conn: IConnection, principal: Principal) -> None:
        """*conn* now acts as *principal*: index its token, arm the expiry timer."""
        cid = conn.info.id
        self._forget_auth(cid)
        conn.info.principal = principal
        if principal.device_id and not conn.info.device_id:
            conn.info.device_id = principal.device_id
        if principal.token_id:
            self._by_token.setdefault(principal.token_id, set()).add(cid)
            self._token_of[cid] = principal.token_id
        if principal.expires_at > 0:
            delay = max(0.0, principal.expires_at - self.clock.seconds())
            self._expiry[cid] = self.clock.callLater(delay, self._expired, cid)

    def _forget_auth(self, cid: str) -> None:
        timer = self._expiry.pop(cid, None)
        if timer is not None and timer.active():
            timer.cancel()
        jti = self._token_of.pop(cid, None)
        if jti is not None:
            holders = self._by_token.get(jti)
            if holders is not None:
                holders.discard(cid)
                if not holders:
                    del self._by_token[jti]

    def _end_auth(self, cid: str, error: ApiError) -> None:
        conn = self._connections.get(cid)
        self._forget_auth(cid)
        if conn is None:
            return
        conn.info.principal = None
        self.unsubscribe_all(conn)
        try:
            conn.auth_ended(error)
        except Exception:
            self.log.failure("telling connection {id} that its token ended failed", id=cid)

    def _expired(self, cid: str) -> None:
        self._expiry.pop(cid, None)
        self._end_auth(cid, TokenExpired("the access token has expired; authenticate again"))

    def revoke_token(self, jti: str) -> int:
        """The token *jti* was revoked: every connection holding it is told; their count."""
        holders = list(self._by_token.get(jti, ()))
        for cid in holders:
            self._end_auth(cid, TokenRevoked("the access token was revoked; authenticate again"))
        if holders:
            self.log.info("token revoked: {count} live connection(s) lost their authentication",
                          count=len(holders))
        return len(holders)

    def revoke_family(self, family: str) -> int:
        """A session family was revoked (logout, refresh-token reuse): every connection
        authenticated with any token of it is told; their count."""
        if not family:
            return 0
        holders = [cid for cid, c in self._connections.items()
                   if c.info.principal is not None and c.info.principal.family == family]
        for cid in holders:
            self._end_auth(cid, TokenRevoked("the session was revoked; authenticate again"))
        return len(holders)

    def revoke_subject(self, subject: str) -> int:
        """Every session of *subject* was revoked: each connection authenticated as it is
        told and loses its authentication; their count."""
        holders = [cid for cid, c in self._connections.items()
                   if c.info.principal is not None and c.info.principal.subject == subject]
        for cid in holders:
            self._end_auth(cid, TokenRevoked("the account's sessions were revoked; "
                                             "authenticate again"))
        return len(holders)

    def close_device(self, device_id: str, reason: str = "device revoked") -> int:
        """Close every connection of *device_id*; their count."""
        closing = [c for c in self._connections.values()
                   if c.info.device_id == device_id
                   or (c.info.principal is not None and c.info.principal.device_id == device_id)]
        for conn in closing:
            conn.close(CLOSE_DEVICE_REVOKED, reason)
        return len(closing)

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(self, conn: IConnection, prefix: str) -> bool:
        """Relay events on topics starting with *prefix* to *conn*; False if it already was."""
        if prefix in conn.info.subscriptions:
            return False
        conn.info.subscriptions.add(prefix)
        ids = self._subscribers.get(prefix)
        if ids is None:
            ids = self._subscribers[prefix] = set()
            segment = _bus_key(prefix)
            self._segment_refs[segment] = self._segment_refs.get(segment, 0) + 1
            if self._segment_refs[segment] == 1 and self.bus is not None:
                handler = self._handler(segment)
                self._handlers[segment] = handler
                self.bus.subscribe(segment, handler)
                self._confirm(segment)
        ids.add(conn.info.id)
        return True

    def _confirm(self, segment: str) -> None:
        if self.bus is None or not IBusControl.providedBy(self.bus):
            return
        waiting: list[Deferred[None]] = []
        self._unconfirmed[segment] = waiting

        def done(result: object) -> None:
            if self._unconfirmed.get(segment) is waiting:
                del self._unconfirmed[segment]
            if isinstance(result, Failure):
                self.log.warn("bus subscription {segment!r} not confirmed: {error}",
                              segment=segment, error=result.getErrorMessage())
            for d in waiting:
                d.callback(None)

        self.bus.wait_subscribed([segment]).addBoth(done)

    def ready(self, prefix: str) -> Deferred[None] | None:
        """A Deferred that fires once the bus subscription covering *prefix* reached the
        broker (events published from then on arrive), or ``None`` when it already has.

        ZeroMQ subscriptions travel to the broker asynchronously; answering ``subscribed``
        only after this means a client that subscribes and then causes an event (a request
        whose module publishes on the subscribed topic) receives it."""
        waiting = self._unconfirmed.get(_bus_key(prefix))
        if waiting is None:
            return None
        d: Deferred[None] = Deferred()
        waiting.append(d)
        return d

    def unsubscribe(self, conn: IConnection, prefix: str) -> bool:
        """Stop relaying *prefix* to *conn*; False if it was not subscribed."""
        if prefix not in conn.info.subscriptions:
            return False
        conn.info.subscriptions.discard(prefix)
        ids = self._subscribers.get(prefix)
        if ids is not None:
            ids.discard(conn.info.id)
            if not ids:
                del self._subscribers[prefix]
                segment = _bus_key(prefix)
                self._segment_refs[segment] -= 1
                if not self._segment_refs[segment]:
                    del self._segment_refs[segment]
                    self._unconfirmed.pop(segment, None)
                    handler = self._handlers.pop(segment, None)
                    if handler is not None and self.bus is not None:
                        self.bus.unsubscribe(segment, handler)
        return True

    def unsubscribe_all(self, conn: IConnection) -> None:
        for prefix in list(conn.info.subscriptions):
            self.unsubscribe(conn, prefix)

    @property
    def bus_prefixes(self) -> frozenset[str]:
        """The prefixes the manager currently holds on the bus: one per first topic
        segment, however many (and however long) the sockets' prefixes below it are;
        events are matched to each socket's own prefix here."""
        return frozenset(self._handlers)

    def _handler(self, prefix: str) -> Callable[[str, AicoMessage], None]:
        def on_message(topic: str, message: AicoMessage) -> None:
            # The bus calls one handler per matching prefix with the same message object:
            # the first call fans out to every matching subscriber, the others do nothing.
            if message is self._last_message:
                return
            self._last_message = message
            self.publish_message(topic, message)

        return on_message

    def publish_message(self, topic: str, message: AicoMessage) -> None:
        """Relay a bus message to its subscribers if it holds an ``ApiEvent``."""
        try:
            payload = unpack(message, ApiEvent)
        except EnvelopeError:
            return  # a request or reply on an event prefix: never relayed
        self.relay(Event(topic, payload.body))

    def relay(self, event: Event) -> int:
        """Deliver *event* to every connection subscribed to a prefix of its topic."""
        topic = event.topic
        targets: set[str] = set()
        subscribers = self._subscribers
        for i in range(len(topic) + 1):
            ids = subscribers.get(topic[:i])
            if ids:
                targets |= ids
        delivered = 0
        for cid in targets:
            conn = self._connections.get(cid)
            if conn is None:
                continue
            try:
                conn.deliver(event)
                delivered += 1
            except Exception:
                self.log.failure("delivering an event on {topic} to {id} failed",
                                 topic=topic, id=cid)
        self.events_relayed += delivered
        return delivered

    def stop(self) -> None:
        """Cancel every timer and drop every bus subscription (the gateway is stopping)."""
        for timer in self._expiry.values():
            if timer.active():
                timer.cancel()
        self._expiry.clear()
        for conn in list(self._connections.values()):
            self.unsubscribe_all(conn)
