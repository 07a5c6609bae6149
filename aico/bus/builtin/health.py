"""The built-in ``health`` module: answers ``{status, uptime_s, pid}`` on ``system/health/v1``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aico.bus.module import BackendModule, Response, uptime_payload

HEALTH_TOPIC = "system/health/v1"


class HealthModule(BackendModule):
    """No routes; only the health topic."""

    name = "health"
    version = "0.1.0"
    heartbeat_interval = 5.0
    health_topic = HEALTH_TOPIC

    async def health(self) -> Mapping[str, Any] | Response:
        return uptime_payload(self.started_at, self.clock)
