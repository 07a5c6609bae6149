"""The normalized request and response every adapter speaks with the router."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from aico import fastjson
from aico.net import source_identity

if TYPE_CHECKING:
    from aico.gateway.routing.table import RouteEntry

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

_UNSET: Any = object()


#: A security-chain step: inspects (and may annotate) the request, raises ApiError to refuse.
Step = Callable[["Request"], "Deferred[None] | None"]


def request_id_from(candidate: str | None) -> str:
    """Keep a well-formed incoming request ID (docs/rest.md), else make a new one."""
    if candidate and _REQUEST_ID.match(candidate):
        return candidate
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: set by the authentication step."""

    subject: str
    roles: tuple[str, ...] = ()
    caps: frozenset[str] = frozenset()
    device_id: str = ""
    #: The token's ``jti`` and ``exp`` when the principal came from a token.
    token_id: str = ""
    expires_at: float = 0.0
    #: The token's session family (``fam``): logout and refresh-token reuse end it whole.
    family: str = ""


@dataclass(slots=True)
class Request:
    """A request in the gateway's own form, whatever transport it came on."""

    method: str
    path: str
    request_id: str
    transport: str
    #: The peer's address as the socket reports it (never from a forwarded header).
    peer_host: str = ""
    loopback: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    route: RouteEntry | None = None
    #: Set when the caller can receive a streamed reply (``?stream=true`` on REST).
    accepts_stream: bool = False
    #: Parsed, validated JSON body; set by the validation step.
    json: Any = _UNSET
    #: The body as the adapter already read it with the security chain's strict decoder
    #: (a WebSocket request frame's ``body`` member, of which :attr:`body` is the
    #: serialisation): the validation step checks this value instead of reading the
    #: bytes a second time. ``None``: the step reads :attr:`body` (a JSON ``null`` body
    #: is no body to a WebSocket frame, so ``None`` is never such a value).
    body_value: Any = None
    #: Connection-level identity (device certificate), set by the adapter.
    device_id: str = ""
    #: The connection this request came on, for adapters with lasting connections
    #: (WebSocket session, IPC peer): anonymous callers are rate-limited per connection
    #: rather than per address, so local clients sharing 127.0.0.1 do not share a budget.
    connection_id: str = ""
    #: The device is trusted for administration (set by the adapter from the registry).
    device_admin: bool = False
    #: The verified token claims, set by the authentication step.
    claims: Any = None
    #: Header fields the security chain adds to whatever response goes out (rate limits).
    response_headers: dict[str, str] = field(default_factory=dict)
    #: Clock time the request arrived (set by the adapter or the dispatcher).
    started: float = 0.0

    @property
    def client_key(self) -> str:
        """The identity the rate limiter counts: user, device, connection, or address (as
        its :func:`~aico.net.source_identity`: every loopback address is one)."""
        if self.principal is not None:
            return "user:" + self.principal.subject
        if self.device_id:
            return "device:" + self.device_id
        if self.connection_id:
            return "conn:" + self.connection_id
        return "addr:" + source_identity(self.peer_host)

    def parsed_json(self) -> Any:
        if self.json is _UNSET:
            self.json = json.loads(self.body) if self.body else None
        return self.json


class StreamBody:
    """A streamed response body: chunks pushed by the producer, drained by one consumer.

    Chunks pushed before the consumer subscribes are buffered; ``subscribe`` returns a
    Deferred that fires when the stream ends (or fails).
    """

    def __init__(self) -> None:
        self._buffer: list[bytes] = []
        self._consumer: Callable[[bytes], None] | None = None
        self._done: Deferred[None] = Deferred()
        self._ended = False
        self._error: Failure | BaseException | None = None
        self.on_cancel: Callable[[], None] | None = None
        #: Body bytes pushed so far.
        self.sent = 0
        self._on_finished: list[Callable[[int], None]] = []

    def when_finished(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(sent)`` once the stream ends, fails or is cancelled (and its
        consumer has seen the end)."""
        self._on_finished.append(observer)

    def _finished(self) -> None:
        observers, self._on_finished = self._on_finished, []
        for observer in observers:
            observer(self.sent)

    def push(self, chunk: bytes) -> None:
        if self._ended:
            return
        self.sent += len(chunk)
        if self._consumer is None:
            self._buffer.append(chunk)
        else:
            self._consumer(chunk)

    def finish(self) -> None:
        if not self._ended:
            self._ended = True
            if self._consumer is not None:
                self._done.callback(None)
                self._finished()

    def fail(self, reason: Failure | BaseException) -> None:
        if not self._ended:
            self._ended = True
            self._error = reason
            if self._consumer is not None:
                self._done.errback(reason)
                self._finished()

    def cancel(self) -> None:
        """The consumer went away: stop the producer."""
        self._ended = True
        if self.on_cancel is not None:
            self.on_cancel()
        self._finished()

    def subscribe(self, consumer: Callable[[bytes], None]) -> Deferred[None]:
        self._consumer = consumer
        buffered, self._buffer = self._buffer, []
        for chunk in buffered:
            consumer(chunk)
        if self._ended and not self._done.called:
            if self._error is None:
                self._done.callback(None)
            else:
                self._done.errback(self._error)
            self._finished()
        return self._done


@dataclass(slots=True)
class Response:
    """A response in the gateway's own form."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    stream: StreamBody | None = None


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status=status,
        body=fastjson.dumps(value),
        headers=headers or {},
    )
