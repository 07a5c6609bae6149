"""Prometheus metrics of one gateway (docs/metrics.md), in ``prometheus_client``'s formats.

:class:`GatewayMetrics` owns a :class:`~prometheus_client.CollectorRegistry` of its own —
never the library's global one, so two gateways in one process (tests, the in-memory
layer) never share a number — and :meth:`GatewayMetrics.resource` serves it as a
``twisted.web`` resource (the admin site mounts it at ``/admin/metrics``).

Two kinds of numbers:

* **events**, counted when they happen: finished requests and their latency (a dispatcher
  observer, :meth:`GatewayMetrics.observe_request`), bus round trips
  (:attr:`BusForwarder.on_round_trip <aico.gateway.routing.backend.BusForwarder>`),
  rate-limit blocks (the limiter's ``on_block``). The request observer runs once per
  request on the hot path: its labelled children are looked up once per (method, route
  template, status, transport) and cached, so a request costs two dictionary look-ups, a
  counter increment and a histogram observation (docs/performance.md has the figure);
* **state**, read at scrape time by a collector (:class:`StateCollector`), so the hot path
  pays nothing for it: open connections by transport, module health, rate-limit
  decisions (the limiter counts them in a plain dictionary), the audit chain's length.

Routes are labelled by their **template** (``/api/v1/users/{username}``), never the raw
path: the raw path is chosen by the client, and a label per path would grow without
bound. A request that matched no route is labelled ``(unmatched)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.server import Request as WebRequest

from aico.gateway.routing.messages import Request

__all__ = [
    "BUS_BUCKETS",
    "REQUEST_BUCKETS",
    "UNMATCHED",
    "Formatter",
    "GatewayMetrics",
    "MetricsResource",
    "StateCollector",
]

#: Request latency buckets (seconds): the gateway answers in ~1 to 100 ms; the tail up to
#: 10 s shows bus timeouts and slow modules.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
#: Bus round-trip buckets (seconds): a local round trip is well under a millisecond.
BUS_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0)
#: The route label of a request that matched no route (404, 405, refused before routing).
UNMATCHED = "(unmatched)"
#: Method labels a request that matched no route may carry; any other is ``OTHER``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Runs a function elsewhere (a thread pool) and fires with its result.
Formatter = Callable[[Callable[[], bytes]], "Deferred[bytes]"]


class _Connection(Protocol):
    @property
    def info(self) -> Any: ...


class _Channels(Protocol):
    channels: Any


class _Modules(Protocol):
    @property
    def modules(self) -> Mapping[str, Any]: ...


class _Audit(Protocol):
    head: tuple[int, str] | None

    def latest(self, limit: int = 100) -> Deferred[Any]: ...


class StateCollector:
    """Values read when Prometheus scrapes, from the gateway's parts (nothing on the hot
    path): open connections, module health, rate-limit decisions, the audit chain."""

    def __init__(
        self,
        *,
        connections: Callable[[], Iterable[_Connection]] = lambda: (),
        http_sites: Callable[[], Mapping[str, _Channels]] = lambda: {},
        directory: _Modules | None = None,
        limiter: Callable[[], Any] = lambda: None,
        audit: _Audit | None = None,
    ) -> None:
        self.connections = connections
        self.http_sites = http_sites
        self.directory = directory
        self.limiter = limiter
        self.audit = audit
        #: The audit chain's last ``seq`` read from the database at start
        #: (:meth:`GatewayMetrics.start`); the log's own head wins once it moves.
        self.audit_seq_at_start = 0

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily,
                                 GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "aico_open_connections",
                "Open client connections by transport (http/tls: HTTP connections, "
                "kept alive or busy; websocket/wss/ipc/ipc-tcp: sessions).",
                labels=["transport"]),
            GaugeMetricFamily(
                "aico_module_up",
                "Backend module health from the module directory: 1 registered and "
                "heartbeating, 0 dropped.",
                labels=["module"]),
            CounterMetricFamily(
                "aico_ratelimit_decisions",
                "Rate-limit decisions by tier and outcome (allowed, refused).",
                labels=["tier", "outcome"]),
            GaugeMetricFamily(
                "aico_audit_chain_length",
                "Entries in the audit chain (its last sequence number) as this process "
                "knows it."),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        conns, modules, decisions, audit = self._families()
        counts: dict[str, int] = {name: 0 for name in ("http", "tls", "websocket", "wss", "ipc")}
        for name, site in self.http_sites().items():
            # A channel whose connection a WebSocket took over has no transport left:
            # that connection is counted as a session below.
            counts[name] = sum(1 for c in list(site.channels)
                               if getattr(c, "transport", None) is not None)
        for conn in self.connections():
            transport = conn.info.transport
            counts[transport] = counts.get(transport, 0) + 1
        for transport, n in sorted(counts.items()):
            conns.add_metric([transport], n)
        yield conns

        if self.directory is not None:
            for name, info in sorted(self.directory.modules.items()):
                modules.add_metric([name], 1 if info.alive else 0)
        yield modules

        limiter = self.limiter()
        counted: Mapping[tuple[str, bool], int] = getattr(limiter, "decision_counts", {})
        for (tier, allowed), n in sorted(counted.items()):
            decisions.add_metric([tier, "allowed" if allowed else "refused"], n)
        yield decisions

        if self.audit is not None:
            head = self.audit.head
            audit.add_metric([], max(head[0] if head else 0, self.audit_seq_at_start))
        yield audit


class GatewayMetrics:
    """One gateway's metrics: its registry, its event metrics and its state collector."""

    log = Logger()

    def __init__(self, clock: IReactorTime, state: StateCollector | None = None, *,
                 process: bool = True, formatter: Formatter | None = None) -> None:
        self.clock = clock
        #: Runs the text formatting of a scrape (a thread pool in production); ``None``:
        #: formatted at once, on the calling thread.
        self.formatter = formatter
        #: The metrics that are safe to read from any thread (``prometheus_client``'s own
        #: types lock their values; the process collectors read /proc and ``gc``).
        self.events = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "aico_requests", "Finished requests by method, route template, status and "
            "transport.", ["method", "route", "status", "transport"], registry=self.events)
        self.latency = Histogram(
            "aico_request_duration_seconds", "Time from a request's arrival until its "
            "response (or the end of its stream) went out, by method, route template and "
            "transport.", ["method", "route", "transport"], buckets=REQUEST_BUCKETS,
            registry=self.events)
        self.bus_round_trip = Histogram(
            "aico_bus_round_trip_seconds", "Time from sending a request to a backend module "
            "on the bus until its reply (the first message of a streamed one) came back, by "
            "topic.", ["topic"], buckets=BUS_BUCKETS, registry=self.events)
        self.blocks = Counter(
            "aico_ratelimit_blocks", "Temporary blocks of a client by the rate limiter, by "
            "the tier whose refusals caused them.", ["tier"], registry=self.events)
        if process:
            # The process's own CPU, memory, file descriptors, GC and Python version.
            ProcessCollector(registry=self.events)
            PlatformCollector(registry=self.events)
            GCCollector(registry=self.events)
        #: The gateway's state, read on the reactor thread only.
        self.state = state if state is not None else StateCollector()
        #: This gateway's registry, everything in it (never ``prometheus_client.REGISTRY``).
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.events)
        self.registry.register(self.state)
        #: (method, route, status, transport) -> (counter child, histogram child).
        self._children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}
        #: topic -> bus round-trip histogram child.
        self._topics: dict[str, Any] = {}

    # -- events ------------------------------------------------------------------------

    def observe_request(self, request: Request, status: int, body_bytes: int) -> None:
        """A dispatcher observer: *request* finished with *status*."""
        route = request.route
        if route is not None:
            key = (route.method, route.path, status, request.transport)
        else:
            method = request.method if request.method in _METHODS else "OTHER"
            key = (method, UNMATCHED, status, request.transport)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._labelled(key)
        children[0].inc()
        if request.started:
            children[1].observe(max(0.0, self.clock.seconds() - request.started))

    def _labelled(self, key: tuple[str, str, int, str]) -> tuple[Any, Any]:
        method, route, status, transport = key
        return (self.requests.labels(method, route, str(status), transport),
                self.latency.labels(method, route, transport))

    def observe_round_trip(self, topic: str, seconds: float) -> None:
        """A bus request to *topic* was answered after *seconds*."""
        child = self._topics.get(topic)
        if child is None:
            child = self._topics[topic] = self.bus_round_trip.labels(topic)
        child.observe(max(0.0, seconds))

    def blocked(self, client: str, tier: str, seconds: float) -> None:
        """The rate limiter blocked *client* (its ``on_block``)."""
        self.blocks.labels(tier).inc()

    # -- state -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Read the audit chain's length once (later appends move the log's own head)."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        audit = self.state.audit
        if audit is None:
            return
        try:
            latest = await audit.latest(1)
        except Exception:
            self.log.failure("metrics: could not read the audit chain's length")
            return
        if latest:
            self.state.audit_seq_at_start = int(latest[0].seq)

    # -- exposition --------------------------------------------------------------------

    def render(self, accept: str = "") -> Deferred[tuple[bytes, str]]:
        """The registry in the format *accept* asks for (Prometheus text by default).

        The gateway's state (:class:`StateCollector`) is read at once, on the calling
        (reactor) thread — it is only ever touched there; the rest (``prometheus_client``'s
        own counters and histograms, which lock their values) is read and formatted by
        :attr:`formatter`, in production on a pool thread: that is nearly all of a
        scrape's cost (docs/performance.md)."""
        encoder, content_type = choose_encoder(accept)
        scrape = _Scrape(self.events, list(self.state.collect()))
        if self.formatter is None:
            return succeed((encoder(scrape), content_type))
        return self.formatter(lambda: encoder(scrape)).addCallback(
            lambda body: (body, content_type))

    def resource(self) -> MetricsResource:
        """A ``twisted.web`` resource serving this registry (``GET``/``HEAD``)."""
        return MetricsResource(self)


class _Scrape:
    """One scrape: the thread-safe metrics as they are when the encoder reads them, and
    the gateway's state as it was read on the reactor thread."""

    def __init__(self, events: CollectorRegistry, state: list[Metric]) -> None:
        self.events = events
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from self.events.collect()
        yield from self.state


class MetricsResource(Resource):
    """Serves a :class:`GatewayMetrics` registry (``GET`` and ``HEAD``).

    Not ``prometheus_client.twisted.MetricsResource``: that one is a WSGI resource on the
    *global* reactor's thread pool — importing it installs the default reactor — and it
    would read the gateway's state from a pool thread, racing with the reactor. Here the
    values are read on the reactor and only the text is made elsewhere
    (:meth:`GatewayMetrics.render`).
    """

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics

    def render_GET(self, request: WebRequest) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self.metrics.render(request.getHeader("accept") or "")

        def send(result: tuple[bytes, str]) -> None:
            if gone:
                return
            body, content_type = result
            request.setHeader("Content-Type", content_type)
            request.setHeader("Content-Length", str(len(body)))
            request.setHeader("Cache-Control", "no-store")
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            self.metrics.log.failure("metrics scrape failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.setHeader("Content-Type", "text/plain; charset=utf-8")
                request.write(b"metrics could not be rendered\n")
                request.finish()

        d.addCallbacks(send, failed)
        return NOT_DONE_YET
