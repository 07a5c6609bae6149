"""Round trips through the real broker with Curve: request → module reply, requests/s.

``python -m aico.bench.bus_roundtrip [--requests N] [--concurrency C] [--rounds R]``

For each reactor integration of :class:`~aico.bus.client.BusClient` (``native``: a reader
on the SUB socket's edge-triggered ``ZMQ_FD``; ``txzmq``: txZMQ's connections) a caller
and a responder client run on one reactor in this process, both Curve clients of an
embedded broker on 127.0.0.1 (its proxy runs in its own thread). The responder answers
each ``ApiRequest`` with an ``ApiResponse`` through ``reply()``, as a module does. We
measure sequential round trips (one in flight) and pipelined ones (C in flight). A
blocking pyzmq PUB/SUB round trip through the same broker, without any reactor, is the
floor. Each figure is the best of R rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from aico.bus.broker import EmbeddedBroker
from aico.bus.client import BusClient, CurveClientKeys, Integration
from aico.bus.curve import CurveLayout, create_keypair, ensure_client
from aico.keystore import Keystore
from aico.proto import AicoMessage, ApiRequest, ApiResponse, wrap

TOPIC = "bench/echo/v1"


def _request() -> AicoMessage:
    return wrap(
        ApiRequest(request_id="r", method="POST", path="/api/v1/echo", body=b'{"text":"hi"}'),
        "bench",
    )


def raw_floor(layout: CurveLayout, broker: EmbeddedBroker, requests: int) -> float:
    """Sequential blocking round trips with plain pyzmq sockets (a responder thread)."""
    import threading

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()

    def sockets(name: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        keys = CurveClientKeys.from_layout(layout, name)
        pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
        for sock, endpoint in ((pub, broker.pub_endpoint), (sub, broker.sub_endpoint)):
            sock.linger = 0
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
            sock.curve_serverkey = keys.server
            sock.connect(endpoint)
        return pub, sub

    cpub, csub = sockets("bench-caller")
    rpub, rsub = sockets("bench-responder")
    csub.subscribe(b"raw/reply")
    rsub.subscribe(b"raw/req")
    stop = threading.Event()
    reply = wrap(ApiResponse(request_id="r", status=200, body=b'{"echo":"hi"}'), "r")
    reply_bytes = reply.SerializeToString()

    def serve() -> None:
        while not stop.is_set():
            if rsub.poll(50):
                rsub.recv_multipart()
                rpub.send_multipart([b"raw/reply", reply_bytes])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    body = _request().SerializeToString()
    while True:  # slow joiner: wait until a round trip works
        cpub.send_multipart([b"raw/req", body])
        if csub.poll(100):
            csub.recv_multipart()
            break
    time.sleep(0.1)
    while csub.poll(0):
        csub.recv_multipart()
    start = time.perf_counter()
    for _ in range(requests):
        cpub.send_multipart([b"raw/req", body])
        csub.recv_multipart()
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    for sock in (cpub, csub, rpub, rsub):
        sock.close()
    return requests / elapsed


async def measure(
    reactor: Any,
    layout: CurveLayout,
    broker: EmbeddedBroker,
    integration: Integration,
    requests: int,
    concurrency: int,
    rounds: int,
) -> tuple[float, float]:
    """(sequential, pipelined) requests/s for one integration, best of *rounds*."""
    caller = BusClient.from_layout(
        reactor,
        layout,
        "bench-caller",
        broker.pub_endpoint,
        broker.sub_endpoint,
        integration=integration,
    )
    responder = BusClient.from_layout(
        reactor,
        layout,
        "bench-responder",
        broker.pub_endpoint,
        broker.sub_endpoint,
        integration=integration,
    )
    response = wrap(ApiResponse(request_id="r", status=200, body=b'{"echo":"hi"}'), "bench")
    responder.subscribe(TOPIC, lambda topic, message: responder.reply(message, response))
    await caller.start()
    await responder.start()
    await responder.wait_subscribed([TOPIC])
    message = _request()
    try:
        for _ in range(200):  # warm-up
            await caller.request(TOPIC, message)
        best_seq = best_pipe = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(requests // 4):
                await caller.request(TOPIC, message)
            best_seq = max(best_seq, (requests // 4) / (time.perf_counter() - start))
            start = time.perf_counter()
            await _pipelined(caller, message, requests, concurrency)
            best_pipe = max(best_pipe, requests / (time.perf_counter() - start))
        return best_seq, best_pipe
    finally:
        await caller.stop()
        await responder.stop()


async def _pipelined(caller: BusClient, message: AicoMessage, total: int, window: int) -> None:
    from twisted.internet.defer import Deferred

    done: Deferred[None] = Deferred()
    state = {"sent": 0, "received": 0}

    def send_one() -> None:
        state["sent"] += 1
        caller.request(TOPIC, message).addCallbacks(received, done.errback)

    def received(_: AicoMessage) -> None:
        state["received"] += 1
        if state["received"] == total:
            done.callback(None)
        elif state["sent"] < total:
            send_one()

    for _ in range(min(window, total)):
        send_one()
    await done


async def run(reactor: Any, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keystore = Keystore.ephemeral()  # the keys live only as long as the run
        layout = CurveLayout(Path(tmp), keystore)
        create_keypair(layout.root, "broker", keystore)
        for name in ("bench-caller", "bench-responder"):
            ensure_client(layout, name)
        broker = EmbeddedBroker(layout, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        broker.start()
        try:
            results: dict[str, tuple[float, float]] = {}
            for integration in args.integrations:
                results[integration] = await measure(
                    reactor,
                    layout,
                    broker,
                    integration,
                    args.requests,
                    args.concurrency,
                    args.rounds,
                )
            floor = raw_floor(layout, broker, args.requests // 4)
        finally:
            broker.stop()
    print(f"bus round trip through the embedded broker with Curve ({sys.platform})")
    print(f"{'integration':<14}{'sequential req/s':>18}{f'{args.concurrency} in flight req/s':>22}")
    for integration, (seq, pipe) in results.items():
        print(f"{integration:<14}{seq:>18,.0f}{pipe:>22,.0f}")
    print(f"{'raw pyzmq':<14}{floor:>18,.0f}{'-':>22}   (blocking, no reactor: the floor)")
    if {"native", "txzmq"} <= set(results):
        n, t = results["native"], results["txzmq"]
        print(f"native/txzmq: sequential x{n[0] / t[0]:.2f}, in flight x{n[1] / t[1]:.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aico.bench.bus_roundtrip")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--integrations", nargs="+", default=["native", "txzmq"], choices=["native", "txzmq"])
    args = parser.parse_args(argv)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
