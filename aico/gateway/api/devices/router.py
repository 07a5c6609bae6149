"""``GET /api/v1/devices/me``: what the calling device may do.

Asked over the ``tls`` listener (HTTPS or WSS with the device's client certificate), it
answers the device's registry entry and its *effective* capabilities — role ``device``
plus the device's own, narrowed by a bearer token when one was sent. On a connection
without a device certificate (the ``http`` listener) it answers 404 ``no_device``.
"""

from __future__ import annotations

from aico.gateway.api.devices.dependencies import DevicesDeps
from aico.gateway.api.devices.exceptions import NoDevice
from aico.gateway.api.devices.schemas import DEVICE_ME
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.chain import DEVICE_TRANSPORTS

#: The capability of ``GET /api/v1/devices/me`` (roles ``device`` and ``user``).
DEVICES_SELF = "devices:self"


def routes(deps: DevicesDeps) -> list[RouteEntry]:
    def me(request: Request) -> Response:
        principal = request.principal
        device = (deps.device(request.device_id)
                  if request.device_id and request.transport in DEVICE_TRANSPORTS else None)
        if device is None or principal is None:
            raise NoDevice()
        return json_response({
            "device_id": device.device_id, "name": device.name, "trust": device.trust,
            "subject": principal.subject, "roles": list(principal.roles),
            "capabilities": sorted(principal.caps), "paired_for": device.paired_for,
            "paired_at": device.paired_at,
        })

    return [
        RouteEntry(
            method="GET",
            path="/api/v1/devices/me",
            handler=me,
            capability=DEVICES_SELF,
            response_schema=DEVICE_ME,
            summary="The calling device: its ID, name, trust, effective capabilities and the "
                    "user it was paired for (tls listener only; 404 no_device elsewhere)",
        )
    ]
