"""The dispatcher: match a route, run the security chain, call the handler.

Every adapter calls :meth:`Dispatcher.handle` with a normalized :class:`Request` and
gets a normalized :class:`Response` back; errors of every kind are turned into
problem responses here, in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico.bus.errors import BusStopped, BusTimeout
from aico.gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    BackendTimeout,
    BackendUnavailable,
    InternalError,
    problem_body,
)
from aico.gateway.routing.messages import Request, Response
from aico.gateway.routing.table import RouteTable

#: A security-chain step: inspects (and may annotate) the request, raises ApiError to refuse.
Step = Callable[[Request], "Deferred[None] | None"]


def _with_headers(response: Response, request: Request) -> Response:
    """Add the chain's header fields (rate limits) without overriding the handler's."""
    for name, value in request.response_headers.items():
        response.headers.setdefault(name, value)
    return response


def error_response(error: ApiError, request_id: str) -> Response:
    return Response(
        status=error.status,
        body=problem_body(error, request_id),
        headers=dict(error.headers),
        content_type=PROBLEM_CONTENT_TYPE,
    )


class Dispatcher:
    """Route table + security chain + handlers, shared by every adapter."""

    log = Logger()

    def __init__(self, table: RouteTable, steps: Sequence[Step] = ()) -> None:
        self.table = table
        self.steps: tuple[Step, ...] = tuple(steps)
        #: Called with every finished (request, response), e.g. for metrics.
        self.observers: list[Callable[[Request, Response], None]] = []

    def set_table(self, table: RouteTable) -> None:
        self.table = table

    def handle(self, request: Request) -> Deferred[Response]:
        """Answer *request*; the Deferred never fails (errors become problem responses)."""
        try:
            entry, params = self.table.match(request.method, request.path)
            request.route = entry
            request.path_params = params
            return self._run(request, 0)
        except Exception as e:
            return succeed(self.convert(Failure(e), request))

    def _run(self, request: Request, start: int) -> Deferred[Response]:
        steps = self.steps
        for i in range(start, len(steps)):
            result = steps[i](request)
            if result is not None:
                return self._after(result, request, i + 1)
        assert request.route is not None
        try:
            out = request.route.handler(request)
        except Exception:
            return succeed(self.convert(Failure(), request))
        if isinstance(out, Deferred):
            d2: Deferred[Response] = out
        elif inspect.isawaitable(out):
            d2 = ensureDeferred(out)  # type: ignore[arg-type]
        else:
            return succeed(_with_headers(out, request))
        return d2.addCallback(_with_headers, request).addErrback(self.convert, request)

    def _after(self, step: Deferred[None], request: Request, resume: int) -> Deferred[Response]:
        def next_step(_: object) -> Deferred[Response]:
            return self._run(request, resume)

        d: Deferred[Response] = step.addCallback(next_step)
        return d.addErrback(self.convert, request)

    def convert(self, failure: Failure, request: Request) -> Response:
        """The one place where an exception becomes an error response."""
        error = failure.value
        if isinstance(error, ApiError):
            return _with_headers(error_response(error, request.request_id), request)
        if isinstance(error, BusTimeout):
            return error_response(BackendTimeout("the backend module did not answer in time"),
                                  request.request_id)
        if isinstance(error, BusStopped):
            return error_response(BackendUnavailable("the message bus is shutting down"),
                                  request.request_id)
        self.log.failure(
            "unexpected error on {method} {path} (request {request_id})",
            failure,
            method=request.method,
            path=request.path,
            request_id=request.request_id,
        )
        return error_response(InternalError(), request.request_id)


