"""A backend module as a user would write it with the SDK (README, "Writing a backend module")."""

from __future__ import annotations

from aico.bus.module import BackendModule, RequestContext, Response, route
from aico.proto import ApiRequest


class Echo(BackendModule):
    name = "echo"
    version = "1.0.0"
    health_topic = "echo/health/v1"
    heartbeat_interval = 0.5

    @route("POST", "/api/v1/echo", topic="echo/say/v1", capability="echo:write",
           request_schema={"type": "object", "properties": {"text": {"type": "string"}},
                           "required": ["text"]})
    async def say(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"echo": ctx.json()["text"], "by": request.principal.subject})


class NotAModule:
    pass
