"""``make bench``: the gateway's hot paths as ratios to floors measured in the same run.

* **REST full chain** — ``POST /api/v1/conversations/messages`` with a bearer token: JWT
  check (cached), RBAC, JSON Schema validation, rate limit, bus round trip to the
  conversation module and back — against a bare ``twisted.web`` resource serving the
  same bytes (``aico.bench.bare``). Load from ``wrk`` (64 connections, 2 threads) in
  another process; requests/s and p50/p99 latency.
* **Bus round trip** — ``aico.bench.bus_roundtrip``: request → module reply through the
  embedded broker with Curve, against blocking pyzmq through the same broker.

Needs ``wrk`` (Debian package ``wrk``; the Makefile installs it where missing).
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

CONNECTIONS = 64
DURATION = "5s"
BENCH_CONFIG = """
[http]
port = 0
[bus]
pub = "tcp://127.0.0.1:*"
sub = "tcp://127.0.0.1:*"
[ipc]
fallback = "tcp://127.0.0.1:*"
[ratelimit.tiers.standard]
requests = 100000000
per_seconds = 1
burst = 100000000
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wait(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):
        if path.exists() and path.stat().st_size:
            return
        if proc.poll() is not None:
            raise SystemExit(f"{what} ended early")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def wrk(url: str, script: Path | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout  # noqa: S603
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            result[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def _script(tmp: Path, token: str, body: str) -> Path:
    path = tmp / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    return path


def rest(tmp: Path) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    bin_dir = Path(sys.executable).parent
    body = json.dumps({"message": "hello there"})
    floor_port = tmp / "bare.port"
    bare = subprocess.Popen([sys.executable, "-m", "aico.bench.bare", str(floor_port)])  # noqa: S603
    config = tmp / "bench.toml"
    config.write_text(BENCH_CONFIG)
    state = tmp / "state"
    gateway = subprocess.Popen(  # noqa: S603
        [str(bin_dir / "twistd"), "-n", "--pidfile=", "--logfile=" + str(tmp / "gw.log"),
         "aico-gateway", "--config", str(config), "--state-dir", str(state)])
    try:
        _wait(floor_port, bare, "the bare twisted.web server")
        _wait(state / "ports.json", gateway, "the gateway")
        port = json.loads((state / "ports.json").read_text())["http"]["port"]
        base = f"http://127.0.0.1:{port}"
        password = (state / "initial-admin-password").read_text().strip()
        login = urllib.request.Request(  # noqa: S310
            base + "/api/v1/users/authenticate",
            data=json.dumps({"username": "admin", "password": password}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(login) as r:  # noqa: S310
            token = json.loads(r.read())["access_token"]
        script = _script(tmp, token, body)
        floor = wrk(f"http://127.0.0.1:{floor_port.read_text()}/", script)
        full = wrk(base + "/api/v1/conversations/messages", script)
        return [("REST full chain (JWT+RBAC+schema+limit+bus)", full, floor)]
    finally:
        for proc in (bare, gateway):
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("make bench needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = rest(Path(tmp))
    print(f"\n{'path':48} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8}   floor: bare twisted.web")
    for name, got, floor in rows:
        print(f"{name:48} {got['rps']:9.0f} {got['rps'] / floor['rps']:7.2f} "
              f"{got.get('p50', 0):8.2f} {got.get('p99', 0):8.2f}   "
              f"({floor['rps']:.0f} req/s, p50 {floor.get('p50', 0):.2f} ms, "
              f"p99 {floor.get('p99', 0):.2f} ms)")
        if got["errors"]:
            print(f"  warning: {got['errors']:.0f} non-2xx responses")
    print("\nbus round trip (request → module reply through the broker, Curve):", flush=True)
    from aico.bench.bus_roundtrip import main as bus_main

    bus_main(["--rounds", "2"])


if __name__ == "__main__":
    main()
