"""``GET /api/v1/health``: every backend module's health, gathered with a deadline.

A probe route (tier ``probe``, ``docs/security.md`` § Probes): never rate-limited nor
blocked, and answered from a result at most :data:`MAX_AGE` seconds old — concurrent
probes share one in-flight fan-out — so a flood of probes costs the modules nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from aico.gateway.api.health.dependencies import HealthDeps
from aico.gateway.api.health.exceptions import ModuleHealthError
from aico.gateway.api.health.schemas import HEALTH_RESPONSE
from aico.gateway.routing.aggregator import Part, fan_out
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.chain import PROBE_TIER
from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap


def _ask(deps: HealthDeps, topic: str) -> Callable[[], Deferred[Any]]:
    def go() -> Deferred[Any]:
        message = wrap(ApiRequest(method="GET", path="/health"), source="gateway")
        d = deps.bus.request(topic, message, timeout=deps.deadline() + 1)
        return d.addCallback(_read_status)

    return go


def _read_status(reply: AicoMessage) -> str:
    response = unpack(reply, ApiResponse)
    if response.status != 200:
        raise ModuleHealthError(f"health answered {response.status}")
    try:
        status = json.loads(response.body)["status"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModuleHealthError("health answer has no status") from e
    if not isinstance(status, str):
        raise ModuleHealthError("health status is not a string")
    return status


def summarize(modules: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The overall status and the modules that are not ``ok``."""
    partial = sorted(name for name, m in modules.items() if m["status"] != "ok")
    if not modules or len(partial) == len(modules):
        return "down", partial
    return ("degraded" if partial else "ok"), partial


#: Seconds a health result is served again before the modules are asked anew.
MAX_AGE = 1.0


class HealthCache:
    """One fan-out's result for :data:`MAX_AGE` seconds, and one fan-out at a time.

    :meth:`get` answers from the last result while it is at most *max_age* seconds old
    (measured on the injected clock from when it was gathered); otherwise it joins the
    fan-out in flight, or starts one. Each caller gets a fresh :class:`Response` (the
    dispatcher adds its own headers to it).
    """

    def __init__(self, clock: Any, gather: Callable[[], Deferred[Response]],
                 max_age: float = MAX_AGE) -> None:
        self._clock = clock
        self._gather = gather
        self.max_age = max_age
        self._result: tuple[float, int, bytes] | None = None
        self._waiting: list[Deferred[Response]] | None = None
        #: Fan-outs started (for tests and metrics).
        self.fan_outs = 0

    def get(self) -> Deferred[Response]:
        now = self._clock.seconds()
        if self._result is not None and now - self._result[0] <= self.max_age:
            return succeed(self._answer(self._result))
        d: Deferred[Response] = Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        self.fan_outs += 1
        maybeDeferred(self._gather).addCallbacks(self._done, self._failed)
        return d

    @staticmethod
    def _answer(result: tuple[float, int, bytes]) -> Response:
        return Response(status=result[1], body=result[2])

    def _done(self, response: Response) -> None:
        result = (self._clock.seconds(), response.status, response.body)
        self._result = result
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(self._answer(result))

    def _failed(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.errback(failure)


def make_handler(deps: HealthDeps) -> Callable[[Request], Deferred[Response]]:
    cache = HealthCache(deps.clock, lambda: gather())

    def health(request: Request) -> Deferred[Response]:
        return cache.get()

    def gather() -> Deferred[Response]:
        known = deps.modules()
        calls = {}
        report: dict[str, dict[str, Any]] = {}
        for name, info in known.items():
            topic = info.registration.health_topic
            if not info.alive:
                report[name] = {"status": "unavailable", "version": info.version,
                                "latency_ms": None, "detail": "no heartbeat"}
            elif topic:
                calls[name] = _ask(deps, topic)
            else:
                report[name] = {"status": "ok", "version": info.version, "latency_ms": None}

        def done(parts: dict[str, Part]) -> Response:
            for name, part in parts.items():
                version = known[name].version
                if part.status == "ok":
                    status = "ok" if part.value == "ok" else "degraded"
                    report[name] = {"status": status, "version": version,
                                    "latency_ms": part.latency_ms}
                else:
                    report[name] = {"status": part.status, "version": version,
                                    "latency_ms": part.latency_ms, "detail": part.error}
            overall, partial = summarize(report)
            body = {"status": overall, "modules": dict(sorted(report.items())),
                    "partial": partial}
            return json_response(body, status=503 if overall == "down" else 200)

        return fan_out(deps.clock, calls, deps.deadline()).addCallback(done)

    return health


def routes(deps: HealthDeps) -> list[RouteEntry]:
    return [
        RouteEntry(
            method="GET",
            path="/api/v1/health",
            handler=make_handler(deps),
            public=True,
            tier=PROBE_TIER,
            response_schema=HEALTH_RESPONSE,
            summary="Health of the gateway and every backend module",
        )
    ]
