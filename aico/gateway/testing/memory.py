"""The whole gateway in memory: the production composition on in-memory parts.

:class:`MemoryGateway` builds the same :class:`~aico.gateway.composition.GatewayParts`
and the same service tree as ``twistd aico-gateway`` does, from the same config, but on

* a :class:`~twisted.internet.testing.MemoryReactorClock` (time moves only when the test
  says so: :meth:`MemoryGateway.advance`);
* a :class:`~aico.bus.testing.MemoryBus` on a :class:`~aico.bus.testing.MemoryBroker`
  (it passes the real bus client's contract tests, ``tests/test_bus_contract.py``); the
  built-in modules run on it in-process, and :meth:`MemoryGateway.add_module` starts a
  backend module of your own on its own memory bus;
* the registry in an in-memory SQLite database with the production schema
  (:class:`~aico.gateway.store.SyncDatabase`), a JWT keyring that lives in memory, and
  Argon2 at its cheapest parameters on the calling thread (:data:`CHEAP_HASHER`).

Clients reach it without a socket: REST through :class:`treq.testing.StubTreq` over the
gateway's own ``GatewaySite`` (its request limits included), WebSocket through
Autobahn's in-memory agent (``autobahn.twisted.testing``) connected to that same site, so
the upgrade goes through the REST adapter as it does over TCP. Every call is
synchronous underneath; :meth:`MemoryGateway.settle` moves bytes and zero-delay timers
until nothing moves any more. Backend-module authors can test their module against the
real route table and security chain this way (``docs/testing.md``).
"""

from __future__ import annotations

import json
import time
import tomllib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import argon2
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.http_headers import Headers

from aico.bus.builtin import BUILTIN_MODULES
from aico.bus.directory import ModuleDirectory
from aico.bus.module import BackendModule
from aico.bus.testing import MemoryBroker, MemoryBus
from aico.gateway import config as configuration
from aico.gateway.composition import GatewayParts, Materials, build_tree
from aico.gateway.config import Config
from aico.gateway.security.keys import KeyRing
from aico.gateway.security.passwords import PasswordService, make_hasher, synchronous_runner
from aico.gateway.service import GatewayService
from aico.gateway.store import SyncDatabase, sync_result
from aico.gateway.testing.harness import GENEROUS_LIMITS, merge
from aico.gateway.users import UserStore

__all__ = [
    "ADMIN_PASSWORD",
    "CHEAP_HASHER",
    "MemoryGateway",
    "MemoryHttpClient",
    "MemoryResponse",
    "MemoryWebSocket",
    "WebSocketRefused",
    "cheap_passwords",
]

#: Argon2id at its cheapest (RFC 9106 parameters are for production; tests need speed).
CHEAP_HASHER = make_hasher(argon2.profiles.CHEAPEST)
#: The password of the in-memory gateway's ``admin``.
ADMIN_PASSWORD = "admin-password-for-tests"  # noqa: S105 - a test fixture

#: The in-memory gateway's config under every test's own: no IPC, no broker, generous
#: rate limits (tests of rate limiting set their own tiers).
MEMORY_CONFIG = """
[ipc]
endpoint = ""
fallback = ""
[bus]
embedded_broker = false
""" + GENEROUS_LIMITS


def _clock_timer(clock: MemoryReactorClock) -> Any:
    """txaio's batched timer (what Autobahn's timeouts use) on *clock*."""
    from txaio._common import _BatchedTimer  # txaio has no public way to pick the clock

    return _BatchedTimer(200.0, 1000, seconds_provider=clock.seconds,  # type: ignore[no-untyped-call]
                         delayed_call_creator=clock.callLater)


def cheap_passwords() -> PasswordService:
    """A password service with :data:`CHEAP_HASHER` on the calling thread."""
    return PasswordService(synchronous_runner, CHEAP_HASHER)


class WebSocketRefused(AssertionError):
    """The gateway refused a WebSocket upgrade: :attr:`status` and the status line."""

    def __init__(self, status: int, status_line: str) -> None:
        super().__init__(f"WebSocket upgrade refused: {status_line}")
        self.status = status
        self.status_line = status_line


@dataclass
class MemoryResponse:
    """An answer read whole: status, headers, body."""

    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class _AsyncResponse:
    """A :class:`MemoryResponse` shaped like a treq response (``await r.content()``)."""

    def __init__(self, response: MemoryResponse) -> None:
        self.code = response.code
        self.headers = response.headers
        self._body = response.body

    def content(self) -> Deferred[bytes]:
        return succeed(self._body)

    def json(self) -> Deferred[Any]:
        return succeed(json.loads(self._body))


class MemoryHttpClient:
    """treq's calling convention over :meth:`MemoryGateway.request` (for tests written
    against a real gateway): any ``http://host:port`` prefix of the URL is dropped."""

    def __init__(self, gateway: MemoryGateway, token: str | None = None) -> None:
        self.gateway = gateway
        self.token = token

    def request(self, method: str, url: str, *, json: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, advance: float = 0.0,
                **_: Any) -> Deferred[_AsyncResponse]:
        path = url.split("://", 1)[1].split("/", 1)[1] if "://" in url else url.lstrip("/")
        headers = dict(headers or {})
        if self.token and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {self.token}"
        headers = {k: v for k, v in headers.items() if v != ""}
        response = self.gateway.request(method, "/" + path, json_body=json, data=data,
                                        headers=headers, advance=advance)
        return succeed(_AsyncResponse(response))

    def get(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("GET", url, **kw)

    def head(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("HEAD", url, **kw)

    def post(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("PUT", url, **kw)

    def patch(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("PATCH", url, **kw)

    def delete(self, url: str, **kw: Any) -> Deferred[_AsyncResponse]:
        return self.request("DELETE", url, **kw)


class _FlowTransport(iosim.FakeTransport):
    """An iosim transport with TCP's flow control (iosim's own has none).

    * :meth:`pauseProducing` / :meth:`resumeProducing` (what a protocol calls on its own
      transport to stop reading: the session layer's fair share, or a test's client
      that stops reading) hold back the bytes the pump would hand to this side;
    * past :attr:`high_water` bytes written and not yet taken by the peer, the
      registered streaming producer is paused, and resumed once the peer took them all
      (as ``twisted.internet.abstract.FileDescriptor`` does with its ``bufferSize``).
    """

    high_water = 65_536
    reading_paused = False
    producer_paused = False
    pending = 0

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        super().write(data)  # type: ignore[no-untyped-call]
        self.pending += len(data)
        if (self.pending > self.high_water and self.producer is not None
                and self.streamingProducer and not self.producer_paused):
            self.producer_paused = True
            self.producer.pauseProducing()

    def getOutBuffer(self) -> Any:
        self.pending = 0
        return super().getOutBuffer()  # type: ignore[no-untyped-call]

    def drained(self) -> None:
        if self.producer_paused and self.pending == 0:
            self.producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()


class _FlowPump(iosim.IOPump):
    """An :class:`iosim.IOPump` between two :class:`_FlowTransport` s: a side that
    paused reading gets nothing until it resumes."""

    clientIO: _FlowTransport
    serverIO: _FlowTransport

    def pump(self, debug: bool = False, advanceClock: bool = True) -> bool:
        if advanceClock:
            self.clock.advance(0)
        client, server = self.clientIO, self.serverIO
        to_server = None if server.reading_paused else client.getOutBuffer()
        to_client = None if client.reading_paused else server.getOutBuffer()
        if to_server:
            server.bufferReceived(to_server)  # type: ignore[no-untyped-call]
        if to_client:
            client.bufferReceived(to_client)  # type: ignore[no-untyped-call]
        client.drained()
        server.drained()
        if to_server or to_client:
            return True
        if server.disconnecting and not server.disconnected:
            server.disconnected = True
            client.disconnecting = True
            client.reportDisconnect()  # type: ignore[no-untyped-call]
            return True
        if client.disconnecting and not client.disconnected:
            client.disconnected = True
            server.disconnecting = True
            server.reportDisconnect()  # type: ignore[no-untyped-call]
            return True
        return False


class _Pumps:
    """The ``IPumper`` of Autobahn's memory agent, flushed when the gateway settles.

    Its pumps get TCP-like flow control (:class:`_FlowTransport`): a test pauses its
    client's reading with ``ws.transport.pauseProducing()``, and the gateway's socket
    then sees its transport's buffer fill as over TCP.
    """

    def __init__(self) -> None:
        self.pumps: set[iosim.IOPump] = set()

    def add(self, pump: iosim.IOPump) -> None:
        # Autobahn's agent builds plain iosim parts (and shakes hands on them first).
        pump.__class__ = _FlowPump
        pump.clientIO.__class__ = _FlowTransport
        pump.serverIO.__class__ = _FlowTransport
        self.pumps.add(pump)

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def flush(self) -> bool:
        moved = False
        for pump in list(self.pumps):
            moved = pump.flush() or moved
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.discard(pump)
        return moved


class MemoryWebSocket(WebSocketClientProtocol):
    """The test's side of an in-memory WebSocket: frames land in :attr:`frames`."""

    gateway: MemoryGateway

    def __init__(self) -> None:
        super().__init__()
        self.frames: deque[tuple[bytes, bool]] = deque()
        self.close_code: int | None = None
        self.closed_reason: str | None = None
        self.closed = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = True
        self.close_code = code
        self.closed_reason = reason

    def send(self, obj: Any) -> None:
        """Send a frame (a dict as JSON, ``str`` as text, ``bytes`` as binary); settles."""
        if isinstance(obj, bytes):
            self.sendMessage(obj, isBinary=True)  # type: ignore[no-untyped-call]
        elif isinstance(obj, str):
            self.sendMessage(obj.encode(), isBinary=False)  # type: ignore[no-untyped-call]
        else:
            self.sendMessage(json.dumps(obj).encode(), isBinary=False)  # type: ignore[no-untyped-call]
        self.gateway.settle()

    def recv_raw(self) -> tuple[bytes, bool]:
        """The oldest frame not read yet (AssertionError when there is none)."""
        self.gateway.settle()
        if not self.frames:
            raise AssertionError("no frame from the gateway")
        return self.frames.popleft()

    def recv(self) -> Any:
        """The oldest JSON frame not read yet."""
        return json.loads(self.recv_raw()[0])

    def recv_all(self) -> list[Any]:
        """Every JSON frame not read yet."""
        self.gateway.settle()
        out = [json.loads(p) for p, _ in self.frames]
        self.frames.clear()
        return out

    def close(self, code: int = 1000) -> None:
        self.sendClose(code)
        self.gateway.settle()


class MemoryGateway:
    """The gateway's composition on in-memory parts (see the module docstring).

    *config* is TOML laid over :data:`MEMORY_CONFIG`. *modules*: the built-in modules to
    run in-process (default: the config's). The gateway starts at once; :meth:`stop`
    (or the test's cleanup, when *test* is given) stops it.
    """

    def __init__(self, config: str = "", *, test: Any = None,
                 modules: Iterable[str] | None = None, config_path: str | None = None) -> None:
        self.clock = MemoryReactorClock()
        # Time starts at the wall clock's (tokens made outside carry realistic times),
        # then moves only when the test advances it.
        self.clock.advance(float(int(time.time())))
        self.config: Config = configuration.from_mapping(
            merge(tomllib.loads(MEMORY_CONFIG), tomllib.loads(config)), "<memory>")
        self.broker = MemoryBroker()
        self.bus = MemoryBus(self.clock, "gateway", broker=self.broker,
                             default_timeout=self.config.bus.request_timeout, record=False)
        self.directory = ModuleDirectory(self.bus, self.clock)
        self.database = SyncDatabase(":memory:")
        self.passwords = cheap_passwords()
        self.users = UserStore(self.database, self.clock)
        sync_result(self.users.create("admin", CHEAP_HASHER.hash(ADMIN_PASSWORD), ("admin",)))
        materials = Materials(keyring=KeyRing.ephemeral(), database=self.database,
                              passwords=self.passwords)
        self.parts = GatewayParts(self.config, self.clock, self.bus, self.directory, materials)
        #: The config file the admin API changes (``None``: the gateway has none).
        self.parts.config_path = config_path
        names = self.config.modules.builtin if modules is None else tuple(modules)
        self.modules: list[BackendModule] = [BUILTIN_MODULES[n](self.bus, self.clock) for n in names]
        self.fatal: list[int] = []
        self.service: GatewayService = build_tree(
            self.parts, bus=self.bus, directory=self.directory, modules=self.modules,
            on_fatal=self.fatal.append, signals=False)
        # Autobahn's own timers (handshake and close-handshake timeouts) go through txaio,
        # whose loop is the global reactor: put the gateway's socket factory on this clock.
        self._autobahn_timer = _clock_timer(self.clock)
        self.parts.ws_factory._batched_timer = self._autobahn_timer
        self._pumps = _Pumps()
        self._treq_clients: list[Any] = []
        self._extra: list[Any] = []
        self.http = self._stub()
        #: The admin site (``[admin]`` listener): :meth:`admin_request`.
        self.admin_http = self._stub(self.parts.admin.site)
        self.service.privilegedStartService()
        self.service.startService()
        self.settle()
        if test is not None:
            test.addCleanup(self.stop)

    # -- time and I/O ------------------------------------------------------------------

    def settle(self, rounds: int = 50) -> None:
        """Move bytes and run zero-delay timers until nothing moves any more."""
        for _ in range(rounds):
            moved = self._pumps.flush()
            for fake in self._treq_clients:
                fake.flush()
            due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]
            if due:
                self.clock.advance(0)
            if not moved and not due and not self._stub_data():
                return

    def _stub_data(self) -> bool:
        for fake in self._treq_clients:
            for pump in fake._agent._pumps:
                if pump.clientIO.stream or pump.serverIO.stream:
                    return True
        return False

    def advance(self, seconds: float) -> None:
        """Let *seconds* pass on the gateway's clock (timers fire), then settle."""
        self.clock.advance(seconds)
        self.settle()

    def stop(self) -> Deferred[None]:
        for conn in list(self.parts.connections):
            conn.close(1001, "test over")
        self.settle()
        d = self.service.stopService()
        self.advance(self.config.gateway.shutdown_grace + 1)
        return d

    # -- REST --------------------------------------------------------------------------

    def _stub(self, site: Any = None) -> Any:
        from treq.testing import StubTreq

        site = site if site is not None else self.parts.http_site
        fake = StubTreq(site.resource)
        # The gateway's own site (its request and channel classes, limits and timers on the
        # gateway's clock) instead of a plain Site around the same resource.
        fake._agent._serverFactory = site
        self._treq_clients.append(fake)
        return fake

    def send(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
             headers: dict[str, str] | None = None, token: str | None = None,
             unbuffered: bool = False, admin: bool = False) -> Deferred[Any]:
        """Send one HTTP request and return at once: a Deferred of the whole
        :class:`MemoryResponse` (of treq's response itself, with *unbuffered*), which fires
        as the gateway settles (:meth:`settle`, :meth:`advance`). *admin*: to the admin
        site (``Host: 127.0.0.1:8773``) instead of the ``http`` listener's."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": headers}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        if unbuffered:
            kwargs["unbuffered"] = True
        if admin:  # a test sees the admin site's redirects (303 after a login) itself
            kwargs["allow_redirects"] = False
            d: Deferred[Any] = self.admin_http.request(method, "http://127.0.0.1:8773" + path,
                                                       **kwargs)
        else:
            d = self.http.request(method, "http://127.0.0.1:8771" + path, **kwargs)
        return d if unbuffered else d.addCallback(self._read)

    def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, token: str | None = None,
                advance: float = 0.0) -> MemoryResponse:
        """Send one HTTP request and read the whole answer (synchronously)."""
        d = self.send(method, path, json_body=json_body, data=data, headers=headers, token=token)
        response: MemoryResponse = self._finish(d, advance, lambda r: r)
        return response

    def admin_request(self, method: str, path: str, *, json_body: Any = None,
                      data: bytes | None = None, headers: dict[str, str] | None = None,
                      token: str | None = None, advance: float = 0.0) -> MemoryResponse:
        """Send one HTTP request to the admin site and read the whole answer."""
        d = self.send(method, path, json_body=json_body, data=data, headers=headers,
                      token=token, admin=True)
        response: MemoryResponse = self._finish(d, advance, lambda r: r)
        return response

    def _read(self, response: Any) -> Deferred[MemoryResponse]:
        from treq import content

        d: Deferred[bytes] = content(response)
        return d.addCallback(lambda body: MemoryResponse(response.code, response.headers, body))

    def _finish(self, d: Deferred[Any], advance: float, then: Any) -> Any:
        outcome: list[Any] = []
        d.addCallback(then).addBoth(outcome.append)
        self.settle()
        waited = 0.0
        while not outcome and waited < advance:
            # In small steps: work that waits, then waits again, sees time pass each time.
            step = min(0.01, advance - waited)
            self.clock.advance(step)
            self.settle()
            waited += step
        if not outcome:
            raise AssertionError("the request did not finish (does it wait for time to pass?)")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def raw_http(self, *chunks: bytes, gap: float = 0.0,
                 admin: bool = False) -> tuple[bytes, bool]:
        """Write *chunks* to a fresh connection of the site (the admin site's, with
        *admin*), *gap* seconds apart on the gateway's clock: ``(everything the gateway
        wrote, whether it closed)``."""
        from twisted.internet.testing import StringTransport

        site = self.parts.admin.site if admin else self.parts.http_site
        channel = site.buildProtocol(  # type: ignore[no-untyped-call]
            IPv4Address("TCP", "127.0.0.1", 31337))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 31337))
        channel.makeConnection(transport)
        for i, chunk in enumerate(chunks):
            if i and gap:
                self.advance(gap)
            if transport.disconnecting:
                break
            channel.dataReceived(chunk)
            self.settle()
        return transport.value(), bool(transport.disconnecting)

    def client(self, token: str | None = None) -> MemoryHttpClient:
        """A treq-like client (``await client.get(url)``; ``r.code``, ``await
        r.content()``) on this gateway, sending *token* unless told otherwise."""
        return MemoryHttpClient(self, token)

    def get(self, path: str, **kw: Any) -> MemoryResponse:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> MemoryResponse:
        return self.request("POST", path, json_body=body, **kw)

    def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, Any]:
        """``POST /api/v1/users/authenticate``; the token body (AssertionError unless 200)."""
        r = self.post("/api/v1/users/authenticate", {"username": username, "password": password})
        if r.code != 200:
            raise AssertionError(f"login failed: {r.code} {r.body!r}")
        body: dict[str, Any] = r.json()
        return body

    def token(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
        return str(self.login(username, password)["access_token"])

    def add_user(self, username: str, password: str, roles: Iterable[str] = ("user",)) -> None:
        """Create a user straight in the registry (no HTTP, no audit)."""
        sync_result(self.users.create(username, CHEAP_HASHER.hash(password), tuple(roles)))

    # -- WebSocket ---------------------------------------------------------------------

    def websocket(self, path: str = "/ws", *, headers: dict[str, str] | None = None,
                  protocols: list[str] | None = None) -> MemoryWebSocket:
        """Open a WebSocket to the gateway's site; a refused upgrade raises
        :class:`WebSocketRefused` (its HTTP status in ``status``)."""
        agent = create_memory_agent(  # type: ignore[no-untyped-call]
            self.clock, self._pumps, self._server_channel)
        owner = self

        made: list[MemoryWebSocket] = []

        class Client(MemoryWebSocket):
            gateway = owner

            def __init__(self) -> None:
                super().__init__()
                made.append(self)

            def connectionMade(self) -> None:
                self.factory._batched_timer = owner._autobahn_timer  # the client's too
                super().connectionMade()

        options: dict[str, Any] = {"headers": headers or {}}
        if protocols:
            options["protocols"] = protocols
        d = agent.open("ws://127.0.0.1:8771" + path, options, protocol_class=Client)
        try:
            client: MemoryWebSocket = self._finish(d, 0.0, lambda proto: proto)
        except AssertionError:
            # Autobahn's client never fires its open Deferred for a refused upgrade.
            line = str(getattr(made[0], "http_status_line", "") or "") if made else ""
            status = line.split(" ", 2)[1:2]
            if status and status[0].isdigit() and status[0] != "101":
                raise WebSocketRefused(int(status[0]), line) from None
            raise
        return client

    def _server_channel(self) -> Any:
        return self.parts.http_site.buildProtocol(  # type: ignore[no-untyped-call]
            IPv4Address("TCP", "127.0.0.1", 31337))

    # -- modules -----------------------------------------------------------------------

    def add_module(self, module_class: type[BackendModule]) -> BackendModule:
        """Start a backend module on a memory bus of its own, on the gateway's broker."""
        bus = MemoryBus(self.clock, module_class.name, broker=self.broker)
        module = module_class(bus, self.clock)
        d = module.start()
        self.settle()
        self._extra.append(module)
        d.addErrback(lambda f: f.raiseException())
        return module
