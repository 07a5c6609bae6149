"""``aico.client``: the Python client library of the AICO gateway, on Twisted.

``connect()`` finds the best transport to a local gateway (ZeroMQ IPC, its TCP
fallback, then WebSocket) and returns a :class:`Client` whose ``request()`` and
``subscribe()`` behave the same on each. With ``cert_dir=`` (a paired certificate
directory) it connects in detached mode: WSS, then HTTPS, mutual TLS 1.3 with the
gateway's certificate pinned (:mod:`aico.client.tls`). It shares only ``aico.proto``
with the server.

```python
client = await connect(reactor, state_dir="./var", token=access_token)
response = await client.request("GET", "/api/v1/health")
await client.subscribe("conversation/", lambda topic, body: print(topic, body))
```
"""

from aico.client.connect import Client, Endpoints, connect
from aico.client.transports import ClientError, ClientResponse, TransportUnavailable

__all__ = ["Client", "ClientError", "ClientResponse", "Endpoints", "TransportUnavailable", "connect"]
