"""Capabilities: what a role grants, and whether granted patterns include a capability."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from functools import lru_cache


@lru_cache(maxsize=4096)
def _grants(granted: frozenset[str], capability: str) -> bool:
    for pattern in granted:
        if pattern == capability or pattern == "*":
            return True
        if pattern.endswith("*") and fnmatch.fnmatchcase(capability, pattern):
            return True
    return False


def grants(granted: frozenset[str], capability: str) -> bool:
    """Whether the capability patterns *granted* include *capability*.

    ``"*"`` grants everything; ``"x:*"`` every capability that starts with ``x:``.
    """
    return _grants(granted, capability)


def capabilities_for(roles: Iterable[str], mapping: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """The capability patterns the *roles* are given by the ``[roles]`` *mapping*."""
    out: set[str] = set()
    for role in roles:
        out.update(mapping.get(role, ()))
    return frozenset(out)


class CapabilityCache:
    """:func:`capabilities_for` and the narrowing of a token's capabilities, computed once
    per role set for the role mapping in force.

    Keyed by role set (and the token's capability list), never by a token. The mapping
    is checked on every look-up: a different mapping object (a config reload) or one
    that no longer equals the copy the cache was filled from (changed in place) empties
    the cache first, so a changed role applies to the very next request.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._mapping: Mapping[str, tuple[str, ...]] | None = None
        self._snapshot: dict[str, tuple[str, ...]] = {}
        self._roles: dict[tuple[str, ...], frozenset[str]] = {}
        self._narrowed: dict[tuple[tuple[str, ...], tuple[str, ...]], frozenset[str]] = {}

    def _current(self, mapping: Mapping[str, tuple[str, ...]]) -> None:
        if mapping is not self._mapping or mapping != self._snapshot:
            self._mapping = mapping
            self._snapshot = dict(mapping)
            self._roles.clear()
            self._narrowed.clear()

    def for_roles(self, roles: tuple[str, ...],
                  mapping: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
        """``capabilities_for(roles, mapping)``."""
        self._current(mapping)
        caps = self._roles.get(roles)
        if caps is None:
            if len(self._roles) >= self.size:
                self._roles.clear()
            caps = self._roles[roles] = capabilities_for(roles, mapping)
        return caps

    def narrowed(self, roles: tuple[str, ...], caps: tuple[str, ...],
                 mapping: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
        """The capabilities of *caps* (a token's) that *roles* grant under *mapping*."""
        self._current(mapping)
        key = (roles, caps)
        out = self._narrowed.get(key)
        if out is None:
            granted = self.for_roles(roles, mapping)
            if len(self._narrowed) >= self.size:
                self._narrowed.clear()
            out = self._narrowed[key] = frozenset(c for c in caps if grants(granted, c))
        return out
