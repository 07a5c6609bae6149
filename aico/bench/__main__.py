"""``make bench``: the gateway's hot paths as ratios to floors measured in the same run.

Paths (docs/performance.md), each against a floor that serves the same bytes with nothing else:

* **REST full chain** — ``POST /api/v1/conversations/messages`` with a bearer token (JWT
  check, RBAC, JSON Schema validation, rate limit, bus round trip to the conversation
  module) vs a bare ``twisted.web`` resource; load from ``wrk``.
* **WebSocket request/response** — the same request as a ``request`` frame on ``/ws`` vs a
  bare Autobahn WebSocket on ``twisted.web``; load from ``aico.bench.loadgen`` (asyncio,
  ``websockets``).
* **IPC request/response** — the same request as an ``ApiRequest`` over the ZeroMQ TCP
  fallback with Curve vs a raw pyzmq ROUTER with Curve (the DEALER↔ROUTER round trip).
* **Idle WebSocket memory** — the gateway's resident memory per open, authenticated,
  idle socket, over 10,000 sockets.
* **Bus round trip** — ``aico.bench.bus_roundtrip``.

Every load runs in its own process with 64 connections, one request in flight each;
latencies are p50/p99 in milliseconds. Needs ``wrk`` (the Makefile installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aico.gateway.testing.harness import FREE_LISTENERS

CONNECTIONS = 64
SECONDS = 5
IDLE_SOCKETS = 10_000
BENCH_CONFIG = FREE_LISTENERS + """
[websocket]
auth_timeout = 600
idle_timeout = 600
[ratelimit.tiers.standard]
requests = 100000000
per_seconds = 1
burst = 100000000
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
Result = dict[str, float]


def _wait(path: Path, proc: subprocess.Popen[Any], what: str) -> None:
    for _ in range(600):
        if path.exists() and path.stat().st_size:
            return
        if proc.poll() is not None:
            raise SystemExit(f"{what} ended early")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def wrk(url: str, script: Path, seconds: int = SECONDS) -> Result:
    cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout  # noqa: S603
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
              "requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def loadgen(*args: str) -> Result:
    out = subprocess.run([sys.executable, "-m", "aico.bench.loadgen", *args],  # noqa: S603
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def idle_memory(pid: int, url: str, token: str) -> tuple[float, int]:
    """Bytes of gateway memory per idle authenticated WebSocket, and how many opened."""
    before = _rss(pid)
    holder = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "aico.bench.loadgen", "idle", url, token, str(IDLE_SOCKETS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        ready = json.loads(holder.stdout.readline())
        time.sleep(2)
        after = _rss(pid)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(60)
    opened = int(ready["ready"])
    return ((after - before) / opened if opened else 0.0), opened


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[Any]] = []

    def floor(self, kind: str, *extra: str) -> str:
        port_file = self.tmp / f"{kind}.port"
        proc = subprocess.Popen([sys.executable, "-m", "aico.bench.bare", kind,  # noqa: S603
                                 str(port_file), *extra])
        self.procs.append(proc)
        _wait(port_file, proc, f"the {kind} floor")
        return port_file.read_text()

    def gateway(self) -> tuple[subprocess.Popen[Any], dict[str, Any], Path]:
        config = self.tmp / "bench.toml"
        config.write_text(BENCH_CONFIG)
        state = self.tmp / "state"
        proc = subprocess.Popen(  # noqa: S603
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
             "--logfile=" + str(self.tmp / "gateway.log"),
             "aico-gateway", "--config", str(config), "--state-dir", str(state)])
        self.procs.append(proc)
        _wait(state / "ports.json", proc, "the gateway")
        return proc, json.loads((state / "ports.json").read_text()), state

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _token(base: str, state: Path) -> str:
    password = (state / "initial-admin-password").read_text().strip()
    login = urllib.request.Request(  # noqa: S310
        base + "/api/v1/users/authenticate",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(login) as r:  # noqa: S310
        return str(json.loads(r.read())["access_token"])


def post_script(tmp: Path, token: str) -> Path:
    """The ``wrk`` script: ``POST /api/v1/conversations/messages`` with a bearer token."""
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.body = \'{"message": "hello there"}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    return script


def run(tmp: Path) -> tuple[list[tuple[str, Result, Result]], tuple[float, int]]:
    import zmq.auth

    procs = Processes(tmp)
    try:
        keys = tmp / "keys"
        keys.mkdir()
        zmq.auth.create_certificates(keys, "server")
        floor_key = zmq.auth.load_certificate(keys / "server.key")[0].decode()
        http_floor = procs.floor("http")
        ws_floor = procs.floor("ws")
        zmq_floor = procs.floor("zmq", str(keys))
        gateway, ports, state = procs.gateway()
        base = f"http://127.0.0.1:{ports['http']['port']}"
        token = _token(base, state)
        gateway_key = zmq.auth.load_certificate(state / "curve" / "gateway.key")[0].decode()
        script = post_script(tmp, token)
        n, s = str(CONNECTIONS), str(SECONDS)
        rows = [
            ("REST full chain (JWT+RBAC+schema+limit+bus)",
             wrk(base + "/api/v1/conversations/messages", script),
             wrk(f"http://127.0.0.1:{http_floor}/", script)),
            ("WebSocket request/response",
             loadgen("ws", base.replace("http", "ws") + "/ws", token, n, s),
             loadgen("ws", f"ws://127.0.0.1:{ws_floor}/ws", "", n, s)),
            ("IPC request/response (TCP fallback, Curve)",
             loadgen("ipc", ports["ipc"]["fallback"], gateway_key, token, n, s),
             loadgen("ipc", zmq_floor, floor_key, token, n, s)),
        ]
        memory = idle_memory(gateway.pid, base.replace("http", "ws") + "/ws", token)
        return rows, memory
    finally:
        procs.stop()


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("make bench needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        rows, (per_socket, opened) = run(Path(tmp))
    print(f"\n{CONNECTIONS} connections, {SECONDS} s each; ratio = gateway / floor (same bytes)\n")
    print(f"{'path':45} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}   floor req/s  p50   p99")
    for name, got, floor in rows:
        print(f"{name:45} {got['rps']:8.0f} {got['rps'] / floor['rps']:6.2f} {got['p50']:7.2f} "
              f"{got['p99']:7.2f}   {floor['rps']:9.0f} {floor['p50']:5.2f} {floor['p99']:5.2f}")
        if got["errors"]:
            print(f"  warning: {got['errors']:.0f} failed responses")
    print(f"\nidle WebSocket memory: {per_socket / 1024:.1f} KiB per authenticated socket "
          f"({opened} sockets open)")
    print("\nbus round trip (request → module reply through the broker, Curve):", flush=True)
    from aico.bench.bus_roundtrip import main as bus_main

    bus_main(["--rounds", "2"])


if __name__ == "__main__":
    main()
