"""The embedded message-bus broker: an XSUB/XPUB proxy with CurveZMQ and a ZAP handler.

Publishers connect to the XSUB endpoint (``pub``), subscribers to the XPUB endpoint
(``sub``); the proxy forwards messages one way and subscriptions the other. Both sockets
bind loopback addresses only, act as Curve servers with ``curve/broker.key_secret`` and
ask the :class:`~aico.bus.zap.ZapHandler` about every client. The proxy runs in a thread
(``zmq.proxy_steerable``) that :meth:`EmbeddedBroker.stop` terminates and joins.
"""

from __future__ import annotations

import threading

import zmq
from twisted.logger import Logger

from aico.bus.curve import CurveLayout, load_pair
from aico.bus.errors import BrokerBindError
from aico.bus.zap import ModuleKeyStore, ZapHandler
from aico.net import is_loopback_endpoint

#: Messages a broker socket queues per peer before it drops (PUB semantics).
HIGH_WATER_MARK = 100_000


class EmbeddedBroker:
    """The bus broker running in this process.

    ``start()`` binds synchronously (raising :class:`BrokerBindError` naming the address
    that failed) and starts the ZAP and proxy threads; ``stop()`` ends and joins them.
    """

    log = Logger()

    def __init__(self, layout: CurveLayout, pub: str, sub: str) -> None:
        self.layout = layout
        self.pub = pub
        self.sub = sub
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._zap: ZapHandler | None = None
        self._control: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._pub_endpoint: str | None = None
        self._sub_endpoint: str | None = None

    @property
    def pub_endpoint(self) -> str:
        """The bound XSUB endpoint (publishers connect here), with the actual port."""
        if self._pub_endpoint is None:
            raise RuntimeError("the broker is not started")
        return self._pub_endpoint

    @property
    def sub_endpoint(self) -> str:
        """The bound XPUB endpoint (subscribers connect here), with the actual port."""
        if self._sub_endpoint is None:
            raise RuntimeError("the broker is not started")
        return self._sub_endpoint

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Bind both endpoints and start the threads; raise ``BrokerBindError`` on failure."""
        if self._thread is not None:
            raise RuntimeError("the broker is already started")
        for address in (self.pub, self.sub):
            if not is_loopback_endpoint(address):
                raise BrokerBindError(address, "the embedded broker binds loopback only")
        _, secret = load_pair(self.layout.broker_secret, self.layout.keystore)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        zap = ZapHandler(context, ModuleKeyStore(self.layout.modules_dir))
        sockets: list[zmq.Socket[bytes]] = []
        try:
            zap.start()
            frontend = self._server_socket(context, zmq.XSUB, secret, sockets)
            backend = self._server_socket(context, zmq.XPUB, secret, sockets)
            self._bind(frontend, self.pub)
            self._bind(backend, self.sub)
            control_endpoint = f"inproc://aico-broker-control-{id(self):x}"
            control_in = context.socket(zmq.PAIR)
            sockets.append(control_in)
            control_in.bind(control_endpoint)
            control_out = context.socket(zmq.PAIR)
            sockets.append(control_out)
            control_out.connect(control_endpoint)
        except BaseException:
            for sock in sockets:
                sock.close(linger=0)
            zap.stop()
            context.term()
            raise
        self._pub_endpoint = frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sub_endpoint = backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._context = context
        self._zap = zap
        self._control = control_out
        self._thread = threading.Thread(
            target=self._run,
            args=(frontend, backend, control_in),
            name="aico-bus-broker",
            daemon=True,
        )
        self._thread.start()
        self.log.info(
            "bus broker listening: publishers on {pub}, subscribers on {sub}",
            pub=self._pub_endpoint,
            sub=self._sub_endpoint,
        )

    def stop(self) -> None:
        """Terminate the proxy, join the threads, close every socket and the context."""
        if self._thread is None:
            return
        assert self._control is not None and self._zap is not None and self._context
        self._control.send(b"TERMINATE")
        self._thread.join()
        self._control.close(linger=0)
        self._zap.stop()
        self._context.term()
        self._thread = None
        self._control = None
        self._zap = None
        self._context = None
        self.log.info("bus broker stopped")

    @staticmethod
    def _server_socket(
        context: zmq.Context[zmq.Socket[bytes]],
        kind: int,
        secret: bytes,
        sockets: list[zmq.Socket[bytes]],
    ) -> zmq.Socket[bytes]:
        sock = context.socket(kind)
        sockets.append(sock)
        sock.linger = 0
        sock.sndhwm = HIGH_WATER_MARK
        sock.rcvhwm = HIGH_WATER_MARK
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.zap_domain = b"aico-bus"
        return sock

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], address: str) -> None:
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            raise BrokerBindError(address, e.strerror) from e

    def _run(
        self,
        frontend: zmq.Socket[bytes],
        backend: zmq.Socket[bytes],
        control: zmq.Socket[bytes],
    ) -> None:
        try:
            zmq.proxy_steerable(frontend, backend, None, control)
        except zmq.ContextTerminated:
            pass
        except Exception:
            self.log.failure("bus broker proxy failed")
        finally:
            frontend.close(linger=0)
            backend.close(linger=0)
            control.close(linger=0)
