"""What the devices domain needs: the device cache of the ``tls`` listener."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aico.gateway.devices.registry import Device


@dataclass(frozen=True)
class DevicesDeps:
    #: The paired, unrevoked device with this ID (the in-memory cache), or ``None``.
    device: Callable[[str], Device | None]
