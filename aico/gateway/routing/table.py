"""The route table: the gateway's own routes and every route a backend module registered.

The table is an immutable snapshot rebuilt on every change (a module registering or
going away) and swapped in whole, so a lookup never sees a half-updated table. Static
paths are one dict lookup; templated paths (``{name}`` placeholders) are matched by
a regular expression per template, most specific first.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred

from aico.gateway.errors import MethodNotAllowed, NotFound
from aico.gateway.routing.messages import Request, Response

Handler = Callable[[Request], "Deferred[Response] | Awaitable[Response] | Response"]

#: A ``{name}`` placeholder in a route template (the OpenAPI document reads them too).
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: How an ``auth``-tier route is keyed by the rate limiter (:attr:`RouteEntry.limit_by`).
LIMIT_BY = frozenset({"", "login", "refresh"})


class RouteConflict(ValueError):
    """Two routes claim the same method and path."""


@dataclass(frozen=True, eq=False)
class RouteEntry:
    """One route. ``capability`` is what the caller needs, unless ``public``."""

    method: str
    path: str
    handler: Handler
    owner: str = "gateway"
    capability: str = ""
    public: bool = False
    #: Rate-limit tier (docs/security.md § Rate limiting): public, auth, standard or admin.
    tier: str = "standard"
    #: Whose budget an ``auth``-tier request spends (:func:`~aico.gateway.security.chain.
    #: limit_key`): ``"login"`` — the account named in the body, from this source;
    #: ``"refresh"`` — the refresh token's session family; ``""`` — the source address.
    limit_by: str = ""
    request_schema: Mapping[str, Any] | None = None
    response_schema: Mapping[str, Any] | None = None
    #: Bus topics the route is served from (module routes).
    topics: tuple[str, ...] = ()
    summary: str = ""
    #: The route can answer a streamed (NDJSON) body.
    streaming: bool = False
    #: Status of a successful response, for the OpenAPI document.
    success_status: int = 200
    #: The body is not JSON (e.g. a Prometheus text page): skip body validation.
    raw_body: bool = False
    #: Set by the validation layer when the table is built.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unsupported method {self.method!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"route path must start with '/': {self.path!r}")
        if self.limit_by not in LIMIT_BY:
            raise ValueError(f"{self.method} {self.path}: unknown limit_by {self.limit_by!r}")
        if not self.public and not self.capability:
            raise ValueError(f"{self.method} {self.path}: a route is public or names a capability")


def _compile(template: str) -> re.Pattern[str]:
    pattern = ""
    pos = 0
    for m in PLACEHOLDER.finditer(template):
        pattern += re.escape(template[pos : m.start()]) + "([^/]+)"
        pos = m.end()
    pattern += re.escape(template[pos:])
    return re.compile(f"^{pattern}$")


def _template_key(path: str) -> str:
    """Two templates that match the same paths share a key (names don't matter)."""
    return PLACEHOLDER.sub("{}", path)


class RouteTable:
    """An immutable set of routes with fast lookup."""

    def __init__(self, entries: Iterable[RouteEntry] = ()) -> None:
        self.entries: tuple[RouteEntry, ...] = tuple(entries)
        self._static: dict[str, dict[str, RouteEntry]] = {}
        dynamic: dict[str, tuple[re.Pattern[str], dict[str, RouteEntry], int]] = {}
        seen: dict[tuple[str, str], RouteEntry] = {}
        for entry in self.entries:
            key = (entry.method, _template_key(entry.path))
            if key in seen:
                other = seen[key]
                raise RouteConflict(
                    f"{entry.method} {entry.path} ({entry.owner}) clashes with "
                    f"{other.method} {other.path} ({other.owner})"
                )
            seen[key] = entry
            if "{" in entry.path:
                tkey = _template_key(entry.path)
                if tkey not in dynamic:
                    static_segments = sum(
                        1 for s in entry.path.split("/") if s and "{" not in s
                    )
                    dynamic[tkey] = (_compile(entry.path), {}, static_segments)
                dynamic[tkey][1][entry.method] = entry
            else:
                self._static.setdefault(entry.path, {})[entry.method] = entry
        self._dynamic = sorted(dynamic.values(), key=lambda d: -d[2])

    def match(self, method: str, path: str) -> tuple[RouteEntry, dict[str, str]]:
        """The entry and path parameters for *method* *path*; raise NotFound / MethodNotAllowed."""
        by_method = self._static.get(path)
        groups: tuple[str, ...] = ()
        if by_method is None:
            for pattern, methods, _ in self._dynamic:
                m = pattern.match(path)
                if m is not None:
                    by_method = methods
                    groups = m.groups()
                    break
        if by_method is None:
            raise NotFound(f"no route for {path}")
        entry = by_method.get(method)
        if entry is None and method == "HEAD":
            # RFC 9110: HEAD wherever GET works (twisted.web sends no body for HEAD).
            entry = by_method.get("GET")
        if entry is None:
            allowed = set(by_method)
            if "GET" in allowed:
                allowed.add("HEAD")
            raise MethodNotAllowed(sorted(allowed))
        if not groups:
            return entry, {}
        # Placeholders are positional: each method's template may name them its own way.
        names = PLACEHOLDER.findall(entry.path)
        return entry, {n: unquote(v) for n, v in zip(names, groups, strict=True)}

    def with_routes(self, owner: str, entries: Iterable[RouteEntry]) -> RouteTable:
        """A new table where *owner*'s routes are replaced by *entries*."""
        kept = [e for e in self.entries if e.owner != owner]
        return RouteTable([*kept, *entries])

    def __len__(self) -> int:
        return len(self.entries)
