# The twistd dropin: imports nothing but Twisted; the gateway loads only when used.
from twisted.application.service import ServiceMaker

aicoGateway = ServiceMaker(
    "aico-gateway",
    "aico.gateway.tap",
    "The AICO API gateway: REST, WebSocket, ZeroMQ IPC, mutual TLS and federated sync.",
    "aico-gateway",
)
