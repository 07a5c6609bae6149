"""Per-client rate limiting with GCRA, escalating temporary blocks, and IETF headers.

Algorithm (GCRA, the "generic cell rate algorithm", equivalent to a token bucket that
refills continuously): each tier ``{requests, per_seconds, burst}`` has an emission
interval ``T = per_seconds / requests`` and a tolerance of ``burst * T``. For every
(client, tier) we keep one number, the theoretical arrival time ``TAT``. A request at
``now`` is allowed when ``max(TAT, now) + T - now <= burst * T``; it then sets
``TAT = max(TAT, now) + T``. So an idle client may send ``burst`` requests at once,
then one every ``T`` seconds.

Headers follow draft-ietf-httpapi-ratelimit-headers (-10/-11, the form with two fields
whose members are Structured-Field Lists of quoted policy names with parameters):

* ``RateLimit-Policy: "standard";q=600;w=60`` — the steady quota ``q`` per window
  ``w`` seconds (``requests``/``per_seconds`` of the tier; the burst allowance is on
  top and is what ``r`` counts down);
* ``RateLimit: "standard";r=57;t=3`` — ``r`` requests may still be sent right now,
  ``t`` seconds until the quota is fully restored (whole seconds, rounded up);
* on refusal, ``Retry-After`` (whole seconds, rounded up, at least 1) says when the
  next request will be allowed.

Blocks: a client refused ``block_after`` times within one window of the tier
(``per_seconds``) is blocked on every tier for ``block_base`` seconds — that client key
only: the keys are what the caller cannot share with others (the security chain keys a
login by account and source, a refresh by session, see ``chain.limit_key``), so a block
never reaches another key of the same address; each further
block doubles, up to ``block_max``. The escalation level is remembered for
``escalation_memory`` seconds after a block ends, then starts again from
``block_base``. Requests during a block are refused without touching the quota and
do not extend the block. ``on_block(client_key, tier, seconds)`` is called once per
block (for the audit log).

Live changes (``update``, called by ``SIGHUP`` and the admin API through
``GatewayParts.reconfigure``): a changed tier governs every client from its next request.
Each stored TAT remembers the emission interval it was computed under, and the limiter
remembers when each tier's interval last changed. On the client's next check of that
tier (lazily — a reload costs nothing, however many entries there are) the backlog the
client had at the change is rescaled to the new interval, so the requests it has used
keep counting, and drains in real time from then; every backlog is clamped to the new
tolerance ``burst * T``, so the wait never exceeds what the new tier allows (at most
one new interval ``T``). A
tier raised a billionfold frees a limited client at once; a tier lowered applies from
the next request. Blocks are not touched by an update: they end only when they expire
or when an operator lifts them by hand (the admin API's unblock).

Memory: one small entry per client key, kept in LRU order. A periodic sweep on the
injected clock drops entries with nothing to remember (quota full, no block, no
escalation); past ``max_entries`` the least recently seen entry is evicted (an attacker
rotating keys can therefore flush old state, never grow memory). Clients share nothing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from aico.gateway.config import RateLimitSection, RateTier

#: Tolerance for float accumulation in TAT arithmetic (far below any real interval).
_EPSILON = 1e-9
_MAX_LEVEL = 32

BlockCallback = Callable[[str, str, float], None]


class Decision(NamedTuple):
    """The outcome of one :meth:`IRateLimiter.check` (immutable: a named tuple, which
    is made in a third of a frozen dataclass's time; one is made per request)."""

    allowed: bool
    #: The tier's quota (``requests`` per ``per_seconds``).
    limit: int
    #: Requests that may still be sent right now.
    remaining: int
    #: Seconds until the quota is fully restored.
    reset_after: float
    #: Whole seconds until a request will be allowed (0 when allowed).
    retry_after: int
    #: True while the client is temporarily blocked (error code ``temporarily_blocked``).
    blocked: bool
    policy_header: str
    ratelimit_header: str
    tier: str = ""

    @property
    def code(self) -> str | None:
        """The error code (docs/rest.md) for a refusal, None when allowed."""
        if self.allowed:
            return None
        return "temporarily_blocked" if self.blocked else "rate_limited"

    def headers(self) -> dict[str, str]:
        """The response header fields this decision asks for."""
        out = {"RateLimit-Policy": self.policy_header, "RateLimit": self.ratelimit_header}
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class IRateLimiter(Interface):
    """Decides whether a client may make one more request on a tier."""

    def check(client_key: str, tier: str) -> Decision:
        """Count one request of *client_key* on *tier* (if allowed) and decide."""

    def update(
        tiers: Mapping[str, RateTier],
        block_after: int | None = None,
        block_base: float | None = None,
        block_max: float | None = None,
    ) -> None:
        """Apply reloaded settings; the clients' state is kept."""

    def snapshot(limit: int = 1000) -> list[dict[str, Any]]:
        """The most recently seen clients' state, for the admin listing."""


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string (printable ASCII; quote and backslash escaped)."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPSILON))


@dataclass
class _Client:
    last_seen: float
    tats: dict[str, float] = field(default_factory=dict)
    #: The emission interval each TAT in ``tats`` was computed under (live tier changes).
    scales: dict[str, float] = field(default_factory=dict)
    refusals: int = 0
    window_end: float = 0.0
    blocked_until: float = 0.0
    level: int = 0
    level_expires: float = 0.0


@implementer(IRateLimiter)
class GcraLimiter:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        tiers: Mapping[str, RateTier],
        block_after: int = 20,
        block_base: float = 60.0,
        block_max: float = 3600.0,
        max_entries: int = 100_000,
        escalation_memory: float = 86_400.0,
        on_block: BlockCallback | None = None,
        sweep_interval: float = 60.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.max_entries = max_entries
        self.escalation_memory = escalation_memory
        self.on_block = on_block
        self.sweep_interval = sweep_interval
        self.evicted = 0
        self.blocks = 0
        #: Decisions made, by (tier, allowed): metrics read it at scrape time.
        self.decision_counts: dict[tuple[str, bool], int] = {}
        self._tiers: dict[str, RateTier] = {}
        #: When each tier's emission interval last changed (live tier changes).
        self._changed_at: dict[str, float] = {}
        self._policy: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self.block_after = block_after
        self.block_base = block_base
        self.block_max = block_max
        self.update(tiers)

    @classmethod
    def from_config(
        cls,
        clock: IReactorTime,
        section: RateLimitSection,
        on_block: BlockCallback | None = None,
        **kwargs: Any,
    ) -> GcraLimiter:
        return cls(
            clock,
            section.tiers,
            section.block_after,
            section.block_base,
            section.block_max,
            on_block=on_block,
            **kwargs,
        )

    # ------------------------------------------------------------------ config

    def update(
        self,
        tiers: Mapping[str, RateTier],
        block_after: int | None = None,
        block_base: float | None = None,
        block_max: float | None = None,
    ) -> None:
        for name, t in tiers.items():
            if t.requests <= 0 or t.per_seconds <= 0 or t.burst <= 0:
                raise ValueError(f"rate tier {name!r}: requests, per_seconds, burst must be > 0")
        now = self._clock.seconds()
        for name, t in tiers.items():
            before = self._tiers.get(name)
            if before is not None and (before.per_seconds / before.requests
                                       != t.per_seconds / t.requests):
                self._changed_at[name] = now
        self._tiers = dict(tiers)
        #: Each tier's name as an RFC 8941 sf-string, made once (it starts every header).
        self._names = {name: _sf_string(name) for name in self._tiers}
        self._policy = {
            name: f"{self._names[name]};q={t.requests};w={_ceil(t.per_seconds)}"
            for name, t in self._tiers.items()
        }
        if block_after is not None:
            self.block_after = block_after
        if block_base is not None:
            self.block_base = block_base
        if block_max is not None:
            self.block_max = block_max

    def update_from_config(self, section: RateLimitSection) -> None:
        self.update(section.tiers, section.block_after, section.block_base, section.block_max)

    @property
    def tiers(self) -> Mapping[str, RateTier]:
        return dict(self._tiers)

    # ------------------------------------------------------------------ deciding

    def _entry(self, client_key: str, now: float) -> _Client:
        entry = self._clients.get(client_key)
        if entry is None:
            entry = self._clients[client_key] = _Client(last_seen=now)
            while len(self._clients) > self.max_entries:
                self._clients.popitem(last=False)
                self.evicted += 1
        else:
            self._clients.move_to_end(client_key)
            entry.last_seen = now
        return entry

    def _decision(
        self,
        tier: str,
        t: RateTier,
        allowed: bool,
        remaining: int,
        reset_after: float,
        retry_after: int,
        blocked: bool,
    ) -> Decision:
        reset_after = max(0.0, reset_after)
        counts = self.decision_counts
        counts[tier, allowed] = counts.get((tier, allowed), 0) + 1
        return Decision(
            allowed=allowed,
            limit=t.requests,
            remaining=remaining,
            reset_after=reset_after,
            retry_after=retry_after,
            blocked=blocked,
            policy_header=self._policy[tier],
            ratelimit_header=f"{self._names[tier]};r={remaining};t={_ceil(reset_after)}",
            tier=tier,
        )

    def _current_tat(self, entry: _Client, tier: str, t: RateTier, now: float) -> float:
        """The client's TAT for *tier* under the tier's current settings.

        A TAT stored under another emission interval (the tier changed since) has its
        backlog at the time of the change rescaled to the new interval, and from then on
        drained in real time; every backlog is clamped to the tier's tolerance, so stored
        state never holds a client longer than the tier allows.
        """
        stored = entry.tats.get(tier)
        if stored is None or stored <= now:
            return now
        interval = t.per_seconds / t.requests
        tolerance = t.burst * interval
        scale = entry.scales.get(tier, interval)
        if scale != interval:
            since = min(self._changed_at.get(tier, now), now)
            backlog = min(max(0.0, stored - since) * interval / scale, tolerance)
            stored = since + backlog
        return max(now, min(stored, now + tolerance))

    def check(self, client_key: str, tier: str) -> Decision:
        t = self._tiers.get(tier)
        if t is None:
            raise ValueError(f"unknown rate-limit tier {tier!r}")
        now = self._clock.seconds()
        entry = self._entry(client_key, now)
        interval = t.per_seconds / t.requests
        tolerance = t.burst * interval
        tat = self._current_tat(entry, tier, t, now)
        if tier in entry.tats:
            # Keep the state in the tier's current terms (a rescaled backlog then drains
            # in real time, as any other).
            entry.tats[tier] = tat
            entry.scales[tier] = interval

        if entry.blocked_until > now:
            wait = entry.blocked_until - now
            return self._decision(
                tier, t, False, 0, max(wait, tat - now), max(1, _ceil(wait)), True
            )

        new_tat = tat + interval
        if new_tat - now <= tolerance + _EPSILON:
            entry.tats[tier] = new_tat
            entry.scales[tier] = interval
            remaining = max(0, math.floor((tolerance - (new_tat - now)) / interval + _EPSILON))
            return self._decision(tier, t, True, remaining, new_tat - now, 0, False)

        # Refused: count it towards a block.
        if now >= entry.window_end:
            entry.refusals = 0
            entry.window_end = now + t.per_seconds
        entry.refusals += 1
        if entry.refusals >= self.block_after:
            seconds = self._block(entry, client_key, tier, now)
            return self._decision(tier, t, False, 0, max(seconds, tat - now), _ceil(seconds), True)
        wait = new_tat - tolerance - now
        return self._decision(tier, t, False, 0, tat - now, max(1, _ceil(wait)), False)

    def _block(self, entry: _Client, client_key: str, tier: str, now: float) -> float:
        if entry.level_expires <= now:
            entry.level = 0
        seconds = min(self.block_base * 2.0 ** min(entry.level, _MAX_LEVEL), self.block_max)
        entry.level = min(entry.level + 1, _MAX_LEVEL)
        entry.blocked_until = now + seconds
        entry.level_expires = entry.blocked_until + self.escalation_memory
        entry.refusals = 0
        entry.window_end = 0.0
        self.blocks += 1
        self.log.warn(
            "rate limit: {client} temporarily blocked for {seconds}s "
            "(tier {tier}, level {block_level})",
            client=client_key,
            seconds=seconds,
            tier=tier,
            block_level=entry.level,
        )
        if self.on_block is not None:
            try:
                self.on_block(client_key, tier, seconds)
            except Exception:
                self.log.failure("on_block callback failed")
        return seconds

    # ------------------------------------------------------------------ memory

    def _idle(self, entry: _Client, now: float) -> bool:
        return (
            entry.blocked_until <= now
            and (entry.level == 0 or entry.level_expires <= now)
            and entry.window_end <= now
            and all(tat <= now for tat in entry.tats.values())
        )

    def sweep(self) -> int:
        """Drop entries with nothing left to remember; returns how many."""
        now = self._clock.seconds()
        idle = [k for k, e in self._clients.items() if self._idle(e, now)]
        for k in idle:
            del self._clients[k]
        return len(idle)

    def __len__(self) -> int:
        return len(self._clients)

    def unblock(self, client_key: str) -> bool:
        """Forget everything about *client_key* (an operator's manual unblock): its block,
        its escalation level and its spent budget; False when it was not known."""
        return self._clients.pop(client_key, None) is not None

    def stats(self) -> dict[str, int]:
        """Counters for metrics."""
        now = self._clock.seconds()
        return {
            "entries": len(self._clients),
            "blocked": sum(1 for e in self._clients.values() if e.blocked_until > now),
            "blocks_total": self.blocks,
            "evicted_total": self.evicted,
        }

    def snapshot(self, limit: int = 1000) -> list[dict[str, Any]]:
        now = self._clock.seconds()
        out: list[dict[str, Any]] = []
        for key in reversed(self._clients):
            if len(out) >= limit:
                break
            e = self._clients[key]
            tiers: dict[str, Any] = {}
            for name in e.tats:
                t = self._tiers.get(name)
                if t is None:
                    continue
                interval = t.per_seconds / t.requests
                backlog = self._current_tat(e, name, t, now) - now
                tiers[name] = {
                    "limit": t.requests,
                    "remaining": max(
                        0, math.floor((t.burst * interval - backlog) / interval + _EPSILON)
                    ),
                    "reset_after": _ceil(backlog),
                }
            out.append(
                {
                    "client": key,
                    "last_seen": e.last_seen,
                    "blocked": e.blocked_until > now,
                    "blocked_until": e.blocked_until if e.blocked_until > now else None,
                    "block_level": e.level if e.level_expires > now else 0,
                    "tiers": tiers,
                }
            )
        return out
