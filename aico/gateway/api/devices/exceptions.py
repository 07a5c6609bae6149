"""Errors of the devices domain."""

from __future__ import annotations

from aico.gateway.errors import ApiError, NotFound


class DeviceRefused(ApiError):
    """A client certificate from our CA whose device is not in the registry, or was
    revoked: the connection is answered 403 and closed (``docs/devices.md``)."""

    status, code, title = 403, "device_not_allowed", "Device not allowed"

    def __init__(self, detail: str = "this device is not paired with this gateway, or it "
                                     "was revoked") -> None:
        super().__init__(detail)


class NoDevice(NotFound):
    """``/api/v1/devices/me`` asked on a connection without a device certificate."""

    code = "no_device"

    def __init__(self) -> None:
        super().__init__("this connection carries no device certificate: ask over the "
                         "tls listener (HTTPS or WSS with the device's certificate)")
