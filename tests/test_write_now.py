"""aico.net.write_now over real loopback TCP: at once when nothing waits, Twisted's
buffered write otherwise, the bytes always in order."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import TestCase

from aico.gateway.testing.waiting import eventually
from aico.net import write_now

reactor: Any = _reactor


class Sink(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class WriteNowTests(TestCase):
    async def connect(self) -> tuple[Any, Sink]:
        servers: list[Protocol] = []
        server_factory = Factory.forProtocol(Protocol)
        original = server_factory.buildProtocol

        def build(addr: Any) -> Protocol | None:
            p = original(addr)
            if p is not None:
                servers.append(p)
            return p

        server_factory.buildProtocol = build  # type: ignore[method-assign]
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sink = Sink()
        connected: Deferred[None] = Deferred()

        class Client(ClientFactory):
            def buildProtocol(self, addr: Any) -> Protocol:
                sink.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
                return sink

        reactor.connectTCP("127.0.0.1", port.getHost().port, Client())
        await connected
        await eventually(lambda: bool(servers) and servers[0].transport is not None)
        transport = servers[0].transport
        self.addCleanup(transport.abortConnection)
        self.addCleanup(lambda: sink.transport.abortConnection())
        return transport, sink

    async def test_with_nothing_waiting_the_bytes_go_to_the_socket_at_once(self) -> None:
        transport, sink = await self.connect()
        write_now(transport, b"hello")
        # Nothing buffered, the socket not registered for writing: sent by the call.
        self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
        self.assertNotIn(transport, reactor.getWriters())
        await eventually(lambda: bytes(sink.data) == b"hello")

    async def test_bytes_written_before_and_not_yet_sent_keep_their_place(self) -> None:
        transport, sink = await self.connect()
        transport.write(b"first ")
        write_now(transport, b"second")  # "first" is still in Twisted's buffer
        self.assertIn(transport, reactor.getWriters())
        await eventually(lambda: bytes(sink.data) == b"first second")

    async def test_what_the_socket_cannot_take_is_buffered_and_sent_in_order(self) -> None:
        transport, sink = await self.connect()
        sink.transport.pauseProducing()  # the client stops reading: buffers fill up
        big = bytes(range(256)) * 40_000  # 10 MB, more than the socket buffers hold
        write_now(transport, big)
        self.assertGreater(transport._tempDataLen, 0)  # the rest waits in Twisted's buffer
        write_now(transport, b"tail")
        sink.transport.resumeProducing()
        await eventually(lambda: len(sink.data) == len(big) + 4, timeout=30)
        self.assertEqual(bytes(sink.data), big + b"tail")

    async def test_a_closing_transport_takes_the_buffered_path(self) -> None:
        transport, sink = await self.connect()
        transport.loseConnection()
        write_now(transport, b"late")  # Twisted's write, as transport.write would do
        self.assertTrue(transport.disconnecting)
        await eventually(lambda: sink.transport.connected == 0)

    def test_other_transports_get_a_plain_write(self) -> None:
        class Recording:
            written: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.written.append(data)

        t = Recording()
        write_now(t, b"x")
        self.assertEqual(t.written, [b"x"])
