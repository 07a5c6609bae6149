"""The ZAP handler of the embedded broker: admits only the Curve keys in ``curve/modules/``.

ZeroMQ asks the ZAP handler (RFC 27) about every Curve handshake on a socket with
``curve_server`` set. The handler runs in its own thread, on a REP socket bound to
``inproc://zeromq.zap.01`` in the broker's own :class:`zmq.Context` (ZAP is per context).

The allowed keys are read from the modules directory *at every handshake*: the directory
and its files are ``stat``-ed each time, and the files are parsed again only when that
signature changed, so a key added while the broker runs is admitted at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from twisted.logger import Logger
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

_Signature = tuple[tuple[str, int, int], ...]


class ModuleKeyStore:
    """The public keys of ``*.key`` certificates in one directory, kept in step with it."""

    log = Logger()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._signature: _Signature | None = None
        self._keys: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def _scan(self) -> _Signature:
        entries: list[tuple[str, int, int]] = []
        try:
            st = self.directory.stat()
        except FileNotFoundError:
            return ()
        entries.append((".", st.st_mtime_ns, st.st_size))
        for path in self.directory.glob("*.key"):
            try:
                fst = path.stat()
            except FileNotFoundError:
                continue
            entries.append((path.name, fst.st_mtime_ns, fst.st_size))
        return tuple(sorted(entries))

    def _load(self) -> dict[bytes, str]:
        keys: dict[bytes, str] = {}
        for path in sorted(self.directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError):
                self.log.warn("ignoring unreadable bus client certificate {path}", path=str(path))
                continue
            if public and len(public) == 40:
                keys[public] = path.stem
        return keys

    def lookup(self, public_key: bytes) -> str | None:
        """The client name for a Z85 (40 bytes) or raw (32 bytes) public key, or None."""
        if len(public_key) == 32:
            public_key = z85.encode(public_key)
        with self._lock:
            signature = self._scan()
            if signature != self._signature:
                self._keys = self._load()
                self._signature = signature
            return self._keys.get(public_key)


class RefusalLog:
    """Refused bus clients, logged at a bounded rate: a local process retrying with an
    unknown key (or no Curve at all) must not be able to flood the log.

    The first refusal of a key is logged, at most :attr:`burst` such lines per
    :attr:`interval` seconds; every other refusal is only counted, and the count goes
    out as one summary line at most once per interval (with the next refusal after it).
    """

    log = Logger()

    def __init__(self, interval: float = 60.0, burst: int = 10, remember: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.burst = burst
        self.remember = remember
        self.clock = clock
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window = clock()
        self._lines = 0
        #: Refusals counted and not logged yet (for the next summary line).
        self.suppressed = 0
        self._lock = threading.Lock()

    def refused(self, key: str, peer: str, reason: str) -> None:
        """A client at *peer* presenting *key* (a public key, or a mechanism) was refused."""
        with self._lock:
            now = self.clock()
            if now - self._window >= self.interval:
                if self.suppressed:
                    self.log.warn("bus: {count} more refused connection attempt(s) in the "
                                  "last {seconds:.0f} s (not logged one by one)",
                                  count=self.suppressed, seconds=now - self._window)
                self._window, self._lines, self.suppressed = now, 0, 0
            if key in self._seen or self._lines >= self.burst:
                self.suppressed += 1
                return
            self._seen[key] = None
            if len(self._seen) > self.remember:
                self._seen.popitem(last=False)
            self._lines += 1
            self.log.warn("bus client at {peer} refused: {reason} (key {key}); its further "
                          "refusals are counted, not logged", peer=peer, reason=reason, key=key)


class ZapHandler:
    """Answers ZAP requests for one context in a thread of its own."""

    log = Logger()

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: ModuleKeyStore,
                 refusals: RefusalLog | None = None) -> None:
        self._context = context
        self._keys = keys
        self.refusals = refusals or RefusalLog()
        self._thread: threading.Thread | None = None
        self._control: zmq.Socket[bytes] | None = None
        self._control_endpoint = f"inproc://aico-zap-control-{id(self):x}"

    def start(self) -> None:
        """Bind the ZAP endpoint (synchronously) and start the handler thread."""
        handler = self._context.socket(zmq.REP)
        handler.linger = 0
        handler.bind(ZAP_ENDPOINT)
        control_in = self._context.socket(zmq.PAIR)
        control_in.linger = 0
        control_in.bind(self._control_endpoint)
        self._control = self._context.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.connect(self._control_endpoint)
        self._thread = threading.Thread(
            target=self._run, args=(handler, control_in), name="aico-bus-zap", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; its sockets are closed on the way out."""
        if self._thread is None or self._control is None:
            return
        self._control.send(b"STOP")
        self._thread.join()
        self._control.close()
        self._thread = None
        self._control = None

    def _run(self, handler: zmq.Socket[bytes], control: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(handler, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if control in events:
                    return
                if handler in events:
                    request = handler.recv_multipart()
                    try:
                        reply = self.answer(request)
                    except Exception:
                        # A REP socket must answer; refuse rather than wedge every handshake.
                        self.log.failure("ZAP handler failed; refusing the client")
                        request_id = request[1] if len(request) > 1 else b""
                        reply = [b"1.0", request_id, b"500", b"internal error", b"", b""]
                    handler.send_multipart(reply)
        except zmq.ContextTerminated:
            return
        finally:
            handler.close()
            control.close()

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply frames for the request frames *request*."""
        if len(request) < 6:
            self.log.warn("malformed ZAP request ({count} frames)", count=len(request))
            request_id = request[1] if len(request) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        peer = address.decode("utf-8", "replace")
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
        if mechanism != b"CURVE" or not credentials:
            kind = mechanism.decode("ascii", "replace")[:32]
            self.refusals.refused(f"mechanism:{kind}", peer, f"mechanism {kind} is not CURVE")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        name = self._keys.lookup(credentials[0])
        if name is None:
            key = credentials[0]
            shown = (z85.encode(key) if len(key) == 32 else key).decode("ascii", "replace")
            self.refusals.refused(shown[:40], peer, "unknown Curve key")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        self.log.debug("bus client {name} admitted from {peer}", name=name, peer=peer)
        return [b"1.0", request_id, b"200", b"OK", name.encode("utf-8"), b""]
