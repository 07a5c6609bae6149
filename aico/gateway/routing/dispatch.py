"""The dispatcher: match a route, run the security chain, call the handler.

Every adapter calls :meth:`Dispatcher.handle` with a normalized :class:`Request` and
gets a normalized :class:`Response` back; errors of every kind are turned into
problem responses here, in one place (:func:`~aico.gateway.errors.to_api_error` decides
which problem an exception is). The session layer's control requests (subscribe,
unsubscribe) come in through :meth:`Dispatcher.handle_control`: a route given by the
caller, its own list of chain steps, the same conversion and the same access log.

Per-request code here uses Deferred callbacks rather than coroutines on purpose (one
allocation less per step); everything off the hot path uses ``async def``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico.gateway.errors import PROBLEM_CONTENT_TYPE, ApiError, InternalError, problem_body, to_api_error
from aico.gateway.routing.messages import Request, Response, Step
from aico.gateway.routing.table import RouteEntry, RouteTable

__all__ = ["Dispatcher", "Finished", "Step", "error_response"]

#: Told of every finished request: (request, status, response body bytes).
Finished = Callable[[Request, int, int], None]


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

    def __init__(self, table: RouteTable, steps: Sequence[Step] = (), *,
                 clock: IReactorTime | None = None,
                 observers: Sequence[Finished] = ()) -> None:
        self.table = table
        self.steps: tuple[Step, ...] = tuple(steps)
        self.clock = clock
        #: Called once per finished request (the access log, metrics).
        self.observers: list[Finished] = list(observers)

    def set_table(self, table: RouteTable) -> None:
        self.table = table

    def handle(self, request: Request) -> Deferred[Response]:
        """Answer *request*; the Deferred never fails (errors become problem responses)."""
        out = self.handle_now(request)
        return out if isinstance(out, Deferred) else succeed(out)

    def handle_now(self, request: Request) -> Response | Deferred[Response]:
        """:meth:`handle`, with the answer itself when nothing had to wait (every step
        and the handler answered at once: the common case) — no Deferred to make and
        run callbacks on. The observers are told the same way either way."""
        if self.clock is not None and not request.started:
            request.started = self.clock.seconds()
        try:
            entry, params = self.table.match(request.method, request.path)
            request.route = entry
            request.path_params = params
            out = self._run_now(request, self.steps, 0)
        except Exception as e:
            out = self.convert(Failure(e), request)
        if isinstance(out, Deferred):
            if self.observers:
                out.addCallback(self._observe, request)
            return out
        if self.observers:
            self._observe(out, request)
        return out

    def handle_control(self, request: Request, route: RouteEntry,
                       steps: Sequence[Step]) -> Deferred[Response]:
        """Answer a request for *route* (not in the table) through *steps*."""
        if self.clock is not None and not request.started:
            request.started = self.clock.seconds()
        request.route = route
        d = self._run(request, tuple(steps), 0)
        if self.observers:
            d.addCallback(self._observe, request)
        return d

    def finished(self, request: Request, status: int, body_bytes: int) -> None:
        """Tell the observers that *request* finished (adapters call this for answers
        they give without the dispatcher, e.g. a body over the limit)."""
        for observer in self.observers:
            try:
                observer(request, status, body_bytes)
            except Exception:
                self.log.failure("request observer failed")

    def _observe(self, response: Response, request: Request) -> Response:
        stream = response.stream
        if stream is None:
            self.finished(request, response.status, len(response.body))
        else:
            status = response.status
            stream.when_finished(lambda sent: self.finished(request, status, sent))
        return response

    def _run(self, request: Request, steps: tuple[Step, ...], start: int) -> Deferred[Response]:
        out = self._run_now(request, steps, start)
        return out if isinstance(out, Deferred) else succeed(out)

    def _run_now(self, request: Request, steps: tuple[Step, ...],
                 start: int) -> Response | Deferred[Response]:
        for i in range(start, len(steps)):
            try:
                result = steps[i](request)
            except Exception:
                return self.convert(Failure(), request)
            if result is not None:
                return self._after(result, request, steps, i + 1)
        assert request.route is not None
        try:
            out = request.route.handler(request)
        except Exception:
            return self.convert(Failure(), request)
        if isinstance(out, Deferred):
            d2: Deferred[Response] = out
        elif inspect.isawaitable(out):
            d2 = ensureDeferred(out)  # type: ignore[arg-type]
        else:
            return _with_headers(out, request)
        return d2.addCallback(_with_headers, request).addErrback(self.convert, request)

    def _after(self, step: Deferred[None], request: Request, steps: tuple[Step, ...],
               resume: int) -> Deferred[Response]:
        def next_step(_: object) -> Deferred[Response]:
            return self._run(request, steps, resume)

        d: Deferred[Response] = step.addCallback(next_step)
        return d.addErrback(self.convert, request)

    def convert(self, failure: Failure, request: Request) -> Response:
        """The one place where an exception becomes an error response."""
        error = to_api_error(failure)
        if isinstance(error, InternalError):
            self.log.failure(
                "unexpected error on {method} {path} (request {request_id})",
                failure,
                method=request.method,
                path=request.path,
                request_id=request.request_id,
            )
        return _with_headers(error_response(error, request.request_id), request)
