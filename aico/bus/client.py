"""The bus client: :class:`IMessageBus` on the Twisted reactor, over ZeroMQ PUB/SUB.

A :class:`BusClient` holds two sockets: a PUB connected to the broker's XSUB endpoint and
a SUB connected to its XPUB endpoint, both Curve clients of the broker. Frames on the bus
are exactly ``[topic, AicoMessage bytes]``.

Two integrations of ZeroMQ with the reactor are provided behind one small transport
seam; ``docs/bus.md`` has the measured numbers and the reason for the default:

* ``native``: a reader registered with the reactor on the SUB socket's ``ZMQ_FD``. That
  descriptor is edge-triggered, so every wake-up (and every operation that may have
  consumed the edge, such as changing a subscription) drains the socket until it is empty.
* ``txzmq``: txZMQ's ``ZmqPubConnection`` / ``ZmqSubConnection`` (imported lazily,
  because importing txZMQ installs the default reactor).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import zmq
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aico.bus.core import BusCore
from aico.bus.curve import CurveLayout, load_pair, load_public
from aico.bus.errors import BusError, BusStopped, BusTimeout
from aico.bus.interfaces import (
    IBusControl,
    IMessageBus,
)
from aico.proto import AicoMessage
from aico.zmqreactor import SocketReader, send_frames

#: Attribute carried by the start-up probe a client sends to its own reply topic.
ATTR_PROBE = "probe"
#: Messages a client socket queues before PUB semantics drop them.
HIGH_WATER_MARK = 100_000
#: Milliseconds a closed socket keeps trying to deliver queued messages.
LINGER_MS = 500
#: Longest pause between two start-up probes (they start at ``probe_interval``).
PROBE_INTERVAL_MAX = 0.1
#: Messages handed over in process per reactor turn (see ``BusClient.serve_locally``).
LOCAL_BUDGET = 256

Integration = Literal["native", "txzmq"]
Receiver = Callable[[list[bytes]], None]
_Context = zmq.Context[zmq.Socket[bytes]]
_Socket = zmq.Socket[bytes]


class BusReactor(Protocol):
    """What the bus client needs from the reactor (any Twisted reactor provides it)."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall: ...

    def addReader(self, reader: IReadDescriptor) -> None: ...

    def removeReader(self, reader: IReadDescriptor) -> None: ...


@dataclass(frozen=True)
class CurveClientKeys:
    """A bus client's Curve key pair and the broker's public key (all Z85)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_layout(cls, layout: CurveLayout, name: str) -> CurveClientKeys:
        """The keys of local client *name*: ``curve/private/NAME.key_secret`` + broker key."""
        public, secret = load_pair(layout.client_secret(name), layout.keystore)
        return cls(public=public, secret=secret, server=load_public(layout.broker_public))

    def __repr__(self) -> str:  # never show key material, even by accident
        return "CurveClientKeys(<redacted>)"


class _Transport(Protocol):
    def send(self, frames: Sequence[bytes]) -> None: ...

    def subscribe(self, prefix: bytes) -> None: ...

    def unsubscribe(self, prefix: bytes) -> None: ...

    def reconnect(self) -> None: ...

    def close(self) -> None: ...


def _configure(sock: _Socket, keys: CurveClientKeys | None) -> None:
    sock.linger = LINGER_MS
    sock.sndhwm = HIGH_WATER_MARK
    sock.rcvhwm = HIGH_WATER_MARK
    sock.reconnect_ivl = 100
    sock.reconnect_ivl_max = 2000
    if keys is not None:
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
        sock.curve_serverkey = keys.server


def _reconnect(sock: _Socket, endpoint: str) -> None:
    try:
        sock.disconnect(endpoint)
    except zmq.ZMQError:
        pass
    sock.connect(endpoint)


class _NativeTransport:
    """pyzmq sockets driven by the reactor through the SUB socket's edge-triggered FD."""

    log = Logger()

    def __init__(
        self,
        reactor: BusReactor,
        context: _Context,
        pub: str,
        sub: str,
        keys: CurveClientKeys | None,
        receive: Receiver,
    ) -> None:
        self._endpoints = (pub, sub)
        self._pub = context.socket(zmq.PUB)
        self._sub = context.socket(zmq.SUB)
        for sock, endpoint in ((self._pub, pub), (self._sub, sub)):
            _configure(sock, keys)
            sock.connect(endpoint)
        self._reader = SocketReader(reactor, self._sub, receive, "aico-bus")

    def send(self, frames: Sequence[bytes]) -> None:
        send_frames(self._pub, frames)

    def subscribe(self, prefix: bytes) -> None:
        self._sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self._reader.kick()

    def unsubscribe(self, prefix: bytes) -> None:
        self._sub.setsockopt(zmq.UNSUBSCRIBE, prefix)
        self._reader.kick()

    def reconnect(self) -> None:
        _reconnect(self._pub, self._endpoints[0])
        _reconnect(self._sub, self._endpoints[1])
        self._reader.kick()

    def close(self) -> None:
        if self._reader.closed:
            return
        self._reader.close()
        self._pub.close()
        self._sub.close()


class _TxZmqTransport:
    """The same sockets through txZMQ's connections (imported lazily)."""

    log = Logger()

    def __init__(
        self,
        reactor: BusReactor,
        pub: str,
        sub: str,
        keys: CurveClientKeys | None,
        receive: Receiver,
    ) -> None:
        import txzmq

        self._reactor = reactor
        self._endpoints = (pub, sub)
        factory = txzmq.ZmqFactory()
        factory.reactor = reactor
        factory.lingerPeriod = LINGER_MS
        self._factory = factory
        self._read_call: IDelayedCall | None = None

        class _Pub(txzmq.ZmqPubConnection):  # type: ignore[misc]
            highWaterMark = HIGH_WATER_MARK

            def send(self, message: Sequence[bytes]) -> None:
                # txZMQ's send() schedules a read on the global reactor; a PUB never reads.
                self.socket.send_multipart(message, zmq.NOBLOCK)

        class _Sub(txzmq.ZmqSubConnection):  # type: ignore[misc]
            highWaterMark = HIGH_WATER_MARK

            def messageReceived(self, message: list[bytes]) -> None:
                receive(message)

        self._pub = _Pub(factory)
        self._sub = _Sub(factory)
        for conn, endpoint in ((self._pub, pub), (self._sub, sub)):
            _configure(conn.socket, keys)
            conn.addEndpoints([txzmq.ZmqEndpoint(txzmq.ZmqEndpointType.connect, endpoint)])

    def _schedule_read(self) -> None:
        if self._read_call is None or not self._read_call.active():
            self._read_call = self._reactor.callLater(0, self._read)

    def _read(self) -> None:
        self._read_call = None
        if self._sub.factory is not None:
            self._sub.doRead()

    def send(self, frames: Sequence[bytes]) -> None:
        self._pub.send(frames)

    def subscribe(self, prefix: bytes) -> None:
        self._sub.subscribe(prefix)
        self._schedule_read()

    def unsubscribe(self, prefix: bytes) -> None:
        self._sub.unsubscribe(prefix)
        self._schedule_read()

    def reconnect(self) -> None:
        _reconnect(self._pub.socket, self._endpoints[0])
        _reconnect(self._sub.socket, self._endpoints[1])
        self._schedule_read()

    def close(self) -> None:
        if self._factory.connections is None:
            return
        if self._read_call is not None and self._read_call.active():
            self._read_call.cancel()
        self._read_call = None
        self._factory.shutdown()


@dataclass
class _Barrier:
    topic: str
    deferred: Deferred[None]
    probe: IDelayedCall | None = None
    timer: IDelayedCall | None = None

    def cancel_calls(self) -> None:
        for call in (self.probe, self.timer):
            if call is not None and call.active():
                call.cancel()
        self.probe = None
        self.timer = None


@implementer(IMessageBus, IBusControl)
class BusClient(BusCore):
    """A connection to the message bus, driven by an injected reactor.

    *source* names this client in ``MessageMetadata.source`` and in its reply topic
    ``reply/SOURCE/UUID``. *keys* are the Curve keys (``None``: no Curve, for a broker
    without it). ``start()`` fires once a probe published on the reply topic came back
    through the broker, so replies can no longer be lost to the slow-joiner race; while
    it waits it re-probes (every *probe_interval* seconds at first, backing off to
    0.1 s) and reconnects both sockets
    after *reconnect_after* seconds (doubling, up to 10 s), since libzmq never retries a
    client the broker's ZAP handler refused once. With *start_timeout*, ``start()``
    gives up with :class:`BusTimeout`.
    """

    log = Logger()

    def __init__(
        self,
        reactor: BusReactor,
        source: str,
        pub: str,
        sub: str,
        keys: CurveClientKeys | None,
        *,
        default_timeout: float = 5.0,
        integration: Integration = "native",
        context: _Context | None = None,
        start_timeout: float | None = None,
        probe_interval: float = 0.005,
        reconnect_after: float = 1.0,
    ) -> None:
        if integration not in ("native", "txzmq"):
            raise ValueError(f"unknown bus integration {integration!r}")
        super().__init__(source, default_timeout)
        self.pub_endpoint = pub
        self.sub_endpoint = sub
        self.integration: Integration = integration
        self._reactor = reactor
        self._keys = keys
        self._context = context
        self._start_timeout = start_timeout
        self._probe_interval = probe_interval
        self._reconnect_after = reconnect_after
        self._state: Literal["new", "starting", "running", "stopped"] = "new"
        self._transport: _Transport | None = None
        self._probe_token = uuid.uuid4().hex
        self._barriers: dict[str, _Barrier] = {}
        self._probe_call: IDelayedCall | None = None
        self._start_timer: IDelayedCall | None = None
        self._started: Deferred[None] | None = None
        self._local_topics: set[str] = set()
        self._local_queue: list[tuple[str, AicoMessage]] = []
        self._local_call: IDelayedCall | None = None

    @classmethod
    def from_layout(
        cls,
        reactor: BusReactor,
        layout: CurveLayout,
        name: str,
        pub: str,
        sub: str,
        **kwargs: Any,
    ) -> BusClient:
        """A client named *name* with its keys from the state directory's Curve layout."""
        return cls(reactor, name, pub, sub, CurveClientKeys.from_layout(layout, name), **kwargs)

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._state == "running"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        if self._state != "new":
            return fail(BusError(f"bus client {self.source} cannot start twice"))
        if self.integration == "txzmq":
            transport: _Transport = _TxZmqTransport(
                self._reactor, self.pub_endpoint, self.sub_endpoint, self._keys, self._received
            )
        else:
            context = self._context if self._context is not None else zmq.Context.instance()
            transport = _NativeTransport(
                self._reactor,
                context,
                self.pub_endpoint,
                self.sub_endpoint,
                self._keys,
                self._received,
            )
        self._transport = transport
        # Subscriptions made before start() go first: the probe coming back on the
        # reply topic (subscribed last, on the same connection) proves they reached
        # the broker too.
        for prefix in self._handlers:
            transport.subscribe(prefix.encode("utf-8"))
        transport.subscribe(self.reply_topic.encode("utf-8"))
        self._state = "starting"
        self._started = Deferred(lambda _: self._abandon_start())
        if self._start_timeout is not None:
            self._start_timer = self._reactor.callLater(self._start_timeout, self._start_timed_out)
        self._probe(0.0, self._reconnect_after, self._probe_interval)
        return self._started

    def _probe(self, waited: float, reconnect_after: float, interval: float) -> None:
        self._probe_call = None
        if self._state != "starting" or self._transport is None:
            return
        if waited >= reconnect_after:
            self.log.info(
                "bus client {source}: no answer from the broker yet, reconnecting",
                source=self.source,
            )
            self._transport.reconnect()
            waited, reconnect_after = 0.0, min(reconnect_after * 2, 10.0)
        self._send_probe(self.reply_topic, self._probe_token)
        # Probe quickly at first (the connection is usually up within milliseconds),
        # then back off to PROBE_INTERVAL_MAX.
        self._probe_call = self._reactor.callLater(
            interval,
            self._probe,
            waited + interval,
            reconnect_after,
            min(interval * 2, PROBE_INTERVAL_MAX),
        )

    def _send_probe(self, topic: str, token: str) -> None:
        # A probe that cannot be sent is retried on the next interval: the probe loops
        # must not die of one failed send.
        try:
            self._wire(topic, self._probe_message(token))
        except BusError as e:
            self.log.warn(
                "bus client {source}: probe on {topic} not sent: {error}",
                source=self.source,
                topic=topic,
                error=str(e),
            )

    def _probe_message(self, token: str) -> AicoMessage:
        probe = AicoMessage()
        probe.metadata.message_id = uuid.uuid4().hex
        probe.metadata.source = self.source
        probe.metadata.attributes[ATTR_PROBE] = token
        return probe

    def wait_subscribed(self, prefixes: Sequence[str], timeout: float | None = None) -> Deferred[None]:
        refused = self._not_subscribed(prefixes)
        if refused is not None:
            return refused
        delay = self.default_timeout if timeout is None else timeout
        waits = [self._barrier(prefix, delay) for prefix in prefixes]
        done: Deferred[None] = Deferred()
        remaining = [len(waits)]

        def one_done(_: None) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.called:
                done.callback(None)

        def one_failed(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        for wait in waits:
            wait.addCallbacks(one_done, one_failed)
        if not waits:
            done.callback(None)
        return done

    def _barrier(self, topic: str, timeout: float) -> Deferred[None]:
        token = uuid.uuid4().hex
        barrier = _Barrier(topic, Deferred(lambda _: self._drop_barrier(token)))
        self._barriers[token] = barrier
        barrier.timer = self._reactor.callLater(timeout, self._barrier_timed_out, token, timeout)
        self._barrier_probe(token, self._probe_interval)
        return barrier.deferred

    def _barrier_probe(self, token: str, interval: float) -> None:
        barrier = self._barriers.get(token)
        if barrier is None:
            return
        barrier.probe = None
        self._send_probe(barrier.topic, token)
        barrier.probe = self._reactor.callLater(
            interval, self._barrier_probe, token, min(interval * 2, PROBE_INTERVAL_MAX)
        )

    def _drop_barrier(self, token: str) -> None:
        barrier = self._barriers.pop(token, None)
        if barrier is not None:
            barrier.cancel_calls()

    def _barrier_timed_out(self, token: str, timeout: float) -> None:
        barrier = self._barriers.get(token)
        if barrier is not None:
            barrier.timer = None
            self._drop_barrier(token)
            barrier.deferred.errback(BusTimeout(barrier.topic, timeout))

    def _probe_arrived(self, topic: str, token: str) -> None:
        if token == self._probe_token:
            if topic == self.reply_topic:
                self._probe_returned()
            return
        barrier = self._barriers.get(token)
        if barrier is not None and barrier.topic == topic:
            self._drop_barrier(token)
            barrier.deferred.callback(None)

    def _cancel_start_timers(self) -> None:
        for call in (self._probe_call, self._start_timer):
            if call is not None and call.active():
                call.cancel()
        self._probe_call = None
        self._start_timer = None

    def _probe_returned(self) -> None:
        if self._state != "starting":
            return
        self._cancel_start_timers()
        self._state = "running"
        self.log.info("bus client {source} connected", source=self.source)
        started, self._started = self._started, None
        if started is not None:
            started.callback(None)

    def _start_timed_out(self) -> None:
        self._start_timer = None
        started, self._started = self._started, None
        self._shutdown()
        if started is not None:
            assert self._start_timeout is not None
            started.errback(BusTimeout(self.reply_topic, self._start_timeout))

    def _abandon_start(self) -> None:
        self._started = None
        self._shutdown()

    def _shutdown(self) -> list[Any]:
        self._state = "stopped"
        self._cancel_start_timers()
        barriers = list(self._barriers.values())
        self._barriers.clear()
        for barrier in barriers:
            barrier.cancel_calls()
            barrier.deferred.errback(BusStopped())
        pending = self._take_pending()
        self._local_queue.clear()
        if self._local_call is not None and self._local_call.active():
            self._local_call.cancel()
        self._local_call = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        return pending

    def stop(self) -> Deferred[None]:
        if self._state == "stopped":
            return succeed(None)
        started, self._started = self._started, None
        pending = self._shutdown()
        if started is not None:
            started.errback(BusStopped("the bus client was stopped while starting"))
        for entry in pending:
            entry.deferred.errback(BusStopped())
        self.log.info("bus client {source} stopped", source=self.source)
        return succeed(None)

    # -- sending -----------------------------------------------------------------------

    def serve_locally(self, topics: Sequence[str]) -> None:
        """Hand messages on exactly these *topics*, sent by this client, to this client's
        own handlers in process instead of through the broker.

        A module running in the gateway's process (``modules.in_process = true``) calls
        this for its request topics on the bus client it shares with the gateway; its
        replies come back on this client's own reply topic, which never leaves the process
        either. The messages are the same envelopes (a fresh copy each way, as
        ``request()`` and ``reply()`` make), delivered on a later reactor turn in the order
        sent, never nested; what changes is that four Curve-encrypted socket hops through
        the broker are skipped (docs/performance.md). Other clients still reach the same
        topics through the broker, since this client's SUB socket stays subscribed.
        """
        self._local_topics.update(topics)

    def stop_serving_locally(self, topics: Sequence[str]) -> None:
        """Undo :meth:`serve_locally` for *topics* (they go through the broker again)."""
        self._local_topics.difference_update(topics)

    @property
    def local_topics(self) -> frozenset[str]:
        """The topics :meth:`serve_locally` keeps in this process."""
        return frozenset(self._local_topics)

    def _send(self, topic: str, message: AicoMessage) -> None:
        """Send one message: in process for this client's local topics and its own reply
        topic, else on the wire."""
        if topic == self.reply_topic or topic in self._local_topics:
            if self._transport is None:
                raise BusStopped(f"bus client {self.source} is not running")
            self._local_queue.append((topic, message))
            if self._local_call is None:
                self._local_call = self._reactor.callLater(0, self._flush_local)
            return
        self._wire(topic, message)

    def _flush_local(self) -> None:
        self._local_call = None
        queue = self._local_queue
        handled = 0
        # Replies that handlers send while we deliver join this same turn (bounded).
        while queue and handled < LOCAL_BUDGET and self._transport is not None:
            batch = queue[: LOCAL_BUDGET - handled]
            del queue[: len(batch)]
            handled += len(batch)
            for topic, message in batch:
                self._deliver(topic, message)
        if queue and self._transport is not None and self._local_call is None:
            self._local_call = self._reactor.callLater(0, self._flush_local)

    def _wire(self, topic: str, message: AicoMessage) -> None:
        """Put one message on the wire; a ZeroMQ failure is raised as :class:`BusError`."""
        if self._transport is None:
            raise BusStopped(f"bus client {self.source} is not running")
        try:
            self._transport.send((topic.encode("utf-8"), message.SerializeToString()))
        except zmq.ZMQError as e:
            raise BusError(f"cannot publish on {topic!r}: {e.strerror}") from e

    def _call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        return self._reactor.callLater(delay, f, *args)

    # -- subscriptions: the SUB socket follows the handlers' prefixes ---------------------

    def _prefix_added(self, prefix: str) -> None:
        if self._transport is not None:
            self._transport.subscribe(prefix.encode("utf-8"))

    def _prefix_removed(self, prefix: str) -> None:
        if self._transport is not None:
            self._transport.unsubscribe(prefix.encode("utf-8"))

    # -- receiving ---------------------------------------------------------------------

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.log.warn(
                "bus client {source}: dropped a malformed message ({count} frames)",
                source=self.source,
                count=len(frames),
            )
            return
        raw_topic, body = frames
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            self.log.warn("bus client {source}: dropped a message with a non-UTF-8 topic", source=self.source)
            return
        message = AicoMessage()
        try:
            message.ParseFromString(body)
        except DecodeError:
            self.log.warn(
                "bus client {source}: dropped an undecodable message on {topic}",
                source=self.source,
                topic=topic,
            )
            return
        token = message.metadata.attributes.get(ATTR_PROBE)
        if token is not None:
            self._probe_arrived(topic, token)  # probes are never handed to handlers
            return
        self._deliver(topic, message)
