"""Backend modules for tests on the in-memory gateway, their behaviour switched by the test.

:class:`RawLike` is the SDK counterpart of the plain-pyzmq ``tests/rawmodule.py`` (which
stays for the real-socket tests of the wire contract, ``tests/test_http_real.py``): it
answers with what it received (path, path parameters, body, principal, request ID) and
its :attr:`~RawLike.mode` makes it silent, fail with a 500, hold a batch of requests and
answer them out of order, or stream chunks held until the test releases them; its
heartbeats stop while :attr:`~RawLike.beating` is false. A route may name several topics
(``"fan/a,fan/b"``, fanned out by the gateway): the module listens to each, and stays
silent on those in :attr:`~RawLike.silent_topics`.

:func:`raw_module` makes a module class to pass to
:meth:`~aico.gateway.testing.memory.MemoryGateway.add_module`; :func:`send` sends a
request without waiting for its answer (for requests that are held, or concurrent).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredQueue

from aico.bus.module import BackendModule, RequestContext, RouteSpec
from aico.gateway.testing.memory import MemoryGateway
from aico.proto import ApiRequest, ApiResponse


class RawLike(BackendModule):
    """Serves the routes in :attr:`specs`; see the module docstring."""

    name = "raw"
    version = "9.9"
    heartbeat_interval = 0.2
    #: The routes it registers (:func:`raw_module` sets them).
    specs: tuple[RouteSpec, ...] = ()

    def __init__(self, bus: Any, clock: Any) -> None:
        super().__init__(bus, clock)
        #: "echo": answer at once; "silent": never answer (health included); "crash":
        #: answer 500; "batch:N": hold N requests, then answer them shuffled; "stream":
        #: three chunks when the caller accepts a stream, each after the first waiting
        #: for :attr:`release`.
        self.mode = "echo"
        #: Requests on these topics are never answered.
        self.silent_topics: set[str] = set()
        #: Route requests received (answered or not).
        self.received = 0
        #: False: no heartbeat goes out.
        self.beating = True
        #: ``put(None)`` lets a held stream go on by one chunk.
        self.release: DeferredQueue[None] = DeferredQueue()
        #: What happened, in order ("chunk0", …).
        self.events: list[str] = []
        #: The path parameter ``item`` of each batched request, in the order answered.
        self.answered: list[str] = []
        self._held: list[tuple[Deferred[Any], ApiRequest]] = []
        for spec in self.specs:
            self.add_route(spec, self._handler_for(spec.topic))
        # A route naming several topics (the gateway fans it out) is one route in the
        # registration, and the module listens to each of its topics.
        self._topics = {}
        for spec in self.specs:
            for topic in spec.topic.split(","):
                self._topics.setdefault(topic.strip(), []).append(
                    (spec, self._handler_for(topic.strip())))

    def _handler_for(self, topic: str) -> Any:
        def handle(request: ApiRequest, ctx: RequestContext) -> Any:
            return self.handle(topic, request, ctx)
        return handle

    def beat(self) -> bool:
        return super().beat() if self.beating else False

    async def health(self) -> Any:
        if self.mode == "silent":
            await Deferred()  # never
        return await super().health()

    def answer(self, request: ApiRequest) -> dict[str, Any]:
        return {"path": request.path, "params": dict(request.path_params),
                "body": json.loads(request.body) if request.body else None,
                "subject": request.principal.subject, "transport": request.principal.transport,
                "request_id": request.request_id}

    def handle(self, topic: str, request: ApiRequest, ctx: RequestContext) -> Any:
        self.received += 1
        if self.mode == "silent" or topic in self.silent_topics:
            return Deferred()  # never answered
        if self.mode == "crash":
            return ApiResponse(request_id=request.request_id, status=500, body=b"oops")
        if self.mode.startswith("batch:"):
            d: Deferred[Any] = Deferred()
            self._held.append((d, request))
            if len(self._held) == int(self.mode.split(":")[1]):
                held, self._held = self._held, []
                random.Random(7).shuffle(held)
                for waiting, r in held:
                    self.answered.append(r.path_params["item"])
                    waiting.callback(self.answer(r))
            return d
        if self.mode == "stream" and ctx.streaming:
            return Deferred.fromCoroutine(self._stream(ctx))
        return self.answer(request)

    async def _stream(self, ctx: RequestContext) -> None:
        for i in range(3):
            ctx.send_chunk({"chunk": i})
            self.events.append(f"chunk{i}")
            if i < 2:
                await self.release.get()


def raw_module(routes: Iterable[RouteSpec], *, name: str = "raw", heartbeat_interval: float = 0.2,
               health_topic: str = "") -> type[RawLike]:
    """A :class:`RawLike` class named *name* serving *routes*."""
    attributes = {"name": name, "specs": tuple(routes), "heartbeat_interval": heartbeat_interval,
                  "health_topic": health_topic}
    return type(f"RawLike_{name}", (RawLike,), attributes)


def send(gateway: MemoryGateway, method: str, path: str, *, token: str | None = None,
         json_body: Any = None, data: bytes | None = None, headers: dict[str, str] | None = None,
         unbuffered: bool = False) -> Deferred[Any]:
    """Send a request to *gateway* and return at once (:meth:`MemoryGateway.send`)."""
    return gateway.send(method, path, token=token, json_body=json_body, data=data,
                        headers=headers, unbuffered=unbuffered)
