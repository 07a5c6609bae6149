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
