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

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aico.gateway.testing.harness import FREE_LISTENERS

CONNECTIONS = 64
SECONDS = 5
ROUNDS = 3
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

    def gateway(self, placement: str = "in-process") -> tuple[subprocess.Popen[Any], dict[str, Any], Path]:
        """A gateway with the built-in modules in its process, or (``own-process``) each in
        a process of its own (``modules.in_process = false`` + ``aico-module NAME``)."""
        own = placement == "own-process"
        name = "gateway-own" if own else "gateway"
        config = self.tmp / f"{name}.toml"
        config.write_text(BENCH_CONFIG + ("\n[modules]\nin_process = false\n" if own else ""))
        state = self.tmp / f"{name}-state"
        proc = subprocess.Popen(  # noqa: S603
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
             "--logfile=" + str(self.tmp / f"{name}.log"),
             "aico-gateway", "--config", str(config), "--state-dir", str(state)])
        self.procs.append(proc)
        _wait(state / "ports.json", proc, "the gateway")
        if own:
            for module in ("conversation", "health"):
                self.procs.append(subprocess.Popen(  # noqa: S603
                    [str(Path(sys.executable).parent / "aico-module"), module,
                     "--state-dir", str(state)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_module(state, "conversation")
        return proc, json.loads((state / "ports.json").read_text()), state

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_module(state: Path, module: str) -> None:
    """Until the gateway's route table serves *module*'s route (it registered)."""
    ports = json.loads((state / "ports.json").read_text())
    url = f"http://127.0.0.1:{ports['http']['port']}/openapi.json"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url) as r:
                if "/api/v1/conversations/messages" in r.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the {module} module did not register")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid* (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, load: Callable[[], Result]) -> Result:
    """Run *load* against the gateway *pid*; add its CPU µs per request."""
    before = cpu_seconds(pid)
    result = load()
    spent = cpu_seconds(pid) - before
    result["cpu_us"] = spent / result["requests"] * 1e6 if result.get("requests") else 0.0
    return result


def median(results: list[Result]) -> Result:
    """The round with the median throughput (its latencies and CPU go with it)."""
    ordered = sorted(results, key=lambda r: r["rps"])
    return dict(ordered[len(ordered) // 2], rounds=float(len(results)))


def _token(base: str, state: Path) -> str:
    password = (state / "initial-admin-password").read_text().strip()
    login = urllib.request.Request(  # noqa: S310
        base + "/api/v1/users/authenticate",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(login) as r:  # noqa: S310
        return str(json.loads(r.read())["access_token"])


def post_script(tmp: Path, token: str, name: str = "post") -> Path:
    """The ``wrk`` script: ``POST /api/v1/conversations/messages`` with a bearer token."""
    script = tmp / f"{name}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.body = \'{"message": "hello there"}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    return script


#: The targets of issue 12 (path key: minimum ratio; "rest-own" is the stretch target);
#: every p99 at most P99_FACTOR times the floor's.
TARGETS = {"rest": 0.5, "rest-own": 0.6, "ws": 0.3, "ipc": 0.4}
P99_FACTOR = 3.0

Row = dict[str, Any]


def run(tmp: Path, rounds: int = ROUNDS, seconds: int = SECONDS) -> tuple[list[Row], tuple[float, int]]:
    """Every path: *rounds* rounds, each the floor then the gateway, interleaved, so both
    see the same machine; the table keeps each side's median round."""
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
        own, own_ports, own_state = procs.gateway("own-process")
        n, s = str(CONNECTIONS), str(seconds)

        def rest(p: dict[str, Any], st: Path) -> Callable[[], Result]:
            base = f"http://127.0.0.1:{p['http']['port']}"
            script = post_script(tmp, _token(base, st), st.name)
            return lambda: wrk(base + "/api/v1/conversations/messages", script, seconds)

        token = _token(f"http://127.0.0.1:{ports['http']['port']}", state)
        ws_url = f"ws://127.0.0.1:{ports['http']['port']}/ws"
        gateway_key = zmq.auth.load_certificate(state / "curve" / "gateway.key")[0].decode()
        floor_script = post_script(tmp, token, "floor")
        paths: list[tuple[str, str, int, Callable[[], Result], Callable[[], Result]]] = [
            ("rest", "REST full chain, module in process", gateway.pid, rest(ports, state),
             lambda: wrk(f"http://127.0.0.1:{http_floor}/", floor_script, seconds)),
            ("rest-own", "REST full chain, module in own process", own.pid,
             rest(own_ports, own_state),
             lambda: wrk(f"http://127.0.0.1:{http_floor}/", floor_script, seconds)),
            ("ws", "WebSocket request/response", gateway.pid,
             lambda: loadgen("ws", ws_url, token, n, s),
             lambda: loadgen("ws", f"ws://127.0.0.1:{ws_floor}/ws", "", n, s)),
            ("ipc", "IPC request/response (TCP, Curve)", gateway.pid,
             lambda: loadgen("ipc", ports["ipc"]["fallback"], gateway_key, token, n, s),
             lambda: loadgen("ipc", zmq_floor, floor_key, token, n, s)),
        ]
        rows: list[Row] = []
        for key, name, pid, load, floor_load in paths:
            load()  # warm-up round, not counted
            got: list[Result] = []
            floors: list[Result] = []
            for _ in range(rounds):
                floors.append(floor_load())
                got.append(measured(pid, load))
            rows.append({"key": key, "path": name, "gateway": median(got), "floor": median(floors),
                         "rounds": {"gateway": got, "floor": floors}})
        memory = idle_memory(gateway.pid, ws_url, token)
        return rows, memory
    finally:
        procs.stop()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,  # noqa: S607
                             check=True, cwd=Path(__file__).resolve().parents[2])
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "aico"],  # noqa: S607
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(rows: list[Row], per_socket: float, opened: int,
           seconds: int = SECONDS) -> dict[str, Any]:
    """Print the table; return what ``bench/results.json`` holds."""
    print(f"\n{CONNECTIONS} connections, {seconds} s rounds, floor and gateway interleaved; "
          "ratio = gateway / floor (same bytes), median round of each")
    print("CPU µs/req: the gateway process's CPU time per request (all threads)\n")
    print(f"{'path':40} {'req/s':>7} {'ratio':>6} {'target':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'p99/fl':>6} {'CPU µs/req':>10}   {'floor req/s':>11} {'p50':>5} {'p99':>5}")
    results: dict[str, Any] = {"paths": {}}
    for row in rows:
        got, floor = row["gateway"], row["floor"]
        ratio = got["rps"] / floor["rps"]
        tail = got["p99"] / floor["p99"] if floor["p99"] else 0.0
        target = TARGETS.get(row["key"], 0.0)
        met = ratio >= target and tail <= P99_FACTOR
        print(f"{row['path']:40} {got['rps']:7.0f} {ratio:6.2f} {target:6.2f} {got['p50']:7.2f} "
              f"{got['p99']:7.2f} {tail:6.1f} {got['cpu_us']:10.0f}   {floor['rps']:11.0f} "
              f"{floor['p50']:5.2f} {floor['p99']:5.2f}  {'ok' if met else 'MISSED'}")
        if got["errors"]:
            print(f"  warning: {got['errors']:.0f} failed responses")
        results["paths"][row["key"]] = {
            "path": row["path"], "ratio": round(ratio, 3), "p99_over_floor": round(tail, 2),
            "target_ratio": target, "met": met, "gateway": got, "floor": floor,
            "rounds": row["rounds"]}
    print(f"\nidle WebSocket memory: {per_socket / 1024:.1f} KiB per authenticated socket "
          f"({opened} sockets open)")
    results["idle_websocket_kib"] = round(per_socket / 1024, 2)
    results["idle_websockets"] = opened
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seconds", type=int, default=SECONDS)
    parser.add_argument("--results", default="bench/results.json")
    parser.add_argument("--no-bus", action="store_true", help="skip the bus round trip")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("make bench needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        rows, (per_socket, opened) = run(Path(tmp), args.rounds, args.seconds)
    results = report(rows, per_socket, opened, args.seconds)
    results.update(commit=_commit(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   cpus=os.cpu_count(), python=sys.version.split()[0],
                   connections=CONNECTIONS, seconds=args.seconds, rounds=args.rounds)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten: {out} (commit {results['commit']})")
    if args.no_bus:
        return
    print("\nbus round trip (request → module reply through the broker, Curve):", flush=True)
    from aico.bench.bus_roundtrip import main as bus_main

    bus_main(["--rounds", "2"])


if __name__ == "__main__":
    main()
