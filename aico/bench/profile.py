"""Where the gateway's time goes: a py-spy profile of one path under load (issue 12).

``python -m aico.bench.profile PATH [--seconds 15] [--rate 250] [--label before]`` with PATH
one of ``rest``, ``websocket``, ``ipc`` starts a gateway as ``make bench`` does
(:class:`aico.bench.__main__.Processes`), warms it up, then puts ``make bench``'s load on
that one path (64 connections, one request in flight each: ``wrk`` for REST,
:mod:`aico.bench.loadgen` for WebSocket and IPC) for SECONDS while ``py-spy record``
samples the gateway process (all threads, ``--subprocesses``). It writes, under
``docs/perf/``:

* ``LABEL-PATH.svg`` — the flame graph;
* ``LABEL-PATH.txt.gz`` — the collapsed stacks (``py-spy --format raw``) the table is computed from;
* ``LABEL-PATH.json`` — requests served, the gateway's CPU seconds over the load, CPU µs
  per request, and the breakdown below.

It prints the breakdown: each sample is given to the innermost frame that matches a step
of :data:`STEPS` (frames that match none — Deferred plumbing, zope, builtins — count for
the step that called them), and a step's µs per request is its share of the samples times
the CPU µs per request. py-spy leaves out idle samples (the reactor waiting in
``epoll``), so the samples are the CPU the gateway spent.

``python -m aico.bench.profile --breakdown docs/perf/LABEL-PATH.txt.gz`` recomputes the table
from stored stacks (the CPU µs per request from the ``.json`` beside them), e.g. after
changing :data:`STEPS` or for the "after" profiles.

py-spy attaches to the running gateway by PID (as root here; elsewhere it needs ptrace
rights). Both samplers (one writes the SVG, one the raw stacks, over the same window) run
``--nonblocking``: a blocking py-spy stops the gateway at every sample, which at 250 Hz
cut its throughput to a fraction and inflated its CPU per request. The reactor thread's
samples are split by step; the other threads are costed by their CPU time from ``/proc``
(py-spy cannot see libzmq's native threads, and its idle detection does not hold for
the Python ones here).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aico.bench.__main__ import CONNECTIONS, Processes, _token, loadgen, post_script, wrk

PATHS = ("rest", "websocket", "ipc")
OUT = Path(__file__).resolve().parents[2] / "docs" / "perf"
WARMUP = 3
CLEAN = 10

#: The chain's steps and the frames that belong to them, innermost match wins. A frame
#: is ``function (file:line)`` as py-spy writes it; each pattern is a regular expression
#: searched in it. Order matters only among patterns matching the same frame (first wins).
#: pyzmq's own frames (``zmq/sugar``) match nothing: a send or receive counts for whoever
#: called it (the bus client, or the IPC adapter's ROUTER).
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("authenticate (JWT verify/cache)", (
        r"^(SecurityChain\.)?(authenticate|principal_for_token|device_principal|bearer_token) "
        r"\(aico/gateway/security/chain", r"aico/gateway/security/tokens\.py",
        r"aico/gateway/security/capabilities\.py", r"aico/gateway/security/keys\.py",
    )),
    ("authorize", (r"^(SecurityChain\.)?(authorize|authorize_topic) \(aico/gateway/security/chain",)),
    ("validate (JSON parse + schema)", (r"aico/gateway/security/validate\.py", r"/jsonschema/",
                                        r"/referencing/", r"/rpds", r"^(loads|decode|raw_decode) \(json/")),
    ("rate limit", (r"^(SecurityChain\.)?(rate_limit|_charge|limit_key) \(aico/gateway/security/chain",
                    r"aico/gateway/security/ratelimit\.py")),
    ("access log + log observers", (
        r"aico/gateway/access\.py", r"aico/gateway/logs\.py", r"/twisted/logger/",
        r"/twisted/python/log\.py", r"/twisted/python/logfile\.py", r"aico/gateway/metrics\.py",
        r"/prometheus_client/", r"^log \(aico/gateway/adapters/rest",
    )),
    ("protobuf envelope build/parse", (
        r"^(wrap|unpack|type_name) \(aico/proto/", r"/protobuf/",
        r"^(BusForwarder\.)?(to_api_request|from_api_response|unpack_reply|_message|_json_or_text) "
        r"\(aico/gateway/routing/backend",
    )),
    ("bus client write/read (zmqreactor)", (
        r"aico/zmqreactor\.py", r"aico/bus/client\.py", r"aico/bus/core\.py",
        r"aico/bus/broker\.py", r"aico/bus/curve\.py", r"aico/bus/zap\.py", r"/txzmq/",
        r"aico/gateway/routing/backend\.py",
    )),
    ("module process (out of process)", (r"^process \d+:.*aico-module", r"^process \d+:.*aico\.bus\.runner")),
    ("module side (in process)", (r"aico/bus/module\.py", r"aico/bus/builtin/", r"aico/bus/service\.py",
                                  r"aico/gateway/api/conversations/")),
    ("dispatcher", (r"aico/gateway/routing/dispatch\.py", r"aico/gateway/routing/table\.py",
                    r"aico/gateway/routing/messages\.py", r"aico/gateway/errors\.py",
                    r"aico/gateway/connections\.py")),
    ("Klein routing/wrapping", (r"/klein/", r"/werkzeug/")),
    ("WebSocket framing (Autobahn, adapter)", (r"/autobahn/", r"aico/gateway/adapters/websocket\.py")),
    ("session layer (adapters/session.py)", (r"aico/gateway/adapters/session\.py",)),
    ("IPC adapter (ROUTER, Curve)", (r"aico/gateway/adapters/ipc\.py",)),
    ("REST adapter (normalize, response)", (r"aico/gateway/adapters/rest\.py",)),
    ("response writing (twisted.web write/finish)", (
        r"^(write|finish|_cleanup|setResponseCode|setHeader|writeHeaders|_writeHeaders|"
        r"writeSequence|_sendHeaders?) \(twisted/web/(http|server)\.py",
    )),
    ("HTTP parsing (twisted.web)", (r"/twisted/web/",)),
    ("reactor/transport I/O", (r"/twisted/internet/(epollreactor|posixbase|tcp|abstract|base|"
                               r"selectreactor|pollreactor|_newtls|_sslverify|_resolver)\.py",
                               r"/twisted/protocols/tls\.py", r"/OpenSSL/",
                               r"^untilConcludes \(/?twisted/python/util\.py")),
]

OTHER = "other (Deferreds, zope, GC, startup ...)"
_COMPILED = [(name, [re.compile(p) for p in pats]) for name, pats in STEPS]


def classify(frame: str) -> str | None:
    """The step a frame belongs to, or ``None`` (it counts for its caller's step)."""
    # py-spy shortens file names to the module's path (``twisted/web/http.py``); the
    # patterns use a leading ``/`` for third-party packages, so match on "/" + frame path.
    name, _, where = frame.partition(" (")
    text = f"{name} (/{where}" if where else name
    for step, patterns in _COMPILED:
        if any(p.search(frame) or p.search(text) for p in patterns):
            return step
    return None


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (``a;b;c COUNT``, root first) as a counter."""
    stacks: Counter[tuple[str, ...]] = Counter()
    text = (gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz"
            else path.read_text())
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _other_thread(stack: tuple[str, ...]) -> bool:
    """A sample of a thread other than the reactor's (embedded broker, thread pool)."""
    return any(frame.startswith("Thread._bootstrap ") for frame in stack[:3])


def breakdown(stacks: Counter[tuple[str, ...]]) -> tuple[Counter[str], int]:
    """Samples of the reactor thread per step (innermost matching frame wins), and their total.

    Other Python threads are left out: py-spy's idle detection does not hold for them
    here (a thread-pool worker blocked in ``Condition.wait`` is sampled as active), so
    their cost is taken from their CPU time instead (:func:`_cpu_split`).
    """
    steps: Counter[str] = Counter()
    cache: dict[str, str | None] = {}
    for stack, count in stacks.items():
        if _other_thread(stack):
            continue
        owner = OTHER
        for frame in stack:
            if frame not in cache:
                cache[frame] = classify(frame)
            if cache[frame] is not None:
                owner = cache[frame]  # type: ignore[assignment]
        steps[owner] += count
    return steps, sum(stacks.values())


THREADS = "embedded broker + thread pool (other Python threads, CPU time)"
ZMQ_IO = "libzmq I/O threads (Curve, TCP; native, CPU time)"


def table(steps: Counter[str], total: int, split: dict[str, float]) -> list[dict[str, Any]]:
    """µs per request per step: the step's share of the reactor thread's samples times the
    reactor thread's CPU µs per request, then the other threads from their own CPU time."""
    order = [name for name, _ in STEPS] + [OTHER]
    main_us = split["reactor"]
    rows = [{"step": name, "samples": steps[name], "share": steps[name] / total if total else 0.0,
             "us_per_request": steps[name] / total * main_us if total else 0.0}
            for name in order if steps[name]]
    for name, key in ((THREADS, "python_threads"), (ZMQ_IO, "zmq_io"), ("module processes", "children")):
        if split.get(key):
            rows.append({"step": name, "samples": 0, "share": 0.0, "us_per_request": split[key]})
    return rows


def print_table(rows: list[dict[str, Any]], split: dict[str, float], total: int) -> None:
    print(f"{'step':66} {'samples':>8} {'share':>6} {'µs/req':>7}")
    for row in rows:
        share = f"{row['share']:6.1%}" if row["samples"] else f"{'':6}"
        samples = f"{row['samples']:8d}" if row["samples"] else f"{'':8}"
        print(f"{row['step']:66} {samples} {share} {row['us_per_request']:7.1f}")
    print(f"{'reactor thread':66} {total:8d} {1:6.0%} {split['reactor']:7.1f}")
    print(f"{'whole process (CPU µs per request)':66} {'':8} {'':6} {split['total']:7.1f}")


# ---------------------------------------------------------------------------- measuring

def _cpu(stat: Path) -> float:
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds of the gateway: its reactor (main) thread, its other Python threads,
    libzmq's native threads (named ``ZMQbg/…``), and its live descendants (modules run
    out of process), from ``/proc``."""
    split = {"reactor": 0.0, "python_threads": 0.0, "zmq_io": 0.0, "children": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu, comm = _cpu(task / "stat"), (task / "comm").read_text().strip()
        except OSError:
            continue
        key = ("reactor" if task.name == str(pid) else
               "zmq_io" if comm.startswith("ZMQbg") else "python_threads")
        split[key] += cpu
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            split["children"] += _cpu(Path(f"/proc/{child}/stat"))
        except OSError:
            pass
        todo.extend(parents.get(child, []))
    return split


def _load(path: str, target: dict[str, str], seconds: int) -> dict[str, float]:
    n = str(CONNECTIONS)
    if path == "rest":
        return wrk(target["url"], Path(target["script"]), seconds)
    if path == "websocket":
        return loadgen("ws", target["url"], target["token"], n, str(seconds))
    return loadgen("ipc", target["url"], target["key"], target["token"], n, str(seconds))


def profile(path: str, seconds: int, rate: int, label: str, out: Path) -> dict[str, Any]:
    import zmq.auth

    venv_spy = Path(sys.executable).parent / "py-spy"
    spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy") or "py-spy"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{label}-{path}"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        try:
            gateway, ports, state = procs.gateway()
            base = f"http://127.0.0.1:{ports['http']['port']}"
            token = _token(base, state)
            target = {"token": token}
            if path == "rest":
                target["url"] = base + "/api/v1/conversations/messages"
                target["script"] = str(post_script(tmp, token))
            elif path == "websocket":
                target["url"] = base.replace("http", "ws") + "/ws"
            else:
                target["url"] = ports["ipc"]["fallback"]
                target["key"] = zmq.auth.load_certificate(state / "curve" / "gateway.key")[0].decode()
            _load(path, target, WARMUP)
            # The CPU per request without a sampler attached (py-spy takes CPU of its own
            # on this 2-core machine), then the profiled window.
            clean0 = _cpu_split(gateway.pid)
            clean = _load(path, target, CLEAN)
            clean1 = _cpu_split(gateway.pid)
            common = [spy, "record", "--pid", str(gateway.pid), "--rate", str(rate),
                      "--duration", str(seconds), "--subprocesses", "--nonblocking"]
            raw = subprocess.Popen([*common, "--format", "raw", "-o", f"{stem}.txt"])  # noqa: S603
            svg = subprocess.Popen([*common, "--format", "flamegraph", "-o", f"{stem}.svg"])  # noqa: S603
            time.sleep(0.5)  # both attached
            cpu0, t0 = _cpu_split(gateway.pid), time.perf_counter()
            result = _load(path, target, seconds)
            cpu1, t1 = _cpu_split(gateway.pid), time.perf_counter()
            raw.wait(seconds + 60)
            svg.wait(seconds + 60)
        finally:
            procs.stop()
    def per_request(before: dict[str, float], after: dict[str, float], served: float) -> dict[str, float]:
        split = {key: round((after[key] - before[key]) / served * 1e6, 1) for key in before}
        split["total"] = round(sum(split.values()), 1)
        return split

    requests = result["requests"]
    profiled = per_request(cpu0, cpu1, requests)
    split = per_request(clean0, clean1, clean["requests"])
    cpu = sum(clean1.values()) - sum(clean0.values())
    # The raw stacks are kept gzipped next to the graph (a tenth of the size).
    raw_path = Path(f"{stem}.txt")
    Path(f"{stem}.txt.gz").write_bytes(gzip.compress(raw_path.read_bytes(), mtime=0))
    raw_path.unlink()
    steps, total = breakdown(read_stacks(Path(f"{stem}.txt.gz")))
    summary = {"path": path, "label": label, "rate": rate,
               "clean": {"seconds": CLEAN, "rps": round(clean["rps"], 1), "requests": int(clean["requests"]),
                         "p50_ms": round(clean["p50"], 2), "p99_ms": round(clean["p99"], 2),
                         "errors": int(clean["errors"]), "cpu_seconds": round(cpu, 3)},
               "profiled": {"seconds": round(t1 - t0, 2), "rps": round(result["rps"], 1),
                            "requests": int(requests), "errors": int(result["errors"]),
                            "cpu_us_split": profiled},
               "cpu_us_per_request": split["total"], "cpu_us_split": split, "samples": total,
               "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                         for row in table(steps, total, split)]}
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aico.bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", choices=PATHS)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--label", default="before")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--breakdown", type=Path, metavar="STACKS.txt[.gz]",
                        help="recompute the table from stored stacks (and its .json) and exit")
    args = parser.parse_args(argv)
    if args.breakdown is not None:
        meta_path = args.breakdown.with_name(args.breakdown.name.split(".")[0] + ".json")
        meta = json.loads(meta_path.read_text())
        split = meta["cpu_us_split"]
        steps, total = breakdown(read_stacks(args.breakdown))
        rows = table(steps, total, split)
        print_table(rows, split, total)
        meta["samples"], meta["steps"] = total, [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        return
    if args.path is None:
        parser.error("name a path (rest, websocket, ipc) or --breakdown STACKS.txt.gz")
    s = profile(args.path, args.seconds, args.rate, args.label, args.out)
    c, p = s["clean"], s["profiled"]
    print(f"\n{s['path']}: without py-spy {c['rps']:.0f} req/s ({c['requests']} in {c['seconds']} s, "
          f"p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, {c['errors']} errors), gateway CPU "
          f"{c['cpu_seconds']} s = {s['cpu_us_per_request']} µs per request {s['cpu_us_split']}; "
          f"under py-spy {p['rps']:.0f} req/s, {p['cpu_us_split']['total']} µs per request, "
          f"{s['samples']} reactor-thread samples\n")
    print_table(s["steps"], s["cpu_us_split"], s["samples"])


if __name__ == "__main__":
    main()
