"""A backend module written with plain pyzmq and the generated protobuf classes only.

It proves the wire contract of SPEC §3/§8 without the SDK: frames ``[topic, AicoMessage]``,
registration on ``system/module/registered/v1``, heartbeats, replies on ``reply_to``
with the request's ``correlation_id``. It runs in its own thread with blocking pyzmq.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from google.protobuf.any_pb2 import Any as AnyPb

from aico.proto.aico.core.envelope_pb2 import AicoMessage
from aico.proto.aico.gateway.v1.gateway_pb2 import (
    ApiRequest,
    ApiResponse,
    ModuleHeartbeat,
    ModuleRegistration,
    Route,
)


def envelope(payload: Any, attributes: dict[str, str] | None = None) -> bytes:
    msg = AicoMessage()
    msg.metadata.message_id = uuid.uuid4().hex
    msg.metadata.source = "raw"
    msg.metadata.message_type = payload.DESCRIPTOR.full_name
    for k, v in (attributes or {}).items():
        msg.metadata.attributes[k] = v
    any_ = AnyPb()
    any_.Pack(payload)
    msg.any_payload.CopyFrom(any_)
    return msg.SerializeToString()


class RawModule(threading.Thread):
    """Serves ``GET|POST /api/v1/raw/...`` routes; behaviour switchable from the test."""

    def __init__(self, state_dir: Path, pub: str, sub: str, name: str = "raw",
                 routes: list[Route] | None = None, heartbeat_ms: int = 200,
                 key_name: str | None = None, health_topic: str = "") -> None:
        super().__init__(daemon=True)
        self.name_ = name
        curve = state_dir / "curve"
        key_name = key_name or name
        # An allowed key: public part into curve/modules/, secret kept here.
        keydir = state_dir / "raw-keys"
        keydir.mkdir(exist_ok=True)
        pub_file, sec_file = zmq.auth.create_certificates(keydir, key_name)
        self.allow_key = Path(pub_file)
        self.public, self.secret = zmq.auth.load_certificate(sec_file)
        self.server, _ = zmq.auth.load_certificate(curve / "broker.key")
        self.pub_ep, self.sub_ep = pub, sub
        self.routes = routes or []
        self.heartbeat_ms = heartbeat_ms
        self.health_topic = health_topic
        self.stop_event = threading.Event()
        self.beating = threading.Event()
        self.beating.set()
        #: "echo": answer at once; "batch:N": hold N requests then answer shuffled;
        #: "stream": answer with 3 chunks, waiting for release between them; "silent".
        self.mode = "echo"
        #: Requests on these topics are never answered.
        self.silent_topics: set[str] = set()
        self.release: queue.Queue[None] = queue.Queue()
        self.held: list[tuple[AicoMessage, ApiRequest]] = []
        #: Requests on these topics are never answered.
        self.silent_topics: set[str] = set()
        self.received = 0
        self.events: queue.Queue[str] = queue.Queue()

    def authorize(self, state_dir: Path) -> None:
        target = state_dir / "curve" / "modules" / f"{self.name_}.key"
        target.write_bytes(self.allow_key.read_bytes())

    def registration(self) -> bytes:
        reg = ModuleRegistration(name=self.name_, version="9.9", heartbeat_interval_ms=self.heartbeat_ms,
                                 routes=self.routes, health_topic=self.health_topic)
        return envelope(reg)

    def run(self) -> None:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        sub = ctx.socket(zmq.SUB)
        for s in (pub, sub):
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = self.public, self.secret, self.server
            s.linger = 0
        pub.connect(self.pub_ep)
        sub.connect(self.sub_ep)
        topics = {t for r in self.routes for t in r.topic.split(",")} | ({self.health_topic} if self.health_topic else set())
        for t in topics:
            sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        sub.setsockopt(zmq.SUBSCRIBE, b"system/module/discover/v1")
        time.sleep(0.3)  # let the subscriptions reach the broker before registering
        pub.send_multipart([b"system/module/registered/v1", self.registration()])
        self.events.put("registered")
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_beat:
                if self.beating.is_set():
                    pub.send_multipart([b"system/module/heartbeat/v1", envelope(ModuleHeartbeat(name=self.name_))])
                next_beat = now + self.heartbeat_ms / 1000
            if self.mode == "reregister":
                pub.send_multipart([b"system/module/registered/v1", self.registration()])
                self.mode = "echo"
            if not poller.poll(20):
                continue
            topic, data = sub.recv_multipart()
            msg = AicoMessage.FromString(data)
            if topic == b"system/module/discover/v1":
                pub.send_multipart([b"system/module/registered/v1", self.registration()])
                continue
            req = ApiRequest()
            msg.any_payload.Unpack(req)
            self.received += 1
            if topic.decode() in self.silent_topics:
                continue
            self.handle(pub, msg, req)
        pub.close()
        sub.close()
        ctx.term()

    def reply(self, pub: zmq.Socket[bytes], msg: AicoMessage, response: ApiResponse, stream: str = "") -> None:
        attrs = {"correlation_id": msg.metadata.attributes["correlation_id"]}
        if stream:
            attrs["stream"] = stream
        pub.send_multipart([msg.metadata.attributes["reply_to"].encode(), envelope(response, attrs)])

    def answer(self, req: ApiRequest) -> ApiResponse:
        body = json.loads(req.body) if req.body else None
        out = {"path": req.path, "params": dict(req.path_params), "body": body,
               "subject": req.principal.subject, "transport": req.principal.transport,
               "request_id": req.request_id}
        return ApiResponse(request_id=req.request_id, status=200, body=json.dumps(out).encode(),
                           headers={"content-type": "application/json"})

    def handle(self, pub: zmq.Socket[bytes], msg: AicoMessage, req: ApiRequest) -> None:
        if self.mode == "silent":
            return
        if req.path == "/health":
            self.reply(pub, msg, ApiResponse(request_id=req.request_id, status=200, body=b'{"status": "ok"}'))
            return
        if self.mode.startswith("batch:"):
            self.held.append((msg, req))
            if len(self.held) == int(self.mode.split(":")[1]):
                random.shuffle(self.held)
                for m, r in self.held:
                    self.reply(pub, m, self.answer(r))
                self.held.clear()
            return
        if self.mode == "stream" and msg.metadata.attributes.get("stream") == "1":
            for i in range(3):
                self.reply(pub, msg, ApiResponse(request_id=req.request_id, status=200,
                                                 body=json.dumps({"chunk": i}).encode()), "chunk")
                self.events.put(f"chunk{i}")
                if i < 2:
                    self.release.get(timeout=10)
            self.reply(pub, msg, ApiResponse(request_id=req.request_id, status=200, body=b""), "end")
            return
        if self.mode == "hold":  # answer once the test releases it
            self.events.put("held")
            self.release.get(timeout=10)
            self.reply(pub, msg, self.answer(req))
            return
        if self.mode == "crash":
            self.reply(pub, msg, ApiResponse(request_id=req.request_id, status=500, body=b"oops"))
            return
        self.reply(pub, msg, self.answer(req))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
