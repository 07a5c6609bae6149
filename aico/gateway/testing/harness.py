"""Start a real gateway in the test's reactor, on 127.0.0.1 with free ports."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from aico.gateway import config as configuration
from aico.gateway.service import GatewayService
from aico.gateway.tap import build_service

#: Every listener on a free port, so tests run side by side.
FREE_PORTS = """
[http]
port = 0
[bus]
pub = "tcp://127.0.0.1:*"
sub = "tcp://127.0.0.1:*"
[ipc]
fallback = "tcp://127.0.0.1:*"
"""


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
    def base(self) -> str:
        http = self.ports["http"]
        return f"http://{http['host']}:{http['port']}"

    @property
    def bus_pub(self) -> str:
        return str(self.ports["bus"]["pub"])

    @property
    def bus_sub(self) -> str:
        return str(self.ports["bus"]["sub"])


def start_gateway(test: TestCase, extra: str = "", state_dir: Path | None = None,
                  reactor: Any = None) -> Deferred[RunningGateway]:
    """Start a gateway configured by ``FREE_PORTS`` + *extra*; stopped in the test's cleanup."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = configuration.from_mapping(merge(tomllib.loads(FREE_PORTS), tomllib.loads(extra)),
                                        "<test>")
    root = state_dir or Path(test.mktemp())
    service = build_service(config, root, reactor)

    async def go() -> RunningGateway:
        service.startService()
        test.addCleanup(service.stopService)
        await service.ready
        ports = json.loads((root / "ports.json").read_text())
        return RunningGateway(service, root, ports)

    return ensureDeferred(go())


def http_client(test: TestCase, reactor: Any = None) -> Any:
    """A treq client whose connection pool is closed in the test's cleanup."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))
