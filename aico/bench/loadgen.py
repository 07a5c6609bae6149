"""Load from another process for ``make bench`` (asyncio; one process, many connections).

``python -m aico.bench.loadgen ws URL TOKEN CONNECTIONS SECONDS`` and
``python -m aico.bench.loadgen ipc ENDPOINT SERVERKEY TOKEN CONNECTIONS SECONDS`` keep one
request in flight per connection (closed loop) and print
``{"rps", "p50", "p99", "errors"}`` (milliseconds) as JSON.
``python -m aico.bench.loadgen idle URL TOKEN COUNT`` opens COUNT authenticated
WebSockets, prints ``ready``, and holds them until its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

REQUEST = {"type": "request", "id": 1, "method": "POST", "path": "/api/v1/conversations/messages",
           "body": {"message": "hello there"}}


def _summary(latencies: list[float], seconds: float, errors: int) -> dict[str, float]:
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(n * p))] * 1000 if n else 0.0

    return {"rps": n / seconds, "p50": pct(0.50), "p99": pct(0.99), "errors": float(errors),
            "requests": float(n)}


async def _ws(url: str, token: str, conns: int, seconds: float) -> dict[str, float]:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    errors = 0
    frame = json.dumps(REQUEST)

    async def one() -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            await ws.recv()  # welcome
            if token:
                await ws.recv()  # auth_success
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                await ws.send(frame)
                answer = await ws.recv()
                latencies.append(time.perf_counter() - start)
                if b'"status":200' not in (answer if isinstance(answer, bytes) else answer.encode()):
                    errors += 1

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    return _summary(latencies, time.perf_counter() - began, errors)


async def _ipc(endpoint: str, server_key: str, token: str, conns: int, seconds: float) -> dict[str, float]:
    import zmq
    import zmq.asyncio

    from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap

    ctx = zmq.asyncio.Context()
    latencies: list[float] = []
    errors = 0
    body = json.dumps(REQUEST["body"]).encode()

    async def one() -> None:
        nonlocal errors
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = server_key.encode()
        sock.connect(endpoint)
        request = ApiRequest(method="POST", path="/api/v1/conversations/messages", body=body,
                             headers={"authorization": f"Bearer {token}"})
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            await sock.send(wrap(request, "bench", {"correlation_id": uuid.uuid4().hex})
                            .SerializeToString())
            reply = unpack(AicoMessage.FromString(await sock.recv()), ApiResponse)
            latencies.append(time.perf_counter() - start)
            if reply.status != 200:
                errors += 1
        sock.close()

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    ctx.term()
    return _summary(latencies, time.perf_counter() - began, errors)


async def _idle(url: str, token: str, count: int) -> None:
    """Hold *count* authenticated WebSockets open; raw handshakes keep this process light."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    writers: list[Any] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                failures += 1
                writer.close()
                return
            writers.append(writer)
        except OSError:
            failures += 1

    for start in range(0, count, 200):
        await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    print(json.dumps({"ready": len(writers), "failures": failures}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


def main() -> None:
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "ws":
        result = asyncio.run(_ws(args[0], args[1], int(args[2]), float(args[3])))
    elif kind == "ipc":
        result = asyncio.run(_ipc(args[0], args[1], args[2], int(args[3]), float(args[4])))
    elif kind == "idle":
        asyncio.run(_idle(args[0], args[1], int(args[2])))
        return
    else:
        raise SystemExit(f"unknown load {kind!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
