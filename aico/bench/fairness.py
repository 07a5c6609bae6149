"""Fair share, measured: one client floods the gateway, another one's REST latency is timed.

``python -m aico.bench.fairness [--requests N] [--gateway-path DIR]`` starts a gateway
(``twistd aico-gateway`` in a temporary state directory), then for each flood — N request
frames pipelined on one WebSocket, N requests sent at once by one IPC peer — probes
``POST /api/v1/conversations/messages`` over REST from this process every 20 ms while the
flood runs, and prints the probe's latencies (p50, max) next to the same probe on an idle
gateway. With ``--gateway-path`` the gateway runs from another source tree (e.g. an
older checkout), the load and the probe from this one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aico.bench.__main__ import BENCH_CONFIG, _token, _wait

PROBE_INTERVAL = 0.02


#: Probes that got no 200 answer, by flood (an old gateway answered 504 under a flood).
FAILED: list[float] = []


def _probe(base: str, token: str) -> float:
    request = urllib.request.Request(  # noqa: S310
        base + "/api/v1/conversations/messages", data=b'{"message": "probe"}',
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310
            r.read()
    except urllib.error.HTTPError as e:  # still an answer, but not the one wanted
        e.read()
        FAILED.append(time.perf_counter() - start)
    return time.perf_counter() - start


def _probe_while(base: str, token: str, running: threading.Event) -> list[float]:
    out: list[float] = []
    while running.is_set():
        out.append(_probe(base, token))
        time.sleep(PROBE_INTERVAL)
    return out


def _collect(into: list[list[float]], base: str, token: str, running: threading.Event) -> None:
    into.append(_probe_while(base, token, running))


def flood_ws(url: str, token: str, count: int) -> float:
    """Pipeline *count* request frames on one WebSocket; seconds until every answer came."""
    from websockets.sync.client import connect

    frame = json.dumps({"type": "request", "id": 1, "method": "POST",
                        "path": "/api/v1/conversations/messages",
                        "body": {"message": "flood"}})
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None,
                 open_timeout=10) as ws:
        ws.recv()
        ws.recv()
        start = time.perf_counter()
        for _ in range(count):
            ws.send(frame)
        got = 0
        while got < count:
            message = ws.recv(timeout=120)
            data = message.encode() if isinstance(message, str) else message
            if b'"type":"response"' in data or b'"type":"error"' in data:
                got += 1  # answered (an older gateway refused past its limit with an error)
        return time.perf_counter() - start


def flood_ipc(endpoint: str, server_key: str, token: str, count: int) -> tuple[float, int]:
    """Send *count* requests at once from one DEALER; (seconds until every reply came, 429s)."""
    import zmq

    from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.curve_serverkey = server_key.encode()
    sock.connect(endpoint)
    request = ApiRequest(method="POST", path="/api/v1/conversations/messages",
                         body=b'{"message": "flood"}',
                         headers={"authorization": f"Bearer {token}"})
    start = time.perf_counter()
    for _ in range(count):
        sock.send(wrap(request, "flood", {"correlation_id": uuid.uuid4().hex}).SerializeToString())
    refused = 0
    for _ in range(count):
        if not sock.poll(120_000):
            break
        if unpack(AicoMessage.FromString(sock.recv()), ApiResponse).status == 429:
            refused += 1
    took = time.perf_counter() - start
    sock.close()
    return took, refused


def _summary(name: str, latencies: list[float], extra: str = "") -> str:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000 if ordered else 0.0
    worst = ordered[-1] * 1000 if ordered else 0.0
    return f"{name:44} probes {len(ordered):4d}  p50 {p50:8.1f} ms  max {worst:8.1f} ms  {extra}"


def run(tmp: Path, requests: int, gateway_path: str | None) -> list[str]:
    config = tmp / "bench.toml"
    config.write_text(BENCH_CONFIG)
    state = tmp / "state"
    env = dict(os.environ)
    if gateway_path:
        env["PYTHONPATH"] = gateway_path
    proc = subprocess.Popen(  # noqa: S603
        [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
         "--logfile=" + str(tmp / "gateway.log"), "aico-gateway", "--config", str(config),
         "--state-dir", str(state)], env=env)
    try:
        _wait(state / "ports.json", proc, "the gateway")
        ports: dict[str, Any] = json.loads((state / "ports.json").read_text())
        base = f"http://127.0.0.1:{ports['http']['port']}"
        token = _token(base, state)
        import zmq.auth

        key = zmq.auth.load_certificate(state / "curve" / "gateway.key")[0].decode()
        for _ in range(20):  # warm up
            _probe(base, token)
        idle = [_probe(base, token) for _ in range(50)]
        lines = [_summary("idle gateway", idle)]
        def ws() -> tuple[float, int]:
            return flood_ws(base.replace("http", "ws") + "/ws", token, requests), 0

        def ipc() -> tuple[float, int]:
            return flood_ipc(ports["ipc"]["fallback"], key, token, requests)

        for name, flood in ((f"{requests} frames pipelined on one WebSocket", ws),
                            (f"{requests} requests at once from one IPC peer", ipc)):
            FAILED.clear()
            running = threading.Event()
            running.set()
            result: list[list[float]] = []
            prober = threading.Thread(target=_collect, args=(result, base, token, running))
            prober.start()
            took, refused = flood()
            running.clear()
            prober.join()
            extra = f"(flood answered in {took:.1f} s" + (f", {refused} refused with 429"
                                                           if refused else "")
            extra += f"; {len(FAILED)} probes failed)" if FAILED else ")"
            lines.append(_summary(name, result[0], extra))
        return lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aico.bench.fairness")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--gateway-path", help="run the gateway from this source tree")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lines = run(Path(tmp), args.requests, args.gateway_path)
    print("\nREST probe latency while one client floods the gateway:")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
