"""The gateway's configuration: one TOML file, loaded once into frozen typed objects.

Every table is a frozen dataclass below; the loader walks the dataclass fields, so
the types here *are* the schema. Every error names the key and the file. Keys marked
``reloadable`` in their field metadata are applied on SIGHUP; the rest need a restart.
``docs/configuration.md`` lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aico.net import is_loopback

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the file."""

    def __init__(self, key: str, problem: str, source: str = "<string>") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {key}: {problem}")


def _reloadable(default: Any) -> Any:
    return field(default=default, metadata={"reloadable": True})


def _reloadable_factory(factory: Callable[[], Any]) -> Any:
    return field(default_factory=factory, metadata={"reloadable": True})


@dataclass(frozen=True)
class GatewaySection:
    #: State directory; ``--state-dir`` and ``AICO_STATE_DIR`` take precedence.
    state_dir: str = ""
    #: Seconds that SIGTERM waits for in-flight requests.
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class ListenerSection:
    host: str = "127.0.0.1"
    port: int = 0
    enabled: bool = True
    allow_remote: bool = False


def _listener(port: int, enabled: bool = True, host: str = "127.0.0.1") -> Any:
    return field(default_factory=lambda: ListenerSection(host=host, port=port, enabled=enabled))


@dataclass(frozen=True)
class GuardedListenerSection(ListenerSection):
    """``[http]`` and ``[admin]``: a listener with the DNS-rebinding guard."""

    #: Host names (besides the loopback names) a request's ``Host`` may carry while the
    #: listener is on loopback (docs/security.md, "DNS rebinding"); compared without the port.
    allowed_hosts: tuple[str, ...] = _reloadable(())


def _guarded_listener(port: int) -> Any:
    return field(default_factory=lambda: GuardedListenerSection(port=port))


@dataclass(frozen=True)
class PairingSection:
    """``[pairing]``: the listener that is open only while a pairing window is."""

    host: str = "127.0.0.1"
    port: int = 8776
    #: ``false``: the gateway never opens the listener (no device can pair).
    enabled: bool = True
    allow_remote: bool = False
    #: Minutes a window stays open (``aico-gateway pair --minutes`` overrides it).
    window_minutes: float = _reloadable(5.0)
    #: Failed attempts (wrong code, or a peer that went silent after the PAKE) that close
    #: a window.
    max_failures: int = _reloadable(3)
    #: Seconds one attempt may take from connect to certificate.
    attempt_timeout: float = _reloadable(30.0)
    #: Pairing connections at once (each costs ~30 ms of CPU for SPAKE2).
    max_connections: int = _reloadable(4)


@dataclass(frozen=True)
class MdnsSection:
    """``[mdns]``: advertising the gateway on the LAN as ``_aico-gateway._tcp``."""

    #: ``"auto"``: advertise when the ``tls`` or ``pairing`` listener is on a non-loopback
    #: host; ``"on"``: always (tests use it on loopback); ``"off"``: never.
    advertise: Literal["auto", "on", "off"] = "auto"
    #: Interface addresses to advertise on (``[]``: every interface).
    interfaces: tuple[str, ...] = ()
    #: The gateway's name in the advertisement (``""``: the host name).
    name: str = ""


@dataclass(frozen=True)
class IpcSection:
    #: ``ipc://`` endpoint; ``"default"`` is ``ipc://STATE_DIR/gateway.ipc``, ``""`` turns it off.
    endpoint: str = "default"
    #: TCP fallback for clients that cannot use ``ipc://``; ``""`` turns it off.
    fallback: str = "tcp://127.0.0.1:8775"
    #: CurveZMQ on the ``ipc://`` endpoint (the TCP fallback always uses it).
    curve: bool = True


@dataclass(frozen=True)
class BusSection:
    #: The broker's XSUB endpoint (publishers connect here).
    pub: str = "tcp://127.0.0.1:5555"
    #: The broker's XPUB endpoint (subscribers connect here).
    sub: str = "tcp://127.0.0.1:5556"
    #: Run the broker in the gateway process; otherwise connect to ``pub``/``sub``.
    embedded_broker: bool = True
    #: Seconds a bus request waits for its reply.
    request_timeout: float = _reloadable(5.0)
    #: Seconds ``GET /api/v1/health`` waits for module health answers.
    health_deadline: float = _reloadable(1.5)
    #: Seconds the gateway waits at start for the broker to answer (then exits, status 1).
    start_timeout: float = 30.0


#: The names of :data:`aico.bus.builtin.BUILTIN_MODULES`, which this module does not import:
#: that would load the modules themselves (twisted.internet, asyncio, protobuf) into every
#: ``aico-gateway config check``. ``tests/test_config.py`` checks that the two agree.
BUILTIN_MODULE_NAMES: frozenset[str] = frozenset({"conversation", "health"})


@dataclass(frozen=True)
class ModulesSection:
    #: Built-in backend modules to run in the gateway process.
    builtin: tuple[str, ...] = ("conversation", "health")
    #: Run the built-in modules in-process (``false``: start them with ``aico-module``).
    in_process: bool = True


@dataclass(frozen=True)
class AuthSection:
    issuer: str = "aico-gateway"
    audience: str = "aico"
    access_ttl: int = 900
    refresh_ttl: int = 1_209_600
    #: Seconds of clock skew tolerated on ``exp``/``nbf``/``iat``.
    leeway: int = _reloadable(5)
    #: Failed logins in a row that lock an account.
    lockout_threshold: int = _reloadable(5)
    #: First lock in seconds; doubles with each further lock, up to ``lockout_max``.
    lockout_base: float = _reloadable(30.0)
    lockout_max: float = _reloadable(3600.0)
    #: Shortest password accepted when an admin creates or changes one.
    password_min_length: int = _reloadable(10)
    #: Argon2 operations (hash, verify) run at once, gateway-wide (64 MiB each).
    password_concurrency: int = _reloadable(2)
    #: Password operations that may wait for a free slot; past it: 503 with Retry-After.
    password_queue: int = _reloadable(8)


@dataclass(frozen=True)
class WebSocketSection:
    auth_timeout: float = _reloadable(10.0)
    idle_timeout: float = _reloadable(90.0)
    max_message_size: int = 1_048_576
    #: Bytes queued to one socket before it is dropped as a slow consumer.
    send_buffer: int = 4_194_304
    #: Browser origins allowed to open a socket (``*`` wildcards); clients that send no
    #: ``Origin`` (not browsers) are always allowed. Default: pages served from this machine.
    allowed_origins: tuple[str, ...] = (
        "http://127.0.0.1:*", "http://localhost:*", "http://::1:*",
        "https://127.0.0.1:*", "https://localhost:*", "https://::1:*",
    )


@dataclass(frozen=True)
class LimitsSection:
    body_max: int = _reloadable(1_048_576)
    json_depth: int = _reloadable(32)
    string_max: int = _reloadable(65_536)
    header_count: int = _reloadable(100)
    header_size: int = _reloadable(16_384)
    #: Seconds a client has to send a complete request head (slowloris guard); also how
    #: long a keep-alive connection may wait for its next request.
    head_timeout: float = _reloadable(10.0)
    #: Seconds a client has, once the head is in, to send the whole request body (slow
    #: body guard): past it the request is answered 408 and the connection closed.
    body_timeout: float = _reloadable(30.0)
    #: Requests one WebSocket or IPC connection may have in flight at once (fair share:
    #: past it the gateway stops reading that WebSocket; IPC requests wait in a queue).
    max_inflight: int = _reloadable(64)
    #: Requests of one IPC peer that may wait behind ``max_inflight``; more are refused
    #: at once with 429.
    inflight_queue: int = _reloadable(64)


@dataclass(frozen=True)
class LoggingSection:
    #: One access-log line per finished request, on every transport.
    access: bool = _reloadable(True)


@dataclass(frozen=True)
class RateTier:
    requests: int = 60
    per_seconds: float = 60.0
    burst: int = 20


def _default_tiers() -> dict[str, RateTier]:
    return {
        "public": RateTier(requests=120, per_seconds=60, burst=30),
        "auth": RateTier(requests=10, per_seconds=60, burst=5),
        "standard": RateTier(requests=600, per_seconds=60, burst=100),
        "admin": RateTier(requests=300, per_seconds=60, burst=50),
    }


@dataclass(frozen=True)
class RateLimitSection:
    enabled: bool = _reloadable(True)
    tiers: dict[str, RateTier] = _reloadable_factory(_default_tiers)
    #: Refusals within one window after which a client is temporarily blocked.
    block_after: int = _reloadable(20)
    #: First block in seconds; doubles with each further block, up to ``block_max``.
    block_base: float = _reloadable(60.0)
    block_max: float = _reloadable(3600.0)


def _default_roles() -> dict[str, tuple[str, ...]]:
    return {
        # "*" grants every capability; "x:*" every capability that starts with "x:".
        "admin": ("*",),
        "user": ("users:self", "conversations:read", "conversations:write",
                 "events:conversation", "events:user", "sync:read", "sync:write",
                 "devices:self"),
        # A paired device on the tls listener (docs/devices.md), plus its own capabilities.
        "device": ("users:self", "conversations:read", "conversations:write",
                   "events:conversation", "events:user", "sync:read", "sync:write",
                   "devices:self"),
        "service": ("events:*", "conversations:read"),
    }


@dataclass(frozen=True)
class SyncCollection:
    sync: bool = True
    peers: tuple[str, ...] = ()
    strategy: Literal["lww", "merge", "keep-both"] = "lww"


@dataclass(frozen=True)
class SyncPeerAddress:
    """``[sync.peers.NAME]``: where a peer's ``sync`` listener is, overriding both what
    mDNS finds and what ``sync join`` recorded (NAME: its device ID or its name)."""

    host: str = ""
    port: int = 8774


@dataclass(frozen=True)
class SyncSection:
    enabled: bool = False
    host: str = "0.0.0.0"  # noqa: S104 - federation listens on the LAN when enabled
    port: int = 8774
    collections: dict[str, SyncCollection] = field(default_factory=dict)
    #: ``"HOST:PORT"`` of a transit relay both peers can reach (``""``: no relay).
    relay: str = ""
    #: Failed direct connection attempts to a peer before its client tries the relay.
    direct_attempts: int = 2
    #: Advertise and browse ``_aico-sync._tcp`` (mDNS) while sync is enabled.
    mdns: bool = True
    #: Addresses mDNS runs on (``[]``: the listener's host; every interface for 0.0.0.0).
    interfaces: tuple[str, ...] = ()
    #: Static peer addresses by peer device ID or name (``[sync.peers.NAME]``).
    peers: dict[str, SyncPeerAddress] = field(default_factory=dict)


def split_host_port(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[V6]:PORT"`` for IPv6) as ``(host, port)``; ValueError if not."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or (":" in host and not bracketed):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if any(ch.isspace() or ch in "/@[]" for ch in host):
        raise ValueError(f"expected a host name or address, got {host!r}")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"expected a port 1-65535, got {number}")
    return host, number


@dataclass(frozen=True)
class Config:
    """The whole configuration. Build it with :func:`load` or :func:`from_string`."""

    gateway: GatewaySection = field(default_factory=GatewaySection)
    http: GuardedListenerSection = _guarded_listener(8771)
    tls: ListenerSection = _listener(8772)
    admin: GuardedListenerSection = _guarded_listener(8773)
    pairing: PairingSection = field(default_factory=PairingSection)
    mdns: MdnsSection = field(default_factory=MdnsSection)
    ipc: IpcSection = field(default_factory=IpcSection)
    bus: BusSection = field(default_factory=BusSection)
    modules: ModulesSection = field(default_factory=ModulesSection)
    auth: AuthSection = field(default_factory=AuthSection)
    websocket: WebSocketSection = field(default_factory=WebSocketSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    ratelimit: RateLimitSection = field(default_factory=RateLimitSection)
    sync: SyncSection = field(default_factory=SyncSection)
    #: Role → capabilities (``[roles]``); a partial table keeps the other defaults.
    roles: dict[str, tuple[str, ...]] = field(
        default_factory=_default_roles, metadata={"reloadable": True, "table": True}
    )
    #: Where this configuration came from (a path, or ``<string>``/``<defaults>``).
    source: str = field(default="<defaults>", metadata={"internal": True})

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- loading


def load(path: str | Path) -> Config:
    """Read and validate the TOML file at *path*."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("(file)", f"cannot read: {e.strerror}", source) from e
    return from_string(text, source)


def from_string(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML *text*; errors name the key and *source*."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", str(e), source) from e
    return from_mapping(data, source)


def from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> Config:
    config = _build(Config, data, "", source)
    # A partial [ratelimit.tiers] table keeps the defaults of the tiers it omits.
    tiers = {**_default_tiers(), **config.ratelimit.tiers}
    ratelimit = dataclasses.replace(config.ratelimit, tiers=tiers)
    roles = {**_default_roles(), **config.roles}
    config = dataclasses.replace(config, source=source, ratelimit=ratelimit, roles=roles)
    _check(config)
    return config


def _build(cls: type[T], data: Any, prefix: str, source: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "(root)", "expected a table", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(prefix + key, "unknown key", source)
        kwargs[key] = _convert(hints[key], value, prefix + key, source)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)  # type: ignore[arg-type]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, allowed))}, got {value!r}", source)
        return value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array, got {type(value).__name__}", source)
        return tuple(_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(key, "expected a table", source)
        return {k: _convert(item, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unsupported config type {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", source)
        return value
    raise TypeError(f"unsupported config type {tp}")


_LISTENERS = ("http", "tls", "admin", "pairing")


def _check(c: Config) -> None:
    """Rules that span keys or ranges; types were checked while building."""
    src = c.source
    for name in (*_LISTENERS, "sync"):
        section = getattr(c, name)
        if not 0 <= section.port <= 65535:
            raise ConfigError(f"{name}.port", f"expected 0-65535, got {section.port}", src)
        if not section.host:
            raise ConfigError(f"{name}.host", "must not be empty", src)
    for name in ("http", "admin"):
        section = getattr(c, name)
        for i, allowed in enumerate(section.allowed_hosts):
            if not allowed or (any(ch in allowed for ch in " /:@") and not allowed.startswith("[")):
                raise ConfigError(f"{name}.allowed_hosts[{i}]",
                                  f"expected a host name without a port, got {allowed!r}", src)
        if section.enabled and not is_loopback(section.host) and not section.allow_remote:
            raise ConfigError(
                f"{name}.host",
                f"{section.host!r} is not a loopback address; set {name}.allow_remote = true "
                "(and serve it only with TLS and client certificates) to expose it",
                src,
            )
    for key in ("pub", "sub"):
        value = getattr(c.bus, key)
        if not value.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"bus.{key}", f"expected a ZeroMQ endpoint, got {value!r}", src)
        if c.bus.embedded_broker and value.startswith("tcp://"):
            host = value[len("tcp://") :].rsplit(":", 1)[0]
            if not is_loopback(host):
                raise ConfigError(f"bus.{key}", "the embedded broker binds loopback only", src)
    if c.ipc.endpoint not in ("", "default") and not c.ipc.endpoint.startswith("ipc://"):
        raise ConfigError("ipc.endpoint", f"expected ipc://PATH, got {c.ipc.endpoint!r}", src)
    if c.ipc.fallback and not c.ipc.fallback.startswith("tcp://"):
        raise ConfigError("ipc.fallback", f"expected tcp://HOST:PORT, got {c.ipc.fallback!r}", src)
    positive = {
        "bus.request_timeout": c.bus.request_timeout,
        "bus.health_deadline": c.bus.health_deadline,
        "auth.access_ttl": c.auth.access_ttl,
        "auth.refresh_ttl": c.auth.refresh_ttl,
        "websocket.auth_timeout": c.websocket.auth_timeout,
        "websocket.idle_timeout": c.websocket.idle_timeout,
        "websocket.max_message_size": c.websocket.max_message_size,
        "websocket.send_buffer": c.websocket.send_buffer,
        "limits.body_max": c.limits.body_max,
        "limits.json_depth": c.limits.json_depth,
        "limits.string_max": c.limits.string_max,
        "limits.header_count": c.limits.header_count,
        "limits.header_size": c.limits.header_size,
        "limits.head_timeout": c.limits.head_timeout,
        "limits.body_timeout": c.limits.body_timeout,
        "ratelimit.block_base": c.ratelimit.block_base,
        "ratelimit.block_max": c.ratelimit.block_max,
        "ratelimit.block_after": c.ratelimit.block_after,
        "gateway.shutdown_grace": c.gateway.shutdown_grace,
        "bus.start_timeout": c.bus.start_timeout,
        "limits.max_inflight": c.limits.max_inflight,
        "limits.inflight_queue": c.limits.inflight_queue,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be greater than 0, got {value}", src)
    for role, caps in c.roles.items():
        for i, cap in enumerate(caps):
            if not cap or any(ch.isspace() for ch in cap):
                raise ConfigError(f"roles.{role}[{i}]", f"not a capability: {cap!r}", src)
    for key in ("window_minutes", "max_failures", "attempt_timeout", "max_connections"):
        if getattr(c.pairing, key) <= 0:
            raise ConfigError(f"pairing.{key}", "must be greater than 0", src)
    if c.auth.lockout_threshold < 1:
        raise ConfigError("auth.lockout_threshold", "must be at least 1", src)
    if c.auth.leeway < 0:
        raise ConfigError("auth.leeway", "must not be negative", src)
    if c.auth.password_concurrency < 1:
        raise ConfigError("auth.password_concurrency", "must be at least 1", src)
    if c.auth.password_queue < 0:
        raise ConfigError("auth.password_queue", "must not be negative", src)
    if c.auth.refresh_ttl < c.auth.access_ttl:
        raise ConfigError("auth.refresh_ttl", "must not be shorter than auth.access_ttl", src)
    for tier_name, tier in c.ratelimit.tiers.items():
        for attr in ("requests", "per_seconds", "burst"):
            if getattr(tier, attr) <= 0:
                raise ConfigError(f"ratelimit.tiers.{tier_name}.{attr}", "must be greater than 0", src)
    for i, name in enumerate(c.modules.builtin):
        if name not in BUILTIN_MODULE_NAMES:
            raise ConfigError(f"modules.builtin[{i}]", f"unknown built-in module {name!r}", src)
    _check_sync(c.sync, src)


def _check_sync(s: SyncSection, src: str) -> None:
    """``[sync]``'s relay, discovery and static peer keys."""
    if s.relay:
        try:
            split_host_port(s.relay)
        except ValueError as e:
            raise ConfigError("sync.relay", f"{e} (the transit relay's address, e.g. "
                              '"relay.example.org:4001"; "" for none)', src) from None
    if s.direct_attempts < 1:
        raise ConfigError("sync.direct_attempts", f"must be at least 1, got {s.direct_attempts}",
                          src)
    for i, address in enumerate(s.interfaces):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"sync.interfaces[{i}]",
                              f"expected an IP address of this machine, got {address!r}",
                              src) from None
    for name, peer in s.peers.items():
        if not name.strip():
            raise ConfigError("sync.peers", "a peer table needs a name (device ID or name)", src)
        if not peer.host or any(ch.isspace() or ch in "/@" for ch in peer.host):
            raise ConfigError(f"sync.peers.{name}.host",
                              f"expected a host name or address, got {peer.host!r}", src)
        if not 0 < peer.port < 65536:
            raise ConfigError(f"sync.peers.{name}.port", f"expected 1-65535, got {peer.port}",
                              src)


@dataclasses.dataclass(frozen=True)
class Reload:
    """What a reload does: the config to run with, and what changed."""

    #: *old* with every reloadable key taken from the new file.
    config: Config
    #: Keys that changed and apply now.
    live: list[str]
    #: Keys that changed but keep their running value until a restart.
    restart: list[str]


def reload(old: Config, new: Config) -> Reload:
    """Compare a running config with a re-read one, section by section, once."""
    live: list[str] = []
    restart: list[str] = []
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if f.metadata.get("table"):
            if f.metadata.get("reloadable"):
                live.append(f.name)
                changes[f.name] = b
            else:
                restart.append(f.name)
            continue
        taken: dict[str, Any] = {}
        for sub in dataclasses.fields(a):
            if getattr(a, sub.name) != getattr(b, sub.name):
                key = f"{f.name}.{sub.name}"
                if sub.metadata.get("reloadable"):
                    live.append(key)
                    taken[sub.name] = getattr(b, sub.name)
                else:
                    restart.append(key)
        if taken:
            changes[f.name] = dataclasses.replace(a, **taken)
    return Reload(dataclasses.replace(old, **changes), live, restart)


def reloadable_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Compare two configs: (keys that changed and reload live, keys that need a restart)."""
    result = reload(old, new)
    return result.live, result.restart


def iter_keys() -> typing.Iterator[tuple[str, Any, bool]]:
    """Every key as (dotted name, default, reloadable) — used to check the docs."""
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        section = getattr(defaults, f.name)
        if f.metadata.get("table"):
            yield f.name, section, bool(f.metadata.get("reloadable"))
            continue
        for sub in dataclasses.fields(section):
            yield f"{f.name}.{sub.name}", getattr(section, sub.name), bool(sub.metadata.get("reloadable"))
