"""The floor of ``make bench``: a bare ``twisted.web`` resource serving fixed bytes.

``python -m aico.bench.bare PORTFILE`` listens on 127.0.0.1 (a free port, written to
PORTFILE) and answers every request with the same JSON body the gateway's conversation
route returns, with no routing, security or bus.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

BODY = (b'{"conversation_id":"0123456789abcdef0123456789abcdef",'
        b'"message_id":"0123456789abcdef0123456789abcdef","reply":"hello there"}')


reactor: Any = _reactor


class Fixed(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: object) -> bytes:
        request.setHeader(b"content-type", b"application/json")  # type: ignore[attr-defined]
        return BODY


def main() -> None:
    site = Site(Fixed())
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    Path(sys.argv[1]).write_text(str(port.getHost().port))
    reactor.run()


if __name__ == "__main__":
    main()
