"""Start a real gateway in the test's reactor, on 127.0.0.1 with free ports."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from aico.gateway import config as configuration
from aico.gateway.composition import GatewayParts, compose
from aico.gateway.service import GatewayService
from aico.gateway.state import bootstrap
from aico.keystore import TEST_KDF

#: Every listener on a free port (TOML), so gateways run side by side.
FREE_LISTENERS = """
[http]
port = 0
[tls]
port = 0
[admin]
port = 0
[bus]
pub = "tcp://127.0.0.1:*"
sub = "tcp://127.0.0.1:*"
[ipc]
fallback = "tcp://127.0.0.1:*"
"""

#: Generous rate limits: tests that exercise rate limiting set their own tiers.
GENEROUS_LIMITS = """
[ratelimit.tiers.public]
requests = 100000
per_seconds = 60
burst = 10000
[ratelimit.tiers.standard]
requests = 100000
per_seconds = 60
burst = 10000
[ratelimit.tiers.auth]
requests = 10000
per_seconds = 60
burst = 1000
[ratelimit.tiers.admin]
requests = 100000
per_seconds = 60
burst = 10000
"""

#: Free ports and generous limits.
FREE_PORTS = FREE_LISTENERS + GENEROUS_LIMITS


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """*base* with *extra* laid over it, table by table."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RunningGateway:
    service: GatewayService
    state_dir: Path
    ports: dict[str, Any]

    @property
    def parts(self) -> GatewayParts:
        """The running gateway's parts (route table, chain, connections, …)."""
        parts: GatewayParts = self.service.parts
        return parts

    @property
    def base(self) -> str:
        http = self.ports["http"]
        return f"http://{http['host']}:{http['port']}"

    @property
    def tls_address(self) -> tuple[str, int]:
        """``(host, port)`` of the ``tls`` listener."""
        tls = self.ports["tls"]
        return str(tls["host"]), int(tls["port"])

    @property
    def admin_password(self) -> str:
        return (self.state_dir / "initial-admin-password").read_text().strip()

    @property
    def bus_pub(self) -> str:
        return str(self.ports["bus"]["pub"])

    @property
    def bus_sub(self) -> str:
        return str(self.ports["bus"]["sub"])


def start_gateway(test: TestCase, extra: str = "", state_dir: Path | None = None,
                  reactor: Any = None) -> Deferred[RunningGateway]:
    """Start a gateway configured by ``FREE_PORTS`` + *extra*; stopped in the test's cleanup.

    A fresh state directory is bootstrapped first with the test KDF parameters
    (:data:`aico.keystore.TEST_KDF`), so opening its keystore costs nothing; production
    starts make theirs with the strong ones.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = configuration.from_mapping(merge(tomllib.loads(FREE_PORTS), tomllib.loads(extra)),
                                        "<test>")
    root = state_dir or Path(test.mktemp())
    if not (root / "keystore.json").exists():
        # The master-key file, never the keyring of whoever runs the tests.
        bootstrap(root, config.modules.builtin, kdf=TEST_KDF,
                  env={**os.environ, "AICO_NO_KEYRING": "1"})
    service = compose(config, root, reactor)
    service.on_fatal = None  # a test's gateway that fails to start fails the test, not trial
    service.privilegedStartService()
    return Deferred.fromCoroutine(_started(test, service, root))


async def _started(test: TestCase, service: GatewayService, root: Path) -> RunningGateway:
    test.addCleanup(service.stopService)
    service.startService()
    await service.when_ready()
    ports = json.loads((root / "ports.json").read_text())
    return RunningGateway(service, root, ports)


class AuthedClient:
    """A treq client that sends ``Authorization: Bearer TOKEN`` unless told otherwise."""

    def __init__(self, client: Any, token: str | None) -> None:
        self.client = client
        self.token = token

    def request(self, method: str, url: str, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", None) or {})
        if self.token and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {self.token}"
        return self.client.request(method, url, headers=headers, **kw)

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def head(self, url: str, **kw: Any) -> Any:
        return self.request("HEAD", url, **kw)

    def post(self, url: str, **kw: Any) -> Any:
        return self.request("POST", url, **kw)

    def patch(self, url: str, **kw: Any) -> Any:
        return self.request("PATCH", url, **kw)

    def put(self, url: str, **kw: Any) -> Any:
        return self.request("PUT", url, **kw)

    def delete(self, url: str, **kw: Any) -> Any:
        return self.request("DELETE", url, **kw)


def http_client(test: TestCase, reactor: Any = None, token: str | None = None) -> AuthedClient:
    """A treq client whose connection pool is closed in the test's cleanup."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    test.addCleanup(pool.closeCachedConnections)
    return AuthedClient(HTTPClient(Agent(reactor, pool=pool)), token)


async def login(http: Any, base: str, username: str, password: str) -> dict[str, Any]:
    """``POST /api/v1/users/authenticate``; returns the token body (asserting 200)."""
    r = await http.post(base + "/api/v1/users/authenticate",
                        json={"username": username, "password": password},
                        headers={"Authorization": ""})
    body = json.loads(await r.content())
    if r.code != 200:
        raise AssertionError(f"login failed: {r.code} {body}")
    return body  # type: ignore[no-any-return]
