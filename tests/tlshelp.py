"""Real mutual-TLS clients for the tls listener tests: certificates made in the test,
Python's ``ssl`` module (blocking, so every call runs in a thread via ``deferToThread``)
and the independent ``websockets`` library for WSS."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from aico.gateway.devices.ca import DeviceCA, create_csr, device_id, generate_key
from aico.gateway.devices.registry import Device
from aico.gateway.testing.harness import RunningGateway


@dataclass
class ClientCert:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    device_id: str


def issue(ca: DeviceCA, name: str, directory: Path) -> ClientCert:
    """A device key and a certificate issued by *ca* from the device's CSR."""
    key = generate_key()
    cert = ca.issue_client_cert(create_csr(key, name), name)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ClientCert(cert, cert_path, key_path, device_id(cert))


async def pair(gw: RunningGateway, name: str, directory: Path, *, trust: str = "standard",
               paired_for: str | None = None, capabilities: tuple[str, ...] = ()) -> ClientCert:
    """Issue a certificate from the gateway's CA and register the device (in process)."""
    ca = gw.parts.materials.device_ca
    assert ca is not None
    client = issue(ca, name, directory)
    device: Device = await gw.parts.devices.add(
        client.cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), name,
        paired_for=paired_for, trust=trust, capabilities=capabilities)
    gw.parts.device_gate.remember(device)
    return client


def ca_file(gw: RunningGateway, directory: Path) -> Path:
    ca = gw.parts.materials.device_ca
    assert ca is not None
    path = directory / "ca.crt"
    path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return path


def context(ca_path: Path, client: ClientCert | None = None, *,
            max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _handshake_then_read(host: str, port: int, ctx: ssl.SSLContext, request: bytes) -> dict[str, Any]:
    """Connect and finish the handshake (recorded), then send *request* and read: what
    happened at each step."""
    out: dict[str, Any] = {"handshake": None, "read": None, "data": b""}
    raw = socket.create_connection((host, port), timeout=10)
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError) as e:
            out["handshake"] = e
            return out
        out["version"] = tls.version()
        try:
            tls.sendall(request)
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                out["data"] += chunk
        except (ssl.SSLError, OSError) as e:
            out["read"] = e
        tls.close()
    finally:
        raw.close()
    return out


def probe(host: str, port: int, ctx: ssl.SSLContext, path: str = "/api/v1/devices/me") -> Any:
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n").encode()
    return deferToThread(_handshake_then_read, host, port, ctx, request)


def _get(host: str, port: int, ctx: ssl.SSLContext, path: str,
         headers: dict[str, str] | None) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def https_get(host: str, port: int, ctx: ssl.SSLContext, path: str,
              headers: dict[str, str] | None = None) -> Any:
    return deferToThread(_get, host, port, ctx, path, headers)


class KeepAlive:
    """One HTTPS keep-alive connection: a request, then a blocking read that notes when
    the gateway closed the connection."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        self.closed_at: float | None = None

    def get(self, path: str) -> tuple[int, Any]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def wait_closed(self) -> None:
        sock = self.conn.sock
        assert sock is not None
        try:
            while sock.recv(1024):
                pass
        except (ssl.SSLError, OSError):
            pass
        self.closed_at = time.monotonic()
        self.conn.close()


async def wss_opened(host: str, port: int, ctx: ssl.SSLContext, log: list[Any],
                     timeout: float = 30) -> Deferred[None]:
    """Start :func:`wss_session` in a thread and wait until its request was answered
    ("open" in *log*); the thread's Deferred, which fires when the gateway closes it.

    If the session ends first, its own error is raised here (a refused handshake, a
    client-side time-out) rather than a bare "condition not met"; if nothing happens
    in *timeout* seconds, the AssertionError says how far the session got."""
    from aico.gateway.testing.waiting import eventually

    d = deferToThread(wss_session, host, port, ctx, log)
    try:
        await eventually(lambda: "open" in log or d.called, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"WSS session not answered within {timeout} s; so far: {log!r}") from None
    if "open" not in log:
        await d  # raises the session's own error
        raise AssertionError(f"WSS session ended before its answer: {log!r}")
    return d


def wss_session(host: str, port: int, ctx: ssl.SSLContext, log: list[Any]) -> None:
    """A WSS session with the ``websockets`` library: the welcome, one request, then
    read until the gateway closes the socket (its close code goes into *log*).

    Its asyncio client, on an event loop of this thread's own, so one thread owns the TLS
    socket. The library's threaded client (``websockets.sync``) reads in a thread of its
    own while the caller writes, and an ``ssl.SSLSocket`` is not safe for that: about once
    in a few hundred runs under load, its upgrade request never reached the gateway (the
    read thread was taking TLS 1.3's session tickets while the request was written), and
    the gateway closed the silent connection after ``limits.head_timeout``."""
    asyncio.run(_wss_session(host, port, ctx, log))


async def _wss_session(host: str, port: int, ctx: ssl.SSLContext, log: list[Any]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(f"wss://{host}:{port}/ws", ssl=ctx,
                       subprotocols=["aico.v1.json"],  # type: ignore[list-item]
                       open_timeout=20) as ws:
        log.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        await ws.send(json.dumps({"type": "request", "id": 1, "method": "GET",
                                  "path": "/api/v1/devices/me"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            log.append(frame)
            if frame.get("type") == "response":
                break
        log.append("open")
        try:
            while True:
                log.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        except ConnectionClosed as e:
            log.append(("closed", time.monotonic(), e.rcvd.code if e.rcvd else None))
