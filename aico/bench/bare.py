"""The floors of ``make bench``, each in its own process, answering with fixed bytes.

``python -m aico.bench.bare http PORTFILE`` — a bare ``twisted.web`` resource;
``python -m aico.bench.bare ws PORTFILE`` — a bare Autobahn WebSocket on ``twisted.web``
answering every frame with one fixed response frame;
``python -m aico.bench.bare zmq PORTFILE KEYDIR`` — a raw pyzmq ROUTER (blocking, Curve)
answering every message with one fixed reply.
No routing, security or bus in any of them. Each writes its port to PORTFILE.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BODY = (b'{"conversation_id":"0123456789abcdef0123456789abcdef",'
        b'"message_id":"0123456789abcdef0123456789abcdef","reply":"hello there"}')
WS_FRAME = (b'{"type":"response","id":1,"status":200,"request_id":"0123456789abcdef",'
            b'"body":' + BODY + b"}")


def http(port_file: Path) -> None:
    from twisted.internet import reactor as _reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    reactor: Any = _reactor

    class Fixed(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]

        def render(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return BODY

    site = Site(Fixed())
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    port_file.write_text(str(port.getHost().port))
    reactor.run()


def ws(port_file: Path) -> None:
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor as _reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    reactor: Any = _reactor

    class Echo(WebSocketServerProtocol):
        def onOpen(self) -> None:
            self.sendMessage(b'{"type":"welcome"}')  # type: ignore[no-untyped-call]

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(WS_FRAME)  # type: ignore[no-untyped-call]

    factory = WebSocketServerFactory()  # type: ignore[no-untyped-call]
    factory.protocol = Echo
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))  # type: ignore[no-untyped-call]
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    port_file.write_text(str(port.getHost().port))
    reactor.run()


def zmq_router(port_file: Path, key_dir: Path) -> None:
    import zmq
    import zmq.auth

    from aico.proto import ApiResponse, wrap

    public, secret = zmq.auth.load_certificate(key_dir / "server.key_secret")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.bind("tcp://127.0.0.1:*")
    port_file.write_text(sock.last_endpoint.decode())  # type: ignore[union-attr]
    reply = wrap(ApiResponse(request_id="r", status=200, body=BODY), "bare").SerializeToString()
    while True:
        identity, _ = sock.recv_multipart()
        sock.send_multipart([identity, reply])


def main() -> None:
    kind, port_file = sys.argv[1], Path(sys.argv[2])
    if kind == "http":
        http(port_file)
    elif kind == "ws":
        ws(port_file)
    elif kind == "zmq":
        zmq_router(port_file, Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown floor {kind!r}")


if __name__ == "__main__":
    main()
